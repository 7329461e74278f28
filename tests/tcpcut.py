"""A TCP forwarder that can be cut: a partition between one agent and etcd, on loopback.

Each agent under test can be given its own forwarders to the etcd members; ``cut()``
silently drops every byte both ways (connections stay open, as in a partition where
packets vanish, so the agent sees timeouts, not refusals), ``heal()`` lets them through
again.
"""

from __future__ import annotations

import selectors
import socket
import threading
from types import TracebackType


class CuttableProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.cut_now = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"tcpcut-{self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CuttableProxy:
        self._thread.start()
        return self

    def cut(self) -> None:
        self.cut_now.set()

    def heal(self) -> None:
        self.cut_now.clear()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> CuttableProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        self._listener.setblocking(False)
        sel.register(self._listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            try:
                events = sel.select(timeout=0.1)
            except (OSError, ValueError):
                break
            for key, _ in events:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    try:
                        client, _addr = self._listener.accept()
                        upstream = socket.create_connection(self.target, timeout=2)
                    except OSError:
                        continue
                    for s in (client, upstream):
                        s.setblocking(False)
                        sel.register(s, selectors.EVENT_READ, None)
                    peers[client], peers[upstream] = upstream, client
                    continue
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                other = peers.get(sock)
                if not data or other is None:
                    for s in (sock, other):
                        if s is not None:
                            peers.pop(s, None)
                            try:
                                sel.unregister(s)
                            except (KeyError, ValueError):
                                pass
                            s.close()
                    continue
                if self.cut_now.is_set():
                    continue  # the packets vanish
                try:
                    other.setblocking(True)
                    other.sendall(data)
                    other.setblocking(False)
                except OSError:
                    pass
        for s in list(peers):
            s.close()
        sel.close()
