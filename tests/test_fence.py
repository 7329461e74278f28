"""The guard process (layer 8) against the simulator: it pauses at its deadline, and when
nodeos will not confirm a pause it runs the configured kill command, once per deadline."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpleader.clock import boottime
from bpleader.sim import SimCluster
from harness import CHAIN, PRODUCER, wait_for


@pytest.fixture
def sim() -> Iterator[SimCluster]:
    with SimCluster(PRODUCER, ["bp-a"], pause_on_startup=False, **CHAIN) as cluster:
        yield cluster


def guard(url: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bpleader.fence", "--url", url,
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
