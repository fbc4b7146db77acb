"""safetensors + JSON sidecar storage for every tensor artifact (nothing is unpickled)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from msif.errors import MismatchError, MsifError
from msif.version import __version__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(
    directory: str | Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Write stem.safetensors and stem.json (kind, version, checksum, metadata) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensor_path = directory / f"{stem}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tensor_path))
    sidecar = {"kind": stem, "msif_version": __version__, "sha256": _sha256(tensor_path), **meta}
    (directory / f"{stem}.json").write_text(json.dumps(sidecar, indent=1, sort_keys=True))


def load_tensors(directory: str | Path, stem: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify an artifact written by save_tensors."""
    directory = Path(directory)
    tensor_path, meta_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    for p in (tensor_path, meta_path):
        if not p.is_file():
            raise MsifError(f"{directory} is not a {stem} artifact: {p.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise MsifError(f"{meta_path} is corrupt: {e}") from None
    if meta.get("kind") != stem:
        raise MismatchError(f"{directory} holds a {meta.get('kind')!r} artifact, not {stem!r}")
    if _sha256(tensor_path) != meta.get("sha256"):
        raise MsifError(f"{tensor_path} is corrupt: its checksum differs from {meta_path.name}")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as e:
        raise MsifError(f"{tensor_path} is corrupt: {e}") from None
    return tensors, meta
