"""The guard process (layer 8) against the simulator: it pauses at its deadline, and when
nodeos will not confirm a pause it runs the configured kill command, once per deadline."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpleader.clock import boottime
from bpleader.fence import GuardProcess
from bpleader.guard import pause_confirmed, post
from bpleader.sim import SimCluster
from harness import CHAIN, PRODUCER, wait_for


@pytest.fixture
def sim() -> Iterator[SimCluster]:
    with SimCluster(PRODUCER, ["bp-a"], pause_on_startup=False, **CHAIN) as cluster:
        yield cluster


def guard(url: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bpleader.guard", "--url", url,
                             "--timeout", "0.2", "--check-interval", "0.2", "--node", "bp-a",
                             *extra], stdin=subprocess.PIPE, stderr=subprocess.PIPE)


def arm(proc: subprocess.Popen[bytes], at: float) -> None:
    assert proc.stdin is not None
    proc.stdin.write(f"arm {at}\n".encode())
    proc.stdin.flush()


def test_guard_pauses_at_the_deadline_and_exits_when_orphaned(sim: SimCluster) -> None:
    node = sim.node("bp-a")
    assert node.producing
    proc = guard(node.url)
    try:
        arm(proc, boottime() + 0.5)
        time.sleep(0.2)
        assert not node.paused  # not before its time
        assert proc.stdin is not None
        proc.stdin.close()  # the agent dies: the armed guard still fences, then exits
        wait_for(lambda: node.paused, 5, what="the guard's pause")
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


def test_guard_runs_the_kill_command_once_when_the_pause_is_never_confirmed(
        sim: SimCluster, tmp_path: Path) -> None:
    node = sim.node("bp-a")
    node.set_fault("freeze_api")  # accepts, never answers; production goes on
    marker = tmp_path / "killed"
    proc = guard(node.url, "--kill-command", f"sh -c 'echo x >> {marker}'")
    try:
        arm(proc, boottime())
        wait_for(marker.exists, 10, what="the kill command")
        time.sleep(1.5)  # several more enforcement rounds, still unconfirmed
        assert marker.read_text() == "x\n"  # once per deadline, not once per round
        arm(proc, boottime())  # a new deadline may kill again
        wait_for(lambda: marker.read_text() == "x\nx\n", 10, what="a second kill")
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert b"event=fence_kill " in err


def test_the_guard_loads_nothing_of_the_agents_stacks() -> None:
    """A guard runs beside every agent for as long as it does: it must stay a few MiB."""
    code = "import sys, bpleader.guard; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                text=True, check=True).stdout.split())
    assert "bpleader.guard" in loaded
    heavy = {"asyncio", "httpx", "http.client", "ssl", "email", "grpc", "pyetcd",
             "prometheus_client", "bpleader.nodeos", "bpleader.agent"}
    assert not heavy & loaded


def test_every_fence_pauses_the_same_way_over_tcp_and_a_unix_socket(tmp_path: Path) -> None:
    with SimCluster(PRODUCER, ["bp-a"], pause_on_startup=False, **CHAIN) as tcp:
        node = tcp.node("bp-a")
        assert pause_confirmed(node.url, 0.5, 2.0) == (True, "paused confirmed")
        assert node.paused
        node.set_fault("freeze_api")
        ok, reason = pause_confirmed(node.url, 0.2, 0.5)
        assert not ok and reason == "timed out after 0.20 s"
    ok, reason = pause_confirmed(tcp.node("bp-a").url, 0.2, 0.3)  # stopped: refused
    assert not ok and reason.startswith("unreachable: ConnectionRefusedError")
    with SimCluster(PRODUCER, ["bp-a"], pause_on_startup=False, unix_dir=tmp_path,
                    **CHAIN) as uds:
        node = uds.node("bp-a")
        assert node.url.startswith("unix://")
        assert pause_confirmed(node.url, 0.5, 2.0) == (True, "paused confirmed")
        assert node.paused


def _replying(reply: bytes) -> str:
    """An HTTP server answering every connection with ``reply`` as raw bytes; its URL."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(reply)

    threading.Thread(target=answer, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("reply, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ntrue", (200, b"true")),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\ntr\r\n2\r\nue\r\n0\r\n\r\n",
     (200, b"true")),
    (b"HTTP/1.0 500 Internal Server Error\r\n\r\n{\"code\":500}", (500, b'{"code":500}')),
])
def test_the_guards_http_reads_each_framing(reply: bytes, expected: tuple[int, bytes]) -> None:
    assert post(_replying(reply), "/v1/producer/paused", 2.0) == expected


@pytest.mark.parametrize("reply, reason", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfalse", "paused still reads false"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n\"1\"", "paused: not a boolean"),
    (b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n", "pause: HTTP 503"),
    (b"garbage", "not an HTTP reply"),
])
def test_only_a_json_true_confirms_a_pause(reply: bytes, reason: str) -> None:
    ok, why = pause_confirmed(_replying(reply), 0.5, 0.05)
    assert not ok and why.startswith(reason), why


def test_the_guard_is_given_the_url_but_shows_it_redacted(sim: SimCluster) -> None:
    node = sim.node("bp-a")
    assert node.producing
    secret = "n0de0s-pa55"
    url = node.url.replace("http://", f"http://op:{secret}@")
    guard_proc = GuardProcess(url, 0.2, 0.2, "bp-a")
    guard_proc.start()
    try:
        guard_proc.arm(boottime())
        wait_for(lambda: node.paused, 5, what="the guard's pause with the real URL")
        assert guard_proc._proc is not None
        cmdline = Path(f"/proc/{guard_proc._proc.pid}/cmdline").read_bytes()
        assert secret.encode() not in cmdline and b"op:***@" in cmdline
    finally:
        guard_proc.disarm()
        guard_proc.stop()
    out = subprocess.run([sys.executable, "-c", "import sys; from bpleader.fence import "
                          "fence_command; sys.exit(fence_command(sys.argv[1], 0.2, 0.3))",
                          url.rsplit(":", 1)[0] + ":1"], capture_output=True, text=True)
    assert out.returncode == 1 and "op:***@" in out.stderr and secret not in out.stderr
