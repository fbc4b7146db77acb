"""Which files an input spec names: one file, a directory, a glob, a gs:// object or prefix.

Shared by every input format (msif.data.parquet, msif.data.sources). A directory or prefix
keeps the files a format's `keep(name)` accepts, leaving out hidden side files (`_SUCCESS`,
`.crc`); a file or a glob is taken as named. Each entry is (uri, rel, size, generation,
content id): rel is the name relative to the spec, so that the same files copied elsewhere,
locally or to gs://, list alike; gs:// entries carry GCS's crc32c as their content id, local
ones are hashed on demand (msif.storage.digest).
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from msif.errors import DataError
from msif.storage import gcs as storage
from msif.storage.digest import object_content_id
from msif.storage.uri import NotFoundError, split_gs

GLOB_CHARS = "*?["

Listed = tuple[str, str, int, int | None, str | None]  # uri, rel, size, generation, content


def hidden(rel: str) -> bool:
    """Writers put side files (_SUCCESS, _common_metadata, .crc) next to the data."""
    return any(part.startswith(("_", ".")) for part in PurePosixPath(rel).parts)


def has_glob(text: str) -> bool:
    """Whether a spec is a pattern."""
    return any(c in text for c in GLOB_CHARS)


def match_parts(pattern: str, name: str) -> bool:
    """Shell-glob match in which `*` does not cross a `/`."""
    pp, np_ = pattern.split("/"), name.split("/")
    return len(pp) == len(np_) and all(
        fnmatch.fnmatchcase(n, p) for p, n in zip(pp, np_, strict=True)
    )


def list_local(spec: str, keep: Callable[[str], bool], none_message: str) -> list[Listed]:
    """The files a local spec names; a directory's files (recursively) that `keep` accepts."""
    if has_glob(spec):
        found = sorted(p for p in glob.glob(spec) if Path(p).is_file())
        if not found:
            raise NotFoundError(f"{spec}: no file matches this pattern")
        return [(p, Path(p).name, Path(p).stat().st_size, None, None) for p in found]
    path = Path(spec)
    if path.is_file():
        return [(spec, path.name, path.stat().st_size, None, None)]
    if not path.is_dir():
        raise NotFoundError(f"{spec}: no such file or directory")
    out = []
    for p in path.rglob("*"):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and keep(p.name) and not hidden(rel):
            out.append((str(p), rel, p.stat().st_size, None, None))
    if not out:
        raise DataError(f"{spec} {none_message}")
    return sorted(out)


def list_remote(spec: str, keep: Callable[[str], bool], none_message: str) -> list[Listed]:
    """The objects a gs:// spec names; a prefix's objects that `keep` accepts."""
    bucket, key = split_gs(spec)
    if has_glob(key):
        parts = key.split("/")
        static = "/".join(parts[: next(i for i, p in enumerate(parts) if has_glob(p))])
        root = f"gs://{bucket}/{static}" if static else f"gs://{bucket}"
        objects = [
            o
            for o in storage.list_objects(root)
            if match_parts(key, o.uri[len(f"gs://{bucket}/") :])
        ]
        if not objects:
            raise NotFoundError(f"{spec}: no object matches this pattern")
        return [listed(o, o.uri.rsplit("/", 1)[-1]) for o in objects]
    if key:
        obj = storage.stat(spec)
        if obj is not None:
            return [listed(obj, key.rsplit("/", 1)[-1])]
    objects = storage.list_objects(spec)
    if not objects:
        raise NotFoundError(f"{spec}: no such object or prefix")
    base = len(spec.rstrip("/")) + 1
    out = [
        listed(o, o.uri[base:])
        for o in objects
        if keep(o.uri.rsplit("/", 1)[-1]) and not hidden(o.uri[base:])
    ]
    if not out:
        raise DataError(f"{spec} {none_message}")
    return out


def listed(obj: storage.ObjectInfo, rel: str) -> Listed:
    """The entry of a listed gs:// object."""
    return (obj.uri, rel, obj.size, obj.generation, object_content_id(obj))
