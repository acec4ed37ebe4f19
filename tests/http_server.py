"""A real HTTP server on 127.0.0.1 for download tests: Range requests, Basic auth, cut transfers."""

from __future__ import annotations

import base64
import contextlib
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    """One request as the server received it."""

    path: str  # with its query string, as requested
    range: str | None


@dataclass
class ServerState:
    """What the test server serves and how it misbehaves; tests mutate it."""

    files: dict[str, bytes] = field(default_factory=dict)
    credentials: tuple[str, str] | None = None
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before closing, first request only
    ignore_range: bool = False
    requests: list[Seen] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ServerState  # set on a subclass per server

    def do_GET(self) -> None:
        state = self.state
        state.requests.append(Seen(self.path, self.headers.get("Range")))
        if state.credentials is not None:
            token = base64.b64encode(":".join(state.credentials).encode()).decode()
            if self.headers.get("Authorization") != f"Basic {token}":
                self._empty(401, {"WWW-Authenticate": 'Basic realm="vox"'})
                return
        body = state.files.get(self.path.split("?", 1)[0])  # a signed URL's query does not change the file
        if body is None:
            self._empty(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not state.ignore_range:
            start = int(match[1])
            if start >= len(body):
                self._empty(416, {"Content-Range": f"bytes */{len(body)}"})
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = state.cut_after.pop(self.path, None)
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True  # the client sees fewer bytes than Content-Length promised
            return
        self.wfile.write(payload)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client hanging up mid-response (download() does on a wrong size) is expected here."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Server:
    state: ServerState
    base: str  # http://127.0.0.1:PORT

    def serve(self, path: str, body: bytes) -> str:
        self.state.files[path] = body
        return self.base + path


@contextlib.contextmanager
def running_server() -> Iterator[Server]:
    state = ServerState()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield Server(state, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
