"""The publish protocol: an output directory is complete once its manifest is there.

A node writes its output into a local staging directory; on success it is published, and
the `_MSIF_COMPLETE.json` manifest (every file's size and hashes, the node's metadata) is
what makes it complete. Readers refuse a directory without it and verify every file.

* Local: the manifest is written into the staging directory, an earlier output is moved
  aside (`.NAME.old-*/dir`) and the staging directory renamed onto the target, so the target
  holds the old or the new complete output. Leftovers of killed processes (staging dirs
  `.NAME.msif-*`, an output moved aside but never replaced) are tidied by the next publish
  to, or read of, the same target; an output orphaned between the two renames is restored.
* gs://: objects cannot be renamed, so each publish uploads its files under a fresh version
  prefix, `<uri>/msif-v-<UTC yyyymmddTHHMMSS>-<8 hex>-g<base>/<rel>`, then writes
  `<uri>/_MSIF_COMPLETE.json` last: one atomic object write, and the pointer, whose
  `"version"` field names that prefix. Only then are the previous version and leftovers of
  failed publishes deleted. Readers resolve files through the manifest they read, so they
  see the old complete output or the new one, never a mix. `base` is the generation of the
  marker being replaced (0: none); the marker is written only if it is still that one
  (ifGenerationMatch), so of two concurrent publishers one wins and the other discards its
  version; and a version whose base is the new marker's generation may still be uploading,
  so cleanup leaves it alone. Manifests without `"version"` (earlier releases: files directly
  under `<uri>/`) are still read, and replaced like any other.

A destination that holds anything but an msif output (or, on gs://, leftovers of failed
msif publishes) is refused before the node's work, never replaced.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from msif.errors import MsifError
from msif.storage.gcs import (
    _blob,
    _call,
    _error,
    _status,
    _walk_files,
    list_objects,
    list_top_level,
    read_bytes,
    stat,
    upload_file,
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
VERSION_PREFIX = "msif-v-"
_VERSION_RE = re.compile(r"^msif-v-\d{8}T\d{6}-[0-9a-f]{8}-g(\d+)$")
_HASH_BLOCK = 1 << 20
_REFUSED = "exists and is not a complete msif output; refusing to replace it"

# Leftovers of processes on other hosts (or of earlier releases, whose names carry no owner)
# are judged by age alone. A staging dir lives as long as its node works, which can be days;
# an output moved aside lives only between two renames.
STALE_STAGING_S = 3 * 24 * 3600.0
STALE_ASIDE_S = 3600.0

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

    The destination is checked first (check_output_replaceable). Local: the directory is
    renamed into place, replacing an earlier complete output as a whole. gs://: the files
    are uploaded under a new version prefix of uri, then `_MSIF_COMPLETE.json` points to it.
    On an exception nothing is published and the directory is removed; a full disk or
    another file-system error while staging or publishing is a one-line StorageError.
    """
    remote = is_remote(uri)
    tmp = _remote_stage(uri) if remote else _local_stage(uri)
    try:
        yield tmp
        manifest = _build_manifest(tmp, uri, metadata)
        if remote:
            _publish_remote(tmp, uri, manifest)
        else:
            _publish_local(tmp, uri, manifest)
    except OSError as exc:
        if not _is_staging_failure(exc, tmp):
            raise
        raise _staging_error(uri, tmp, exc) from None
    except Exception as exc:
        # safetensors reports a full disk as its own error, with the OS's words in it.
        if isinstance(exc, MsifError) or _full_disk_text(str(exc)) is None:
            raise
        raise _staging_error(uri, tmp, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_replaceable(uri: str) -> None:
    """Refuse uri as an output unless it is missing, empty or an msif output (one line).

    staged_output_dir calls this when it starts; a node may call it before its work, so a
    bad --out costs nothing. gs://: leftovers of failed msif publishes alone are replaceable.
    """
    if is_remote(uri):
        _check_remote_replaceable(uri)
        return
    target = Path(uri)
    if not target.name:
        raise StorageError(f"{uri!r} is not a usable output directory")
    _tidy_local(target)
    _check_replaceable(target, uri)


def _is_staging_failure(exc: OSError, tmp: Path) -> bool:
    # Only errors of the output's own files: a node's OSError about its inputs stays its own.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    name = exc.filename
    return isinstance(name, str | os.PathLike) and Path(name).is_relative_to(tmp)


def _full_disk_text(text: str) -> str | None:
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in text:
            return os.strerror(code)
    return None


def _staging_error(uri: str, tmp: Path, exc: BaseException) -> StorageError:
    name = getattr(exc, "filename", None) or tmp
    reason = getattr(exc, "strerror", None) or _full_disk_text(str(exc)) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = os.strerror(exc.errno)  # pyarrow's strerror carries a long detail
    return StorageError(f"{uri}: writing the output failed: {name}: {reason}; nothing published")


# ----------------------------------------------------------------------------- local


def _local_stage(uri: str) -> Path:
    check_output_replaceable(uri)
    target = Path(uri)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.msif-{_owner()}", dir=target.parent))
    except OSError as exc:
        raise _error(uri, "creating the staging directory", exc) from None


def _remote_stage(uri: str) -> Path:
    _check_remote_replaceable(uri)
    scratch = Path(tempfile.gettempdir())
    for path, rest in _siblings(scratch, "msif-stage-"):
        if _stale(path, rest, STALE_STAGING_S):
            shutil.rmtree(path, ignore_errors=True)
    try:
        return Path(tempfile.mkdtemp(prefix=f"msif-stage-{_owner()}"))
    except OSError as exc:
        raise _error(str(scratch), "creating the staging directory", exc) from None


def _check_replaceable(target: Path, uri: str) -> None:
    # Only an earlier msif output (or nothing) may be replaced: never a user's own data.
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink():
        if (target / MARKER).is_file() or not any(target.iterdir()):
            return
    raise StorageError(f"{uri} {_REFUSED}")


def _publish_local(tmp: Path, uri: str, manifest: dict) -> None:
    target = Path(uri)
    with (tmp / MARKER).open("wb") as fh:
        fh.write(_encode(manifest))
        fh.flush()
        os.fsync(fh.fileno())
    _check_replaceable(target, uri)
    aside = None
    try:
        if target.exists() and any(target.iterdir()):
            prefix = f".{target.name}.old-{_owner()}"
            aside = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            os.rename(target, aside / "dir")
        os.rename(tmp, target)
    except OSError as exc:
        _put_back(aside, target)
        raise _error(uri, "publishing", exc) from None
    finally:
        # The moved-aside output goes only once something is in place: else the next
        # publish or read restores it.
        if aside is not None and target.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(target.parent)
    log.info("published %s (%d files)", uri, len(manifest["files"]))


def _put_back(aside: Path | None, target: Path) -> None:
    if aside is None or not (aside / "dir").exists() or target.exists():
        return
    try:
        os.rename(aside / "dir", target)
    except OSError as exc:
        log.warning("%s: could not restore the earlier output from %s (%s)", target, aside, exc)


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


def _owner() -> str:
    """`<host>_<pid namespace>_<pid>_`: who made a staging or moved-aside directory."""
    return f"{_host()}_{_pid_namespace()}_{os.getpid()}_"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"


_OWNER_RE = re.compile(r"^(?P<host>[A-Za-z0-9.-]+)_(?P<ns>\d+)_(?P<pid>\d+)_")


def _pid_namespace() -> int:
    # Containers can share a hostname (hostNetwork pods) but not a pid namespace.
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _stale(path: Path, rest: str, max_age: float) -> bool:
    """Whether a staging or moved-aside directory belongs to no live process.

    Its name carries `<host>_<pid namespace>_<pid>_` of the process that made it (rest is
    the name after the fixed prefix). Made on this host, in this pid namespace: stale exactly
    when that pid is not alive (a reused pid only keeps a leftover longer; never the other
    way round). Made elsewhere (a shared file system, another container) or named by an
    earlier release, a pid means nothing here, so only age counts: stale when untouched for
    longer than max_age.
    """
    owner = _OWNER_RE.match(rest)
    if owner and owner["host"] == _host() and int(owner["ns"]) == _pid_namespace():
        return not _alive(int(owner["pid"]))
    try:
        return time.time() - path.lstat().st_mtime > max_age
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: someone else's process, alive
    return True


def _siblings(parent: Path, prefix: str) -> list[tuple[Path, str]]:
    """(path, name after prefix) of the directories in parent whose names start with prefix."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    return [
        (Path(e.path), e.name[len(prefix) :])
        for e in entries
        if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)
    ]


def _tidy_local(target: Path) -> None:
    """Restore an output orphaned by a kill mid-publish; remove stale leftovers (best effort).

    A kill between moving the old output aside and renaming the new one into place leaves
    the target missing and the complete old output in `.NAME.old-*/dir`: it is renamed back.
    Stale moved-aside dirs go only once the target is in place, stale staging dirs always.
    """
    aside = [
        p
        for p, rest in _siblings(target.parent, f".{target.name}.old-")
        if _stale(p, rest, STALE_ASIDE_S)
    ]
    if _vacant(target):
        _restore(target, aside)
    if target.is_dir():
        for path in aside:
            shutil.rmtree(path, ignore_errors=True)
    for path, rest in _siblings(target.parent, f".{target.name}.msif-"):
        if _stale(path, rest, STALE_STAGING_S):
            shutil.rmtree(path, ignore_errors=True)


def _vacant(target: Path) -> bool:
    if target.is_symlink():
        return False
    try:
        return not target.exists() or (target.is_dir() and not any(target.iterdir()))
    except OSError:
        return False


def _restore(target: Path, aside: list[Path]) -> None:
    complete = [p / "dir" for p in aside if (p / "dir" / MARKER).is_file()]
    if not complete:
        return
    newest = max(complete, key=lambda d: (d / MARKER).stat().st_mtime)
    try:
        if target.is_dir():
            target.rmdir()  # an empty directory: nothing of anyone's is lost
        os.rename(newest, target)
    except OSError as exc:
        log.warning("%s: could not restore the output left in %s (%s)", target, newest, exc)
        return
    log.warning("%s: restored the output an interrupted publish left in %s", target, newest)


# ----------------------------------------------------------------------------- gs://


def _check_remote_replaceable(uri: str) -> None:
    # Fail before the node's work, not after it: a typo in the bucket costs nothing here.
    objects, prefixes = list_top_level(uri, "checking the destination")
    if MARKER in objects:
        return
    if objects or any(not _VERSION_RE.match(p) for p in prefixes):
        raise StorageError(f"{uri} {_REFUSED}")


def _publish_remote(tmp: Path, uri: str, manifest: dict) -> None:
    _check_remote_replaceable(uri)  # again: the node's work may have taken hours
    base, old = _current(uri)
    version = _new_version(base)
    manifest["version"] = version
    try:
        for rel in manifest["files"]:
            upload_file(tmp / rel, join(uri, version, rel))
    except BaseException:
        _delete_version(uri, version)  # never pointed to: nobody can be reading it
        raise
    generation = _write_pointer(uri, version, _encode(manifest), base)
    _delete_superseded(uri, version, generation, old)
    log.info("published %s (%d files in %s)", uri, len(manifest["files"]), version)


def _new_version(base: int) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{VERSION_PREFIX}{stamp}-{secrets.token_hex(4)}-g{base}"


def _current(uri: str) -> tuple[int, dict | None]:
    """(generation of the marker now there, 0 if none; its manifest, None if unreadable)."""
    marker = join(uri, MARKER)
    info = stat(marker)
    if info is None:
        return 0, None
    try:
        return info.generation or 0, _parse_manifest(read_bytes(marker, info.generation), uri)
    except (IncompleteError, NotFoundError):
        # Unparseable, or replaced since the stat: the pointer write below tells which.
        return info.generation or 0, None


def _write_pointer(uri: str, version: str, data: bytes, base: int) -> int | None:
    """Write the marker if it is still generation base; its new generation."""
    marker = join(uri, MARKER)
    blob = _blob(marker)

    def run() -> bool:
        try:
            blob.upload_from_string(
                data, content_type="application/json", if_generation_match=base, retry=None
            )
        except Exception as exc:
            if _status(exc) == 412:
                return False
            raise
        return True

    try:
        written = _call(marker, "upload", run)
    except BaseException:
        _discard_unless_pointed_to(uri, version)
        raise
    if written:
        return blob.generation
    if _pointed_version(uri) == version:  # an earlier attempt landed; its answer was lost
        info = stat(marker)
        return info.generation if info else None
    _delete_version(uri, version)
    raise StorageError(
        f"{uri}: another msif process published this output while this one was uploading; "
        "its output stands and this one was discarded"
    )


def _pointed_version(uri: str) -> str | None:
    try:
        return read_manifest(uri).get("version")
    except StorageError:
        return None


def _discard_unless_pointed_to(uri: str, version: str) -> None:
    # A failed pointer write may still have landed (an answer lost on the way back): only a
    # missing marker, or a valid one naming another version, proves ours unused. When that
    # cannot be read either, the next publish cleans up.
    try:
        data = _read_marker(uri)
    except IncompleteError:
        data = None
    except StorageError:
        return
    try:
        pointed = None if data is None else _parse_manifest(data, uri).get("version")
    except IncompleteError:
        return
    if pointed != version:
        _delete_version(uri, version)


def _delete_version(uri: str, version: str) -> None:
    """Delete every object of an unpublished version (best effort: leftovers are cleaned
    by the next publish)."""
    try:
        for obj in list_objects(join(uri, version)):
            _delete_if_present(obj.uri)
    except StorageError as exc:
        log.warning("%s: %s left behind; the next publish removes it (%s)", uri, version, exc)


def _delete_superseded(uri: str, version: str, generation: int | None, old: dict | None) -> None:
    """After the pointer moved: delete the old version, old flat files and dead leftovers."""
    flat = set(old["files"]) if old and not old.get("version") else set()
    try:
        for rel, obj_uri in _objects_by_name(uri):
            top = rel.split("/", 1)[0]
            found = _VERSION_RE.match(top)
            # A version based on the new marker was started after it: it may still win.
            dead = found and top != version and int(found[1]) != generation
            if dead or rel in flat:
                _delete_if_present(obj_uri)
    except StorageError as exc:
        log.warning("%s is published; removing older objects failed (%s)", uri, exc)


def _objects_by_name(uri: str) -> list[tuple[str, str]]:
    bucket, key = split_gs(uri)
    start = len(f"gs://{bucket}/{_prefix(key)}")
    return [(o.uri[start:], o.uri) for o in list_objects(uri) if o.uri[start:] != MARKER]


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
        version = manifest.get("version")
        if version is not None and not _VERSION_RE.match(str(version)):
            raise ValueError("not a version name")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IncompleteError(f"{uri}: {MARKER} is not a valid msif manifest") from None
    return manifest


def read_manifest(uri: str) -> dict:
    """The content of uri's `_MSIF_COMPLETE.json`; StorageError when it is missing."""
    return _parse_manifest(_read_marker(uri), uri)


def files_uri(uri: str, manifest: dict) -> str:
    """Where the files of the output at uri that manifest describes are.

    A gs:// output's version prefix (`uri/msif-v-...`, the manifest's "version"); uri itself
    for local outputs and for manifests of earlier releases, which have no version.
    """
    version = manifest.get("version")
    return join(uri, version) if version else str(uri)


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
