"""Tensor artifacts on disk: safetensors + JSON sidecar, written and read from dataclass fields.

An artifact is a dataclass that derives from Artifact. Its per-module tensor fields are
declared with `per_module(suffix, ...)` and stored as `{module}.{suffix}`; its `module_specs()`
field is stored as the JSON list "modules"; every other field is JSON metadata under its own
name. The sidecar adds the artifact kind, the msif version and the tensor file's checksum, and
loading refuses another kind, a checksum that differs, and missing tensors. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from msif.core.fingerprint import dtype_advice, same_model
from msif.core.modules import ModuleSpec
from msif.errors import MismatchError, MsifError
from msif.version import __version__

A = TypeVar("A", bound="Artifact")
P = TypeVar("P", bound="PartialSums")

_SUFFIXES = "msif_suffixes"  # field metadata: the tensor key suffixes of a per-module field
_OPTIONAL = "msif_optional"  # field metadata: a module may be absent from this field
_SPECS = "msif_specs"  # field metadata: the module specs, stored as the JSON list "modules"
SPECS_KEY = "modules"


def per_module(*suffixes: str, optional: bool = False) -> Any:
    """A {module: tensor} field stored as `{module}.{suffix}`.

    With several suffixes each value is a tuple of tensors, one per suffix. An optional field
    defaults to {} and may leave modules out; then each module must be in some optional field.
    """
    meta = {_SUFFIXES: suffixes, _OPTIONAL: optional}
    if optional:
        return dataclasses.field(default_factory=dict, metadata=meta)
    return dataclasses.field(metadata=meta)


def module_specs() -> Any:
    """The {name: ModuleSpec} field of an artifact, stored as the JSON list "modules"."""
    return dataclasses.field(metadata={_SPECS: True})


def specs_from_meta(meta: dict, where: str = "the artifact") -> dict[str, ModuleSpec]:
    """Module specs recorded in an artifact's metadata, in order."""
    if SPECS_KEY not in meta:
        raise MsifError(f"{where} lacks its list of {SPECS_KEY!r}")
    try:
        return {d["name"]: ModuleSpec.from_dict(d) for d in meta[SPECS_KEY]}
    except (KeyError, TypeError, ValueError) as e:
        raise MsifError(f"{where}: its {SPECS_KEY!r} are not module specs ({e!r})") from None


def tensor_fields(cls) -> list[dataclasses.Field]:
    """The per-module tensor fields of an artifact class, in declaration order."""
    return [f for f in dataclasses.fields(cls) if _SUFFIXES in f.metadata]


class Artifact:
    """Base of a dataclass stored as `{stem}.safetensors` + `{stem}.json` in a directory."""

    stem: ClassVar[str]

    def save(self, directory: str | Path) -> None:
        """Write {stem}.safetensors + {stem}.json into directory."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            suffixes = f.metadata.get(_SUFFIXES)
            if f.metadata.get(_SPECS):
                meta[SPECS_KEY] = [s.to_dict() for s in value.values()]
            elif suffixes is None:
                meta[f.name] = value
            else:
                for module, t in value.items():
                    parts = t if len(suffixes) > 1 else (t,)
                    for suffix, x in zip(suffixes, parts, strict=True):
                        tensors[f"{module}.{suffix}"] = x
        save_tensors(directory, self.stem, tensors, meta)

    @classmethod
    def load(cls: type[A], directory: str | Path) -> A:
        """Read an artifact written by save, refusing one that is incomplete."""
        tensors, meta = load_tensors(directory, cls.stem)
        specs = specs_from_meta(meta, f"{directory}/{cls.stem}.json")
        values: dict[str, Any] = {}
        found: set[str] = set()  # modules present in some optional field
        for f in dataclasses.fields(cls):
            suffixes = f.metadata.get(_SUFFIXES)
            if f.metadata.get(_SPECS):
                values[f.name] = specs
            elif suffixes is None:
                if f.name in meta:
                    values[f.name] = meta[f.name]
                elif _required(f):
                    raise MsifError(f"{directory}/{cls.stem}.json lacks {f.name!r}")
            else:
                values[f.name] = _module_tensors(cls.stem, directory, tensors, specs, f)
                if f.metadata[_OPTIONAL]:
                    found.update(values[f.name])
        if any(f.metadata[_OPTIONAL] for f in tensor_fields(cls)):
            for name in specs:
                if name not in found:
                    raise MsifError(
                        f"{directory} holds an incomplete {cls.stem} artifact: "
                        f"module {name!r} has no tensors"
                    )
        return cls(**values)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _module_tensors(stem, directory, tensors, specs, f: dataclasses.Field) -> dict:
    suffixes, out = f.metadata[_SUFFIXES], {}
    for name in specs:
        keys = [f"{name}.{s}" for s in suffixes]
        missing = [k for k in keys if k not in tensors]
        if len(missing) == len(keys) and f.metadata[_OPTIONAL]:
            continue
        if missing:
            raise MsifError(
                f"{directory} holds an incomplete {stem} artifact: {missing[0]} is missing"
            )
        out[name] = tensors[keys[0]] if len(keys) == 1 else tuple(tensors[k] for k in keys)
    return out


class PartialSums(Artifact):
    """An artifact of sums over data that add across shards with +.

    Its tensor fields and num_tokens / num_sequences add; the rest must agree.
    """

    what: ClassVar[str]  # how errors name it

    def check_addable(self, other: PartialSums) -> None:
        """Refuse to add sums fitted with other modules, models, stages or seeds."""
        check_compatible(self, other, self.what)

    def add_(self: P, other: P) -> P:
        """Add other's sums into self in place (no third copy: a streaming reduce)."""
        self.check_addable(other)
        for f in tensor_fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            for k, v in mine.items():
                v.add_(theirs[k])
        self.num_tokens += other.num_tokens
        self.num_sequences += other.num_sequences
        return self

    def __add__(self: P, other: P) -> P:
        self.check_addable(other)
        summed = {
            f.name: {k: v + getattr(other, f.name)[k] for k, v in getattr(self, f.name).items()}
            for f in tensor_fields(self)
        }
        return dataclasses.replace(
            self,
            **summed,
            num_tokens=self.num_tokens + other.num_tokens,
            num_sequences=self.num_sequences + other.num_sequences,
        )


def check_finite_sums(sums: dict[str, dict[str, torch.Tensor]], what: str) -> None:
    """Refuse partial sums holding NaN or inf (a float64 overflow), naming the module.

    The hooked loop refuses non-finite a and g per batch, naming the row; sums of finite
    values can still overflow. One reduction per module, once per pass.
    """
    for field_name, per in sums.items():
        for name, t in per.items():
            if not bool(torch.isfinite(t).all()):
                raise MsifError(
                    f"{what} ({field_name}) of module {name!r} are not finite: the model's "
                    "activations or gradients overflow float64 sums"
                )


def check_compatible(a, b, what: str) -> None:
    """Refuse to combine artifacts fitted with other modules, models, stages or seeds."""
    if a.specs != b.specs:
        raise MismatchError(f"cannot combine {what}: they track different modules")
    if not same_model(a.fingerprint, b.fingerprint):
        advice = dtype_advice(a.fingerprint, b.fingerprint, "one of them")
        detail = f" ({advice})" if advice else ""
        raise MismatchError(f"cannot combine {what}: they come from different models{detail}")
    if a.stage != b.stage or a.seed != b.seed:
        raise MismatchError(f"cannot combine {what}: stage or seed differs")


def merge_modules(parts: Sequence[P]) -> P:
    """One artifact holding every part's modules: the union of partial sums of disjoint
    module groups fitted on the same data (the sums of one pass over all their modules).

    Refuses (MismatchError) parts of other kinds, models, stages or seeds, of other data
    (token and sequence counts, recorded facts, Λ's eigenbasis) and a module in two parts.
    Modules keep the parts' order; the tensors are shared with the parts, not copied.
    """
    if not parts:
        raise MsifError("no partial sums to merge")
    first = parts[0]
    if len(parts) == 1:
        return first
    what = first.what
    seen: dict[str, int] = {}
    for i, part in enumerate(parts):
        if type(part) is not type(first):
            raise MismatchError(f"cannot merge {what} with {part.what}")
        if i:
            _check_mergeable(first, part, what)
        for name in part.specs:
            if name in seen:
                raise MismatchError(
                    f"cannot merge {what}: module {name!r} is in parts {seen[name] + 1} and "
                    f"{i + 1} (module groups must be disjoint)"
                )
            seen[name] = i
    merged: dict[str, Any] = {}
    for f in dataclasses.fields(first):
        if f.metadata.get(_SPECS) or _SUFFIXES in f.metadata:
            merged[f.name] = {k: v for p in parts for k, v in getattr(p, f.name).items()}
    return dataclasses.replace(first, **merged)


def _check_mergeable(a: PartialSums, b: PartialSums, what: str) -> None:
    if a.fingerprint != b.fingerprint:
        advice = dtype_advice(a.fingerprint, b.fingerprint, "one of them")
        detail = f" ({advice})" if advice else ""
        raise MismatchError(f"cannot merge {what}: they come from different models{detail}")
    if a.stage != b.stage or a.seed != b.seed:
        raise MismatchError(f"cannot merge {what}: stage or seed differs")
    a_info, b_info = getattr(a, "info", {}), getattr(b, "info", {})
    if a_info.get("eigenbasis") != b_info.get("eigenbasis"):
        raise MismatchError(f"cannot merge {what}: they were fitted in different eigenbases")
    if (a.num_tokens, a.num_sequences) != (b.num_tokens, b.num_sequences):
        raise MismatchError(
            f"cannot merge {what}: they were fitted on different data ({a.num_sequences} "
            f"sequences and {a.num_tokens} tokens against {b.num_sequences} and {b.num_tokens})"
        )
    differs = sorted(k for k in a_info.keys() | b_info.keys() if a_info.get(k) != b_info.get(k))
    if differs:
        raise MismatchError(
            f"cannot merge {what}: they record different {differs[0]!r} (other data, shards "
            "or options)"
        )


def reduce_partials(parts: Sequence[P], what: str) -> P:
    """Sum shard partials (CovarianceSums or LambdaSums) with their own +."""
    if not parts:
        raise MsifError(f"no {what} given")
    return functools.reduce(operator.add, parts)


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
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tensor_path))
        sidecar = {"kind": stem, "msif_version": __version__, "sha256": _sha256(tensor_path)}
        sidecar.update(meta)
        (directory / f"{stem}.json").write_text(json.dumps(sidecar, indent=1, sort_keys=True))
    except (SafetensorError, OSError) as e:
        # safetensors words a full disk as "I/O error: No space left on device (os error 28)"
        reason = getattr(e, "strerror", None) or str(e).rsplit("I/O error: ", 1)[-1]
        raise MsifError(f"{directory}: writing the {stem} artifact failed: {reason}") from None


def load_tensors(directory: str | Path, stem: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify an artifact written by save_tensors."""
    directory = Path(directory)
    tensor_path, meta_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    for p in (tensor_path, meta_path):
        if not p.is_file():
            raise MsifError(f"{directory} is not a {stem} artifact: {p.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MsifError(f"{meta_path} is corrupt: {e}") from None
    if not isinstance(meta, dict):
        raise MsifError(f"{meta_path} is corrupt: not a JSON object")
    if meta.get("kind") != stem:
        raise MismatchError(f"{directory} holds a {meta.get('kind')!r} artifact, not {stem!r}")
    if _sha256(tensor_path) != meta.get("sha256"):
        raise MsifError(f"{tensor_path} is corrupt: its checksum differs from {meta_path.name}")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as e:
        raise MsifError(f"{tensor_path} is corrupt: {e}") from None
    return tensors, meta
