"""Names of storage locations: local paths and gs://bucket/prefix URIs, and storage errors.

Every msif path is one or the other; other schemes are refused here so that a typo such as
s3:// fails before any work. Nothing in this module touches the network; the only file-system
access is check_output_distinct resolving local symlinks.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
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


# ----------------------------------------------------------------------------- overlap

_GLOB_CHARS = "*?["
Location = tuple[str | None, tuple[str, ...]]  # (bucket, or None when local; path parts)


def check_output_distinct(out_uri: str, input_uris: object) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs.

    Publishing replaces the output as a whole, so `--partials X --out X` would destroy its
    own input. input_uris may be None, one path/URI or a (nested) list of them. Local paths
    are compared as absolute paths with symlinks resolved; gs:// URIs by bucket and prefix on
    path-segment boundaries (gs://b/a does not contain gs://b/ab). A glob input counts as
    every path it could match. Raises a one-line StorageError naming both.
    """
    out = _location(out_uri)
    for uri in _flatten(input_uris):
        where = _overlap(out, _location(uri))
        if where:
            relation = "lies inside" if where == "inside" else "is (or contains)"
            raise StorageError(f"--out {out_uri} {relation} the input {uri}; choose another output")


def _flatten(items: object) -> Iterable[str]:
    if items is None:
        return
    if isinstance(items, str | os.PathLike):
        yield os.fspath(items)
        return
    for item in items:  # type: ignore[attr-defined]
        yield from _flatten(item)


def _location(uri: str) -> Location:
    if is_remote(uri):
        bucket, key = split_gs(uri)
        return bucket, tuple(p for p in key.split("/") if p)
    parts = Path(uri).expanduser().parts
    # Resolve only the literal head: a glob's tail names no single file to resolve.
    cut = next((i for i, p in enumerate(parts) if _is_glob(p)), len(parts))
    head = Path(*parts[:cut]) if cut else Path(".")
    return None, head.resolve().parts + tuple(parts[cut:])


def _is_glob(part: str) -> bool:
    return any(c in part for c in _GLOB_CHARS)


def _overlap(out: Location, inp: Location) -> str | None:
    """ "inside" when out lies under inp, "covers" when out equals or contains it, else None."""
    if out[0] != inp[0]:
        return None
    for mine, theirs in zip(out[1], inp[1], strict=False):
        if theirs == "**":
            return "inside"
        if not (fnmatch.fnmatchcase(mine, theirs) if _is_glob(theirs) else mine == theirs):
            return None
    return "inside" if len(out[1]) > len(inp[1]) else "covers"
