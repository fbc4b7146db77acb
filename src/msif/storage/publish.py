"""The publish protocol: an output directory is complete once its manifest is there.

Outputs are published atomically: written into a local temporary directory, then moved
(local) or uploaded (gs://), and the `_MSIF_COMPLETE.json` manifest of every file's size
and hashes is written last. Readers refuse directories without that marker and can verify
every file against it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from msif.storage.gcs import (
    _blob,
    _call,
    _client,
    _error,
    _status,
    _walk_files,
    list_objects,
    read_bytes,
    stat,
    upload_file,
    write_bytes_atomic,
)
from msif.storage.uri import (
    BucketNotFoundError,
    IncompleteError,
    NotFoundError,
    StorageError,
    _prefix,
    _safe_relative,
    is_remote,
    join,
    split_gs,
)
from msif.version import __version__

log = logging.getLogger("msif")

MARKER = "_MSIF_COMPLETE.json"
MANIFEST_FORMAT = "msif-complete/1"
_HASH_BLOCK = 1 << 20

# ----------------------------------------------------------------------------- writers


def _file_hashes(path: Path) -> tuple[int, str, str]:
    """(size, sha256 hex, crc32c base64 as GCS reports it) of a local file."""
    import google_crc32c

    sha = hashlib.sha256()
    crc = google_crc32c.Checksum()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            sha.update(block)
            crc.update(block)
            size += len(block)
    return size, sha.hexdigest(), base64.b64encode(crc.digest()).decode()


def _build_manifest(root: Path, where: str, metadata: dict | None) -> dict:
    files = {}
    for rel, path in _walk_files(root, where):
        if rel == MARKER:
            raise StorageError(f"{where}: the output must not contain its own {MARKER}")
        size, sha, crc = _file_hashes(path)
        files[rel] = {"size": size, "sha256": sha, "crc32c": crc}
    manifest = {
        "format": MANIFEST_FORMAT,
        "msif_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        "metadata": metadata or {},
    }
    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"{where}: output metadata is not JSON-serialisable ({exc})") from None
    return manifest


def _encode(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


@contextmanager
def staged_output_dir(uri: str, metadata: dict | None = None) -> Iterator[Path]:
    """Yield a fresh local directory; on normal exit publish it atomically to uri.

    Local: the directory is renamed into place (an existing complete output is replaced as
    a whole). gs://: every file is uploaded under uri/, then `_MSIF_COMPLETE.json` last.
    On an exception nothing is published and the temporary directory is removed.
    """
    remote = is_remote(uri)
    if remote:
        _preflight_remote(uri)
        tmp = Path(tempfile.mkdtemp(prefix="msif-stage-"))
    else:
        tmp = _local_stage(uri)
    try:
        yield tmp
        manifest = _build_manifest(tmp, uri, metadata)
        if remote:
            _publish_remote(tmp, uri, manifest)
        else:
            _publish_local(tmp, uri, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _local_stage(uri: str) -> Path:
    target = Path(uri)
    if not target.name:
        raise StorageError(f"{uri!r} is not a usable output directory")
    _check_replaceable(target, uri)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.msif-", dir=target.parent))
    except OSError as exc:
        raise _error(uri, "creating the staging directory", exc) from None


def _check_replaceable(target: Path, uri: str) -> None:
    # Only an earlier msif output (or nothing) may be replaced: never a user's own data.
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink():
        if (target / MARKER).is_file() or not any(target.iterdir()):
            return
    raise StorageError(f"{uri} exists and is not a complete msif output; refusing to replace it")


def _publish_local(tmp: Path, uri: str, manifest: dict) -> None:
    target = Path(uri)
    with (tmp / MARKER).open("wb") as fh:
        fh.write(_encode(manifest))
        fh.flush()
        os.fsync(fh.fileno())
    _check_replaceable(target, uri)
    old = None
    try:
        if target.exists() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "dir")
        os.rename(tmp, target)
    except OSError as exc:
        if old is not None and (old / "dir").exists() and not target.exists():
            os.rename(old / "dir", target)
        raise _error(uri, "publishing", exc) from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)
    log.info("published %s (%d files)", uri, len(manifest["files"]))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _preflight_remote(uri: str) -> None:
    # Fail before the node's work, not after it: a typo in the bucket costs nothing here.
    bucket, key = split_gs(uri)

    def run():
        return list(_client(uri).list_blobs(bucket, prefix=_prefix(key), max_results=1, retry=None))

    _call(uri, "checking the destination", run)


def _old_manifest(uri: str) -> dict | None:
    try:
        return read_manifest(uri)
    except IncompleteError:
        marker_there = stat(join(uri, MARKER)) is not None
        return {"files": {}} if marker_there else None


def _publish_remote(tmp: Path, uri: str, manifest: dict) -> None:
    marker = join(uri, MARKER)
    old = _old_manifest(uri)
    if old is not None:
        # Readers must see "incomplete" while files are being replaced, never a mix.
        _call(marker, "delete", lambda: _blob(marker).delete(retry=None))
    elif list_objects(uri):
        log.warning("%s already holds objects without %s; publishing over them", uri, MARKER)
    for rel in manifest["files"]:
        upload_file(tmp / rel, join(uri, rel))
    for rel in sorted(set((old or {}).get("files", {})) - set(manifest["files"])):
        _delete_if_present(join(uri, rel))
    write_bytes_atomic(marker, _encode(manifest))
    log.info("published %s (%d files)", uri, len(manifest["files"]))


def _delete_if_present(uri: str) -> None:
    def run() -> None:
        try:
            _blob(uri).delete(retry=None)
        except Exception as exc:
            if _status(exc) != 404:
                raise

    _call(uri, "delete", run)


# ----------------------------------------------------------------------------- readers


def is_complete(uri: str) -> bool:
    """Whether uri holds a published msif output (its marker exists and parses)."""
    try:
        read_manifest(uri)
    except IncompleteError:
        return False
    return True


def _read_marker(uri: str) -> bytes:
    marker = join(uri, MARKER)
    try:
        return read_bytes(marker)
    except BucketNotFoundError:
        raise
    except NotFoundError:
        raise IncompleteError(f"{uri} is incomplete or missing: no {MARKER}") from None


def _parse_manifest(data: bytes, uri: str) -> dict:
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
        for rel, entry in files.items():
            _safe_relative(rel, uri)
            int(entry["size"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError):
        raise IncompleteError(f"{uri}: {MARKER} is not a valid msif manifest") from None
    return manifest


def read_manifest(uri: str) -> dict:
    """The content of uri's `_MSIF_COMPLETE.json`; StorageError when it is missing."""
    return _parse_manifest(_read_marker(uri), uri)


def _verify_tree(root: Path, manifest: dict, uri: str) -> None:
    for rel, entry in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            raise StorageError(f"{uri}: {rel} is listed in {MARKER} but missing")
        size, sha, _ = _file_hashes(path)
        if size != int(entry["size"]) or sha != entry["sha256"]:
            raise StorageError(
                f"{uri}: {rel} does not match its manifest (sha256 differs); "
                "it was modified after publishing"
            )
