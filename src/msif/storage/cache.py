"""Local caches: where msif keeps downloads, and verified local copies of inputs.

Published outputs are cached by the content of their manifest and checked by sha256; model
directories by the listing of their objects and checked against GCS's crc32c (or md5). A
valid cached copy is reused, a damaged one downloaded again. A gs:// output's files are
read from the version its manifest names, so a copy is all of one publish; one replaced
while being read is read again from its new manifest. A cached copy is itself a flat,
complete msif output. Local failures (a full disk) are one-line StorageErrors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from msif.storage.gcs import ObjectInfo, _error, download_file, list_objects
from msif.storage.publish import (
    _HASH_BLOCK,
    MARKER,
    STALE_STAGING_S,
    _encode,
    _file_hashes,
    _owner,
    _parse_manifest,
    _read_marker,
    _siblings,
    _stale,
    _tidy_local,
    _verify_tree,
    files_uri,
    read_manifest,
)
from msif.storage.uri import NotFoundError, StorageError, _safe_relative, is_remote, join

log = logging.getLogger("msif")

_READ_ATTEMPTS = 5  # how often an output replaced while being read is read again
# What makes a folder a model: a save_pretrained config, or a PEFT adapter's config.
MODEL_CONFIGS = ("config.json", "adapter_config.json")
_NO_CONFIG = "{uri} is not a model directory: no config.json (nor a PEFT adapter_config.json)"


def _matches_object(path: Path, obj: ObjectInfo) -> bool:
    """Whether a local file has the size and GCS hash (crc32c, else md5) of an object."""
    if not path.is_file() or path.stat().st_size != obj.size:
        return False
    if obj.crc32c:
        return _file_hashes(path)[2] == obj.crc32c
    if obj.md5:
        md5 = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                md5.update(block)
        return base64.b64encode(md5.digest()).decode() == obj.md5
    log.warning("%s has no crc32c/md5 hash; a cached copy is checked by size only", obj.uri)
    return True


def cache_home() -> Path:
    """msif's cache directory (worlds, downloads): $MSIF_CACHE, else $XDG_CACHE_HOME/msif."""
    if os.environ.get("MSIF_CACHE"):
        return Path(os.environ["MSIF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "msif"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The local download cache: cache_dir, else cache_home(); created if missing."""
    root = Path(cache_dir) if cache_dir is not None else cache_home()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _error(str(root), "creating the cache directory", exc) from None
    return root


def local_input_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the verified files of a published msif output.

    Local outputs are used where they are once every file matches the manifest (an output
    an interrupted publish left aside is restored first). gs:// outputs are downloaded into
    a cache keyed by the manifest and verified by sha256; a valid cached copy is reused.
    """
    if not is_remote(uri):
        return _local_output(uri)
    for _ in range(_READ_ATTEMPTS):
        marker_bytes = _read_marker(uri)
        try:
            return _cached_copy(uri, marker_bytes, cache_dir)
        except NotFoundError:
            # A file of the version we read went: the output was replaced. Read the new one.
            if _read_marker(uri) == marker_bytes:
                raise
            log.info("%s was replaced while being read; reading it again", uri)
    raise StorageError(f"{uri} was replaced {_READ_ATTEMPTS} times while being read")


def release_input_dir(uri: str, path: Path) -> None:
    """Drop the cached copy of a gs:// input once it has been read (a reducer reads each
    shard's partial once: keeping every copy would need the disk of all of them).
    Local inputs are their own copy and stay."""
    if is_remote(uri):
        shutil.rmtree(path, ignore_errors=True)


def _local_output(uri: str) -> Path:
    path = Path(uri)
    if not path.is_dir():
        _tidy_local(path)
    if not path.is_dir():
        raise StorageError(f"{uri}: no such directory")
    manifest = read_manifest(uri)
    root = Path(files_uri(uri, manifest))  # a gs:// output seen through a gcsfuse mount
    _verify_tree(root, manifest, uri)
    return root


def _cached_copy(uri: str, marker_bytes: bytes, cache_dir: str | Path | None) -> Path:
    manifest = _parse_manifest(marker_bytes, uri)
    root = cache_root(cache_dir) / "artifacts"
    dest = root / hashlib.sha256(marker_bytes).hexdigest()[:32]
    if dest.is_dir():
        try:
            _verify_tree(dest, manifest, uri)
            log.debug("%s: using the cached copy in %s", uri, dest)
            return dest
        except StorageError:
            log.warning("%s: the cached copy in %s is damaged; downloading again", uri, dest)
            shutil.rmtree(dest, ignore_errors=True)
    for path, rest in _siblings(root, ".download-"):
        if _stale(path, rest, STALE_STAGING_S):  # left by a killed download
            shutil.rmtree(path, ignore_errors=True)
    stage = _mkdtemp(root, f".download-{_owner()}")
    try:
        source = files_uri(uri, manifest)
        for rel in sorted(manifest["files"]):
            download_file(join(source, rel), stage / rel)
        _verify_tree(stage, manifest, uri)
        # The copy is flat: its manifest names no version.
        flat = {k: v for k, v in manifest.items() if k != "version"}
        _write_local(stage / MARKER, _encode(flat))
        try:
            os.rename(stage, dest)
        except OSError:
            # Another process finished the same download first; theirs is as good.
            _verify_tree(dest, manifest, uri)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest


def _mkdtemp(root: Path, prefix: str) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    except OSError as exc:
        raise _error(str(root), "creating a download directory", exc) from None


def _write_local(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise _error(str(path), "writing", exc) from None


def fetch_model_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local directory for from_pretrained: a local model dir as is, or a gs:// copy.

    A model directory holds config.json (a save_pretrained model) or adapter_config.json
    (a PEFT adapter, which msif.data.models merges into its base). The top-level objects of
    a gs:// prefix are mirrored into the cache; every file is checked against the object's
    crc32c (or md5) and downloaded again when it does not match.
    """
    if not is_remote(uri):
        path = Path(uri)
        if not path.is_dir():
            raise StorageError(f"{uri}: no such model directory")
        if not any((path / name).is_file() for name in MODEL_CONFIGS):
            raise StorageError(_NO_CONFIG.format(uri=uri))
        return path
    everything = list_objects(uri)
    if not everything:
        raise NotFoundError(f"{uri}: no objects under this prefix")
    base = len(join(uri, "x")) - 1
    # save_pretrained writes a flat directory; nested objects (a Trainer's checkpoint-*/
    # folders, say) are not part of the model and can be far larger than it.
    objects = [o for o in everything if "/" not in o.uri[base:]]
    if len(objects) < len(everything):
        log.info(
            "%s: %d objects in subfolders are not downloaded", uri, len(everything) - len(objects)
        )
    rels = [_safe_relative(o.uri[base:], uri) for o in objects]
    if not set(MODEL_CONFIGS) & set(rels):
        raise StorageError(_NO_CONFIG.format(uri=uri))
    listing = json.dumps(
        [uri]
        + [[r, o.size, o.crc32c, o.md5, o.generation] for r, o in zip(rels, objects, strict=True)]
    )
    name = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:40]
    dest = (
        cache_root(cache_dir)
        / "models"
        / (f"{name}-{hashlib.sha256(listing.encode()).hexdigest()[:24]}")
    )
    fetched = 0
    for rel, obj in zip(rels, objects, strict=True):
        path = dest / rel
        if _matches_object(path, obj):
            continue
        download_file(obj.uri, path, generation=obj.generation)
        if not _matches_object(path, obj):
            raise StorageError(f"{obj.uri}: downloaded copy does not match the object's hash")
        fetched += 1
    log.info("%s: %d of %d files downloaded into %s", uri, fetched, len(objects), dest)
    return dest
