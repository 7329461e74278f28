"""The chaos benchmark's delaying proxy (etcd across regions without tc netem): it adds
its delay each way, keeps the bytes in order and passes a close on."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DELAY = 0.06


def _echo(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def test_the_proxy_delays_each_way_in_order_and_passes_the_close_on() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_echo, args=(server,), daemon=True).start()
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.chaos.delay", "--listen", f"127.0.0.1:{port}",
         "--to", f"127.0.0.1:{server.getsockname()[1]}", "--delay", str(DELAY)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the proxy never listened"
                time.sleep(0.05)
        with conn:
            started = time.monotonic()
            for i in range(20):  # one burst: order must hold across many small writes
                conn.sendall(b"%02d" % i)
            got = b""
            while len(got) < 40:
                got += conn.recv(4096)
            rtt = time.monotonic() - started
            assert got == b"".join(b"%02d" % i for i in range(20))
            assert 2 * DELAY <= rtt < 2 * DELAY + 1.0
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(10) == b""  # the echo server saw the close and closed too
    finally:
        proxy.terminate()
        proxy.wait(5)
        server.close()
