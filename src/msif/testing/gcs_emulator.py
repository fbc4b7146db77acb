"""A real GCS emulator process on 127.0.0.1, and a fault-injecting proxy in front of it.

Used by the tests and by CI: `python -m msif.testing` starts an emulator,
creates the `msif-test` bucket, prints `STORAGE_EMULATOR_HOST=...` and serves until
interrupted.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_BUCKET = "msif-test"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


class EmulatorError(RuntimeError):
    """The emulator could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_command(port: int) -> list[str]:
    """The command line that starts gcp-storage-emulator in memory on 127.0.0.1:port."""
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    found = str(exe) if exe.exists() else shutil.which("gcp-storage-emulator")
    if found is None:
        raise EmulatorError(
            "gcp-storage-emulator is not installed (pip install gcp-storage-emulator, or msif[dev])"
        )
    return [found, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Emulator:
    """A running emulator: its endpoint URL (scheme, host and port) and process."""

    endpoint: str
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)

    def create_bucket(self, name: str = DEFAULT_BUCKET) -> None:
        """Create a bucket (no error when it already exists)."""
        create_bucket(self.endpoint, name)

    def wipe(self) -> None:
        """Delete every object and bucket."""
        with urllib.request.urlopen(f"{self.endpoint}/wipe", timeout=10):
            pass


def create_bucket(endpoint: str, name: str = DEFAULT_BUCKET, project: str = "test") -> None:
    """Create a bucket on the emulator at endpoint (idempotent)."""
    from google.api_core.exceptions import Conflict
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )
    try:
        client.create_bucket(name)
    except Conflict:
        pass


@contextmanager
def gcs_emulator(timeout: float = 30.0, attempts: int = 3) -> Iterator[Emulator]:
    """Start gcp-storage-emulator on a free port; stop it on exit."""
    log_dir = Path(tempfile.mkdtemp(prefix="msif-gcs-emulator-"))
    process = None
    try:
        for attempt in range(1, attempts + 1):
            # Another process may take the free port before the emulator binds it: retry.
            process, endpoint = _start(log_dir / "emulator.log", timeout, last=attempt == attempts)
            if process is not None:
                break
        yield Emulator(endpoint, process, log_dir / "emulator.log")
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(log_dir, ignore_errors=True)


def _start(log_path: Path, timeout: float, last: bool) -> tuple[subprocess.Popen | None, str]:
    port = free_port()
    # Logs go to a file: an undrained pipe would block the emulator once it fills.
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            emulator_command(port),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not _answers(endpoint + "/"):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            if not last:
                return None, endpoint
            tail = log_path.read_text(errors="replace")[-2000:]
            raise EmulatorError(
                f"gcp-storage-emulator did not start on port {port}: {tail.strip() or 'no output'}"
            )
        time.sleep(0.1)
    return process, endpoint


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# ----------------------------------------------------------------------------- fault proxy


@dataclass
class Faults:
    """What the proxy breaks: the first `fail_first` requests (matching `pattern`, if set).

    mode "status" answers `status` (503 by default); mode "reset" closes the connection
    without an answer. fail_first=None breaks every matching request.
    """

    fail_first: int | None = 0
    pattern: str | None = None
    status: int = 503
    mode: str = "status"

    def __post_init__(self) -> None:
        if self.mode not in ("status", "reset"):
            raise ValueError(f"Faults.mode must be 'status' or 'reset', not {self.mode!r}")


@dataclass
class Seen:
    """One request the proxy received: method, path+query, the answer and its body size.

    `body_head` keeps the first KiB of the request body (multipart uploads name the object
    there); `authorization` the Authorization header, so tests can check what was sent.
    """

    method: str
    path: str
    status: int
    injected: bool
    response_bytes: int
    body_head: bytes = field(default=b"", repr=False)
    authorization: str | None = field(default=None, repr=False)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to upstream and injects failures."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = faults or Faults()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._matched = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def set_faults(self, faults: Faults) -> None:
        """Replace the fault plan and reset its counter."""
        with self._lock:
            self.faults = faults
            self._matched = 0

    @property
    def injected(self) -> int:
        """How many requests were failed on purpose."""
        with self._lock:
            return sum(1 for s in self.seen if s.injected)

    def clear(self) -> None:
        """Forget the requests seen so far."""
        with self._lock:
            self.seen.clear()

    def _should_fail(self, method: str, path: str) -> bool:
        with self._lock:
            f = self.faults
            if f.pattern is not None and not re.search(f.pattern, f"{method} {path}"):
                return False
            self._matched += 1
            return f.fail_first is None or self._matched <= f.fail_first

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def start(self) -> FaultProxy:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    length = handler.headers.get("Content-Length")
    if length is not None:
        return handler.rfile.read(int(length))
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()
                return body
            body += handler.rfile.read(size)
            handler.rfile.readline()
    return b""


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    up = urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            body = _read_body(self)
            auth = self.headers.get("Authorization")
            if proxy._should_fail(self.command, self.path):
                self._inject(body, auth)
                return
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            conn.close()
            # Record before answering: the client may inspect `seen` as soon as it has the answer.
            proxy._record(
                Seen(self.command, self.path, response.status, False, len(data), body[:1024], auth)
            )
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() in _HOP_BY_HOP:
                    continue
                if k.lower() == "location":
                    v = v.replace(proxy.upstream, proxy.endpoint)
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _inject(self, body: bytes, auth: str | None) -> None:
            f = proxy.faults
            proxy._record(Seen(self.command, self.path, f.status, True, 0, body[:1024], auth))
            if f.mode == "reset":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            data = b'{"error": {"code": %d, "message": "injected by msif FaultProxy"}}' % f.status
            self.send_response(f.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
            pass

    return Handler


@contextmanager
def fault_proxy(upstream: str, faults: Faults | None = None) -> Iterator[FaultProxy]:
    """A started FaultProxy in front of upstream, stopped on exit."""
    proxy = FaultProxy(upstream, faults).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve an emulator with the given buckets until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bucket",
        action="append",
        default=None,
        help=f"bucket to create (repeatable; default {DEFAULT_BUCKET})",
    )
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with gcs_emulator() as emulator:
        for name in args.bucket or [DEFAULT_BUCKET]:
            emulator.create_bucket(name)
        print(f"STORAGE_EMULATOR_HOST={emulator.endpoint}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
