"""A real local HTTP server that records POSTs and answers as a test tells it: ok, a
status code, a number of failures first, or hang (accept, read, never answer)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    body: Any
    at: float


@dataclass
class Hook:
    """``mode``: "ok", "hang"; ``fail_first`` requests answer ``fail_status`` first."""

    mode: str = "ok"
    status: int = 200
    fail_first: int = 0
    fail_status: int = 503
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self, path: str | None = None) -> list[Any]:
        with self.lock:
            return [r.body for r in self.received if path is None or r.path == path]


class HookServer:
    def __init__(self, hook: Hook) -> None:
        self.hook = hook
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hook))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HookServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hook.release.set()
        self.server.shutdown()
        self.server.server_close()


def _handler(hook: Hook) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            with hook.lock:
                hook.received.append(Received(self.path, body, time.monotonic()))
                n = len(hook.received)
            if hook.mode == "hang":
                hook.release.wait(120)
                return
            status = hook.fail_status if n <= hook.fail_first else hook.status
            payload = b'{"status":"success"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
