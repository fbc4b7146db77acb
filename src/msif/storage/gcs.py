"""Google Cloud Storage access: the client, retries, one-line errors, object operations.

Credentials come only from the environment (ADC / Workload Identity, or
STORAGE_EMULATOR_HOST for an emulator). Transient GCS errors are retried with bounded
exponential backoff; permanent ones raise a one-line StorageError at once, with secrets
redacted. The file and object operations accept local paths too where callers need both.
"""

from __future__ import annotations

import http
import logging
import mimetypes
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from msif.storage.uri import (
    BucketNotFoundError,
    NotFoundError,
    StorageError,
    _prefix,
    is_remote,
    join,
    split_gs,
)

log = logging.getLogger("msif")

UPLOAD_CHUNK = 32 << 20  # resumable upload chunk; bounds the memory of large uploads
_SECRET_RE = re.compile(
    r"(Bearer\s+\S+|ya29\.[\w.-]+|(access_token|refresh_token|client_secret|token)=[^&\s]+"
    r"|-----BEGIN[^-]*-----.*?-----END[^-]*-----)",
    re.IGNORECASE | re.DOTALL,
)
T = TypeVar("T")


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


def list_top_level(uri: str, action: str = "listing") -> tuple[list[str], list[str]]:
    """(object names, sub-prefix names) directly under the gs:// prefix `uri/`, sorted.

    Names are relative to uri, without slashes; a folder placeholder object (`uri/` itself,
    as consoles create) is left out. action names the operation in errors.
    """
    bucket, key = split_gs(uri)
    start = len(_prefix(key))

    def run() -> tuple[list[str], list[str]]:
        pages = _client(uri).list_blobs(bucket, prefix=_prefix(key), delimiter="/", retry=None)
        names = [b.name[start:] for b in pages if b.name[start:]]
        return sorted(names), sorted(p[start:].rstrip("/") for p in pages.prefixes)

    return _call(uri, action, run)


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


def read_bytes(uri: str, generation: int | None = None) -> bytes:
    """The whole content of a small file or object (of that generation, when given)."""
    if not is_remote(uri):
        try:
            return Path(uri).read_bytes()
        except OSError as exc:
            raise _error(uri, "reading", exc) from None
    blob = _blob(uri, generation)
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


def download_file(uri: str, path: str | Path, generation: int | None = None) -> None:
    """Download one object to a local file atomically (temp file + rename).

    A local failure (a full disk, a read-only cache) is a StorageError naming the local path.
    """
    target = Path(path)
    blob = _blob(uri, generation)

    def run() -> None:
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            with os.fdopen(fd, "wb") as fh:
                blob.download_to_file(fh, retry=None)
            os.replace(tmp, target)
        except OSError as exc:
            if not _is_local_failure(exc):
                raise
            raise StorageError(
                f"{uri}: download to {target} failed: {exc.strerror or type(exc).__name__}"
            ) from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    _call(uri, "download", run)


def _is_local_failure(exc: OSError) -> bool:
    """An OSError of the local file system, as opposed to one of the connection to GCS."""
    import ssl

    import requests

    # requests' and ssl's errors are OSErrors too: those are the network's, for _call.
    network = (requests.RequestException, ConnectionError, TimeoutError, ssl.SSLError)
    return exc.errno is not None and not isinstance(exc, network)


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
