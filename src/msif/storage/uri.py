"""Names of storage locations: local paths and gs://bucket/prefix URIs, and storage errors.

Every msif path is one or the other; other schemes are refused here so that a typo such as
s3:// fails before any work. Nothing in this module touches a file or the network.
"""

from __future__ import annotations

import re
from pathlib import Path

from msif.errors import MsifError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


class StorageError(MsifError):
    """An object-storage or file-system operation failed (which URI, and what went wrong)."""


class NotFoundError(StorageError):
    """The object, file or directory does not exist."""


class BucketNotFoundError(NotFoundError):
    """The bucket itself does not exist."""


class IncompleteError(StorageError):
    """A directory without a valid completion marker: never published, or still being written."""


def is_remote(uri: str) -> bool:
    """True for gs:// URIs; False for local paths; StorageError for other schemes."""
    text = str(uri)
    if text.startswith("gs://"):
        return True
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        raise StorageError(
            f"{text}: unsupported URI scheme {scheme.group(1)!r}; use a local path or "
            "gs://bucket/prefix"
        )
    return False


def join(uri: str, *parts: str) -> str:
    """Append path parts to a local path or gs:// URI (one slash between parts)."""
    if not is_remote(uri):
        return str(Path(uri).joinpath(*parts))
    out = str(uri).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def split_gs(uri: str) -> tuple[str, str]:
    """(bucket, object key or prefix without a trailing slash) of a gs:// URI."""
    rest = str(uri)[len("gs://") :]
    bucket, _, key = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(f"{uri}: {bucket!r} is not a valid bucket name")
    return bucket, key.strip("/")


def _prefix(key: str) -> str:
    return f"{key}/" if key else ""


def _safe_relative(name: str, where: str) -> str:
    # Names come from listings and manifests: they must not escape the local directory.
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"{where}: refusing the unsafe file name {name!r}")
    return name
