"""A small threaded HTTP/1.1 server on TCP or a unix socket that can be cut off at once.

Why not plain ``http.server``: a stopped nodeos must stop answering *everything*, and
``shutdown()`` only stops accepting new connections, while keep-alive connections (every
agent keeps one) would go on being served by their threads. This server tracks its open
connections and shuts them down when it stops, so a killed node really goes silent, and
its handler can answer a request with ``None`` to drop the connection unanswered.
Each connection has its own thread, so one frozen request never blocks the others.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, cast

log = logging.getLogger("bpleader.sim.httpd")

JSON = "application/json"


@dataclass(frozen=True)
class Request:
    """``cancelled`` is set when the server that received the request stops."""

    method: str
    path: str
    body: bytes
    cancelled: threading.Event


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON


Handler = Callable[[Request], Response | None]


_Conn = socket.socket | tuple[bytes, socket.socket]


class _Tracking(socketserver.ThreadingMixIn):
    """A thread per connection, and a record of open connections so stop() can cut them."""

    daemon_threads = True
    service: HTTPService

    def process_request(self, request: _Conn, client_address: Any) -> None:
        if isinstance(request, socket.socket):
            with self.service.conn_lock:
                self.service.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: _Conn) -> None:
        if isinstance(request, socket.socket):
            with self.service.conn_lock:
                self.service.connections.discard(request)
        super().shutdown_request(request)  # type: ignore[misc]

    def handle_error(self, request: _Conn, client_address: Any) -> None:
        # A connection cut by stop() or by the client ends its thread with an OSError;
        # that is the point, not an error worth a traceback.
        log.debug("connection ended abruptly on %s", self.service.url, exc_info=True)


class _TCPServer(_Tracking, socketserver.TCPServer):
    allow_reuse_address = True


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(_Tracking, socketserver.UnixStreamServer):
    pass


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bpleader-sim"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        service = cast(_Tracking, self.server).service
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "bad body framing")
            return
        try:
            response = service.handler(Request(self.command, self.path, body,
                                               service.stopping))
        except Exception:
            # A bug in the simulator must be loud, never a silent hang for the client.
            log.exception("handler failed on %s %s %s", service.url, self.command, self.path)
            response = Response(500, b'{"error": "simulator bug, see its log"}')
        if response is None:
            self.close_connection = True
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, cast(_Tracking, self.server).service.url, *args)


class HTTPService:
    """One listening socket and its connections; :meth:`start` again after :meth:`stop`.

    A TCP service keeps its port across restarts (port 0 picks one at the first start),
    so a restarted node is found at the same URL, like a restarted nodeos.
    """

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0,
                 unix_path: Path | None = None,
                 on_stop: Callable[[], None] = lambda: None) -> None:
        self.handler = handler
        self.on_stop = on_stop
        self.host, self.port, self.unix_path = host, port, unix_path
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        self.stopping = threading.Event()
        self._server: _TCPServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        self.stopping = threading.Event()
        server: _TCPServer | _UnixServer
        if self.unix_path is not None:
            # A stopped nodeos leaves its socket file behind; a new one replaces it.
            if self.unix_path.is_socket():
                self.unix_path.unlink()
            server = _UnixServer(str(self.unix_path), _RequestHandler, bind_and_activate=True)
        else:
            cls = _TCP6Server if ":" in self.host else _TCPServer
            server = cls((self.host, self.port), _RequestHandler)
            self.port = server.server_address[1]
        server.service = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": 0.05}, name=f"sim-http {self.url}", daemon=True)
        self._thread.start()
        log.debug("listening on %s", self.url)

    def stop(self) -> None:
        """Stop listening and cut every open connection; the socket file stays (stale)."""
        server, self._server = self._server, None
        if server is None:
            return
        self.stopping.set()
        self.on_stop()  # wakes handlers waiting on a fault, so they see ``cancelled``
        server.shutdown()
        server.server_close()
        with self.conn_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join()
        log.debug("stopped %s", self.url)

    def remove_socket_file(self) -> None:
        if self.unix_path is not None and self.unix_path.is_socket():
            os.unlink(self.unix_path)
