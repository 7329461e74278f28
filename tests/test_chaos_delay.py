"""The chaos benchmark's delaying proxy (etcd across regions without tc netem): it adds
its delay each way, keeps the bytes in order and passes a close on."""

from __future__ import annotations

import socket
import threading
import time

from harness import start_delay_proxy

DELAY = 0.06


def _echo(server: socket.socket) -> None:
    """Echo every connection (the proxy's start-up check opens one of its own)."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return  # closed at the end of the test
        threading.Thread(target=_echo_one, args=(conn,), daemon=True).start()


def _echo_one(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def test_the_proxy_delays_each_way_in_order_and_passes_the_close_on() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_echo, args=(server,), daemon=True).start()
    port, proxy = start_delay_proxy(f"127.0.0.1:{server.getsockname()[1]}", DELAY)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
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
