"""Object storage: every msif path is a local path or a gs://bucket/prefix URI.

Outputs are published atomically (write into a local temporary directory, then move or
upload, then write the `_MSIF_COMPLETE.json` manifest last); readers refuse directories
without that marker and verify every file against it. Credentials come only from the
environment (ADC / Workload Identity, or STORAGE_EMULATOR_HOST for an emulator).
Transient GCS errors are retried with bounded exponential backoff; permanent ones raise a
one-line StorageError at once.
"""

from __future__ import annotations

import base64
import hashlib
import http
import json
import logging
import mimetypes
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from msif.errors import MsifError
from msif.version import __version__

log = logging.getLogger("msif")

MARKER = "_MSIF_COMPLETE.json"
MANIFEST_FORMAT = "msif-complete/1"
UPLOAD_CHUNK = 32 << 20  # resumable upload chunk; bounds the memory of large uploads
_HASH_BLOCK = 1 << 20
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_SECRET_RE = re.compile(
    r"(Bearer\s+\S+|ya29\.[\w.-]+|(access_token|refresh_token|client_secret|token)=[^&\s]+"
    r"|-----BEGIN[^-]*-----.*?-----END[^-]*-----)",
    re.IGNORECASE | re.DOTALL,
)
T = TypeVar("T")


class StorageError(MsifError):
    """An object-storage or file-system operation failed (which URI, and what went wrong)."""


class NotFoundError(StorageError):
    """The object, file or directory does not exist."""


class BucketNotFoundError(NotFoundError):
    """The bucket itself does not exist."""


class IncompleteError(StorageError):
    """A directory without a valid completion marker: never published, or still being written."""


# ----------------------------------------------------------------------------- URIs


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


# ----------------------------------------------------------------------------- errors


def _status(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: throttling, server errors, dropped connections, timeouts."""
    import google.auth.exceptions as auth_exc
    import requests
    import urllib3
    from google.resumable_media import DataCorruption

    if isinstance(exc, auth_exc.TransportError):
        return True
    if isinstance(exc, auth_exc.RefreshError):
        return bool(getattr(exc, "retryable", False))
    if isinstance(
        exc,
        (
            ConnectionError,
            TimeoutError,
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            DataCorruption,
        ),
    ):
        return True
    return _status(exc) in (408, 429, 500, 502, 503, 504)


def _redact(text: str) -> str:
    return _SECRET_RE.sub("[redacted]", text)


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of an exception."""
    from google.resumable_media import DataCorruption

    status = _status(exc)
    if status is not None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        return f"HTTP {status} {phrase}".strip()
    if isinstance(exc, DataCorruption):
        return "checksum mismatch in transfer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _error(uri: str, action: str, exc: BaseException) -> StorageError:
    """Map a permanent failure to a one-line StorageError."""
    import google.auth.exceptions as auth_exc

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, auth_exc.DefaultCredentialsError):
        return StorageError(
            f"{uri}: no Google Cloud credentials in the environment (configure ADC or "
            "Workload Identity; STORAGE_EMULATOR_HOST for an emulator)"
        )
    if isinstance(exc, auth_exc.GoogleAuthError):
        return StorageError(
            f"{uri}: {action} failed: the environment's credentials could not be used "
            f"({type(exc).__name__})"
        )
    status = _status(exc)
    if status == 404:
        return _not_found(uri, action)
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{uri}: {action} failed: no such file or directory")
    if status in (401, 403):
        return StorageError(
            f"{uri}: {action} failed: permission denied (HTTP {status}); the credentials "
            "from the environment lack access"
        )
    if isinstance(exc, OSError) and not is_remote(uri):
        return StorageError(f"{uri}: {action} failed: {exc.strerror or type(exc).__name__}")
    return StorageError(f"{uri}: {action} failed: {_redact(_describe(exc))}")


def _not_found(uri: str, action: str) -> NotFoundError:
    # GCS answers 404 alike for a missing bucket and a missing object; ask which one.
    bucket, _ = split_gs(uri)
    try:
        list(_client(uri).list_blobs(bucket, max_results=1, retry=None))
    except Exception as exc:  # noqa: BLE001 - any failure here leaves the answer open
        if _status(exc) == 404:
            return BucketNotFoundError(f"{uri}: {action} failed: no such bucket {bucket!r}")
        return NotFoundError(f"{uri}: {action} failed: not found")
    return NotFoundError(f"{uri}: {action} failed: no such object")


def _retry_settings() -> tuple[int, float, float]:
    try:
        attempts = int(os.environ.get("MSIF_STORAGE_RETRIES", "7"))
        base = float(os.environ.get("MSIF_STORAGE_RETRY_BASE", "1.0"))
        cap = float(os.environ.get("MSIF_STORAGE_RETRY_MAX", "32"))
    except ValueError:
        raise StorageError(
            "MSIF_STORAGE_RETRIES must be an integer and MSIF_STORAGE_RETRY_BASE / "
            "MSIF_STORAGE_RETRY_MAX numbers of seconds"
        ) from None
    if attempts < 1 or base < 0 or cap < 0:
        raise StorageError("MSIF_STORAGE_RETRIES must be >= 1 and the retry delays >= 0")
    return attempts, base, cap


def _call(uri: str, action: str, fn: Callable[[], T]) -> T:
    """Run fn, retrying transient errors with exponential backoff; StorageError otherwise."""
    attempts, base, cap = _retry_settings()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            if not _is_transient(exc):
                raise _error(uri, action, exc) from None
            if attempt == attempts:
                raise StorageError(
                    f"{uri}: {action} gave up after {attempts} attempts "
                    f"(last error: {_redact(_describe(exc))})"
                ) from None
            delay = min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning(
                "%s: %s failed (%s); retry %d of %d in %.2f s",
                uri,
                action,
                _redact(_describe(exc)),
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- GCS client

_clients = threading.local()


def _client(uri: str):
    """A google-cloud-storage client per thread and process, built from the environment."""
    key = (
        os.getpid(),
        os.environ.get("STORAGE_EMULATOR_HOST"),
        os.environ.get("API_ENDPOINT_OVERRIDE"),
    )
    cache = getattr(_clients, "by_key", None)
    if cache is None:
        cache = _clients.by_key = {}
    if key not in cache:
        from google.cloud import storage

        try:
            cache[key] = storage.Client()
        except Exception as exc:
            raise _error(uri, "connecting to Cloud Storage", exc) from None
    return cache[key]


def _blob(uri: str, generation: int | None = None):
    bucket, key = split_gs(uri)
    if not key:
        raise StorageError(f"{uri}: names a bucket, not an object")
    return _client(uri).bucket(bucket).blob(key, generation=generation)


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its URI, size and the hashes/generation GCS reports."""

    uri: str
    size: int
    generation: int | None = None
    crc32c: str | None = None
    md5: str | None = None


def _info(bucket: str, blob) -> ObjectInfo:
    return ObjectInfo(
        f"gs://{bucket}/{blob.name}",
        int(blob.size or 0),
        blob.generation,
        blob.crc32c,
        blob.md5_hash,
    )


def list_objects(uri: str) -> list[ObjectInfo]:
    """Every object under the gs:// prefix `uri/` (recursive), sorted by name."""
    bucket, key = split_gs(uri)

    def run() -> list[ObjectInfo]:
        blobs = _client(uri).list_blobs(bucket, prefix=_prefix(key), retry=None)
        return [_info(bucket, b) for b in blobs if not b.name.endswith("/")]

    return sorted(_call(uri, "listing", run), key=lambda o: o.uri)


def stat(uri: str) -> ObjectInfo | None:
    """The object's info, or None when it does not exist (a missing bucket raises)."""
    if not is_remote(uri):
        p = Path(uri)
        return ObjectInfo(str(p), p.stat().st_size) if p.is_file() else None
    bucket, key = split_gs(uri)

    def run():
        return _client(uri).bucket(bucket).get_blob(key, retry=None)

    blob = _call(uri, "reading metadata", run)
    if blob is None:
        missing = _not_found(uri, "reading metadata")
        if isinstance(missing, BucketNotFoundError):
            raise missing
        return None
    return _info(bucket, blob)


def exists(uri: str) -> bool:
    """Whether a local file/directory or a GCS object exists."""
    if not is_remote(uri):
        return Path(uri).exists()
    return stat(uri) is not None


# ----------------------------------------------------------------------------- bytes, files


def read_bytes(uri: str) -> bytes:
    """The whole content of a small file or object."""
    if not is_remote(uri):
        try:
            return Path(uri).read_bytes()
        except OSError as exc:
            raise _error(uri, "reading", exc) from None
    blob = _blob(uri)
    return _call(uri, "download", lambda: blob.download_as_bytes(retry=None))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a file/object so that readers see either the old or the whole new content."""
    if is_remote(uri):
        blob = _blob(uri)
        _call(
            uri,
            "upload",
            lambda: blob.upload_from_string(data, content_type=_content_type(uri), retry=None),
        )
        return
    target = Path(uri)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise _error(uri, "writing", exc) from None


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def upload_file(path: str | Path, uri: str) -> None:
    """Upload one local file to a gs:// object (retried as a whole on transient errors)."""
    blob = _blob(uri)
    blob.chunk_size = UPLOAD_CHUNK
    content_type = _content_type(uri)

    def run() -> None:
        blob.upload_from_filename(str(path), content_type=content_type, retry=None)

    _call(uri, "upload", run)


def upload_tree(local_dir: str | Path, uri: str) -> list[str]:
    """Upload every file under local_dir to uri/ (no marker); returns the relative names."""
    root = Path(local_dir)
    names = [rel for rel, _ in _walk_files(root, uri)]
    for rel in names:
        upload_file(root / rel, join(uri, rel))
    return names


def download_file(uri: str, path: str | Path, generation: int | None = None) -> None:
    """Download one object to a local file atomically (temp file + rename)."""
    target = Path(path)
    blob = _blob(uri, generation)

    def run() -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                blob.download_to_file(fh, retry=None)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    _call(uri, "download", run)


def read_range(uri: str, start: int, stop: int, generation: int | None = None) -> bytes:
    """Bytes [start, stop) of a file or object (the stored bytes: no transcoding)."""
    if stop <= start:
        return b""
    if not is_remote(uri):
        try:
            with open(uri, "rb") as fh:
                fh.seek(start)
                data = fh.read(stop - start)
        except OSError as exc:
            raise _error(uri, "reading", exc) from None
    else:
        # Pinning the generation makes a replaced object fail loudly instead of mixing data.
        blob = _blob(uri, generation)
        data = _call(
            uri,
            "ranged read",
            lambda: blob.download_as_bytes(
                start=start, end=stop - 1, raw_download=True, checksum=None, retry=None
            ),
        )
    if len(data) != stop - start:
        raise StorageError(
            f"{uri}: bytes [{start}, {stop}) could not be read; the file is "
            "shorter than expected or changed while being read"
        )
    return data


def download_range(uri: str, fh, start: int, stop: int, generation: int | None = None) -> None:
    """Stream bytes [start, stop) of an object into fh at the same offset (flat memory)."""
    blob = _blob(uri, generation)

    def run() -> None:
        fh.seek(start)
        blob.download_to_file(
            fh, start=start, end=stop - 1, raw_download=True, checksum=None, retry=None
        )
        if fh.tell() != stop:
            raise StorageError(
                f"{uri}: bytes [{start}, {stop}) could not be read; the object "
                "is shorter than expected or changed while being read"
            )

    if stop > start:
        _call(uri, "ranged read", run)


# ----------------------------------------------------------------------------- hashing


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


# ----------------------------------------------------------------------------- staged outputs


def _walk_files(root: Path, where: str) -> list[tuple[str, Path]]:
    """(relative posix name, path) of every regular file under root, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                rel = path.relative_to(root).as_posix()
                raise StorageError(
                    f"{where}: {rel} is a link or special file; only regular files can be published"
                )
        out += [
            (Path(dirpath, n).relative_to(root).as_posix(), Path(dirpath, n)) for n in filenames
        ]
    return sorted(out)


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
    """A verified local copy of a published msif output directory.

    Local directories are returned as they are once every file matches the manifest;
    gs:// outputs are downloaded into a cache keyed by the manifest and verified by sha256
    (a valid cached copy is reused).
    """
    if not is_remote(uri):
        if not Path(uri).is_dir():
            raise StorageError(f"{uri}: no such directory")
        _verify_tree(Path(uri), read_manifest(uri), uri)
        return Path(uri)
    marker_bytes = _read_marker(uri)
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
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        for rel in sorted(manifest["files"]):
            download_file(join(uri, rel), stage / rel)
        _verify_tree(stage, manifest, uri)
        (stage / MARKER).write_bytes(marker_bytes)
        try:
            os.rename(stage, dest)
        except OSError:
            # Another process finished the same download first; theirs is as good.
            _verify_tree(dest, manifest, uri)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest


def fetch_model_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local directory for from_pretrained: a local model dir as is, or a gs:// copy.

    The top-level objects of a gs:// prefix are mirrored into the cache; every file is
    checked against the object's crc32c (or md5) and downloaded again when it does not match.
    """
    if not is_remote(uri):
        path = Path(uri)
        if not path.is_dir():
            raise StorageError(f"{uri}: no such model directory")
        if not (path / "config.json").is_file():
            raise StorageError(f"{uri} is not a model directory: no config.json")
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
    if "config.json" not in rels:
        raise StorageError(f"{uri} is not a model directory: no config.json")
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
