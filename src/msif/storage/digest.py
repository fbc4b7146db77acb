"""Content digests of input files and model directories, local or gs://.

A content id names a file's bytes: `crc32c:<base64>` as GCS reports it. Local files are
hashed (sha256 and crc32c in one streaming pass) and the result is cached under
`cache_home()/digests`, keyed by the file's identity (real path, size, mtime, ctime, inode), so
a 40 GB corpus is read once, not by every node. gs:// objects are never read: their listing
carries the crc32c GCS computed. Because both sides use crc32c, a copy of the same bytes gives
the same id locally and on GCS; an object without a crc32c falls back to its md5, else its
generation, and then a local copy no longer matches it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from msif.storage.cache import cache_home
from msif.storage.gcs import ObjectInfo, _error, list_objects
from msif.storage.publish import _file_hashes
from msif.storage.uri import NotFoundError, StorageError, is_remote, join

log = logging.getLogger("msif")

# A file changed twice within one timestamp tick keeps its stat; a digest of a file this
# recently touched is not cached (git's "racily clean" problem).
_RACY_NS = 2_000_000_000
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class FileHashes:
    """What one pass over a local file gives: size, sha256 (hex), crc32c (base64, as GCS)."""

    size: int
    sha256: str
    crc32c: str

    @property
    def content_id(self) -> str:
        """`crc32c:…`: the id the same bytes have as a gs:// object."""
        return f"crc32c:{self.crc32c}"


def _identity(st: os.stat_result, real: str) -> list:
    return [_CACHE_FORMAT, real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _cache_file(identity: list) -> Path:
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    return cache_home() / "digests" / key[:2] / f"{key}.json"


def _cached(path: Path, identity: list) -> FileHashes | None:
    try:
        doc = json.loads(path.read_text())
        if doc.pop("identity") == identity:
            return FileHashes(**doc)
    except (OSError, ValueError, TypeError, KeyError):
        pass  # absent or damaged: hash again
    return None


def _store(path: Path, identity: list, hashes: FileHashes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digest-", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump({"identity": identity, **asdict(hashes)}, fh)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs a re-hash next time
        log.debug("digest cache %s not written: %s", path, exc)


def file_hashes(path: str | os.PathLike) -> FileHashes:
    """Size, sha256 and crc32c of a local file, read once per version of the file."""
    real = os.path.realpath(path)
    try:
        before = os.stat(real)
    except OSError as exc:
        raise _error(os.fspath(path), "reading", exc) from None
    if not os.path.isfile(real):
        raise StorageError(f"{os.fspath(path)}: not a regular file")
    identity = _identity(before, real)
    entry = _cache_file(identity)
    hashes = _cached(entry, identity)
    if hashes is not None:
        return hashes
    try:
        size, sha, crc = _file_hashes(Path(real))
        after = os.stat(real)
    except OSError as exc:
        raise _error(os.fspath(path), "hashing", exc) from None
    hashes = FileHashes(size, sha, crc)
    settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) >= _RACY_NS
    if _identity(after, real) == identity and size == before.st_size and settled:
        _store(entry, identity, hashes)
    return hashes


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a local file's bytes; cached, see file_hashes."""
    return file_hashes(path).sha256


def local_content_id(path: str | os.PathLike) -> str:
    """The content id of a local file (`crc32c:…`), equal to that of the same bytes on GCS."""
    return file_hashes(path).content_id


def object_content_id(obj: ObjectInfo) -> str:
    """The content id of a listed gs:// object: its crc32c, else md5, else its generation."""
    if obj.crc32c:
        return f"crc32c:{obj.crc32c}"
    if obj.md5:
        return f"md5:{obj.md5}"
    return f"generation:{obj.generation}"


def _skipped(name: str) -> bool:
    # Dot-files (.gitattributes, a hub download's .cache) do not change what is loaded.
    return name.startswith(".")


def model_digest(uri: str) -> str:
    """A content digest of a model directory's top-level files (names, sizes, content ids).

    Subfolders are left out, as fetch_model_dir does; replacing the weights, config or
    tokenizer files changes the digest, renaming or moving the directory does not.
    """
    if is_remote(uri):
        everything = list_objects(uri)
        if not everything:
            raise NotFoundError(f"{uri}: no objects under this prefix")
        base = len(join(uri, "x")) - 1
        entries = [
            [o.uri[base:], o.size, object_content_id(o)]
            for o in everything
            if "/" not in o.uri[base:] and not _skipped(o.uri[base:])
        ]
    else:
        root = Path(uri)
        if not root.is_dir():
            raise StorageError(f"{uri}: no such model directory")
        files = [p for p in sorted(root.iterdir()) if p.is_file() and not _skipped(p.name)]
        hashes = [file_hashes(p) for p in files]
        entries = [[p.name, h.size, h.content_id] for p, h in zip(files, hashes, strict=True)]
    doc = json.dumps(sorted(entries))
    return hashlib.sha256(doc.encode()).hexdigest()[:16]
