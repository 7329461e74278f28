"""``python -m bpleader.sim`` as a separate process, driven through its control API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bpleader.sim import SimControl, SimControlError
from bpleader.sim.cli import main


def read_ready(path: Path, proc: subprocess.Popen[str], timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the simulator never became ready"
        time.sleep(0.05)
    ready: dict[str, Any] = json.loads(path.read_text())
    return ready


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    ready_file = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bpleader.sim", "--producer", "mybp", "--nodes", "bp-a,bp-b",
         "--block-interval", "0.1", "--pause-on-startup", "bp-b",
         "--ready-file", str(ready_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield proc, read_ready(ready_file, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_process_driven_by_sim_control_then_sigterm(
        sim_process: tuple[subprocess.Popen[str], dict[str, Any]]) -> None:
    proc, ready = sim_process
    assert set(ready["nodes"]) == {"bp-a", "bp-b"}
    a_url = ready["nodes"]["bp-a"]
    with SimControl(ready["control"]) as ctl:
        nodes = {n["name"]: n for n in ctl.nodes()}
        assert nodes["bp-a"]["url"] == a_url and nodes["bp-a"]["paused"] is False
        assert nodes["bp-b"]["paused"] is True and nodes["bp-b"]["up"] is True
        ctl.wait_slots(3)
        assert ctl.ledger()["blocks_by_node"]["bp-a"] >= 2

        assert ctl.fault("bp-a", "lag", seconds=1.5)["faults"] == {"lag": {"seconds": 1.5}}
        assert ctl.clear("bp-a", "lag")["faults"] == {}
        ctl.fault("bp-a", "http_500")
        assert httpx.post(a_url + "/v1/producer/paused").status_code == 500
        ctl.clear("bp-a")
        assert httpx.post(a_url + "/v1/producer/paused").status_code == 201

        assert ctl.kill("bp-a")["up"] is False
        with pytest.raises(httpx.ConnectError):
            httpx.post(a_url + "/v1/chain/get_info")
        assert ctl.start("bp-a")["up"] is True
        assert ctl.restart("bp-a", 0.3)["faults"] == {"restart": {"down": 0.3}}
        deadline = time.monotonic() + 5
        while not ctl.node("bp-a")["up"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        with pytest.raises(SimControlError) as err:
            ctl.fault("bp-z", "desync")
        assert err.value.status == 404 and "bp-z" in str(err.value)
        with pytest.raises(SimControlError) as err:
            ctl.fault("bp-a", "melt")
        assert err.value.status == 400 and "melt" in str(err.value)
        with pytest.raises(SimControlError) as err:
            ctl.restart("bp-a", -1)
        assert err.value.status == 400

        # Split brain on purpose: resume the standby too.
        httpx.post(ready["nodes"]["bp-b"] + "/v1/producer/resume")
        ctl.wait_slots(3)
        slots = ctl.slots(since=0)
        assert slots and all({"slot", "producer", "blocks", "lateness_ms"} <= set(r)
                             for r in slots)
        assert any(len(r["blocks"]) == 2 for r in slots)
        resp = httpx.get(ready["control"] + "/nope")
        assert resp.status_code == 404 and "error" in resp.json()
        assert httpx.get(ready["control"] + "/nodes/bp-a/kill").status_code == 405

    proc.send_signal(signal.SIGTERM)
    out, err_text = proc.communicate(timeout=10)
    assert proc.returncode == 0, err_text
    lines = out.strip().splitlines()
    assert json.loads(lines[0]) == ready
    summary = json.loads(lines[-1])
    assert summary["double_produced_slots"] >= 1 and summary["producer"] == "mybp"


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nodes", "bp-a"]) == 2  # no --producer
    assert main(["--producer", "mybp", "--nodes", "bp-a", "--block-interval", "0.0001"]) == 2
    assert "block_interval" in capsys.readouterr().err
    assert main(["--producer", "mybp", "--nodes", "bp-a", "--pause-on-startup", "bp-z"]) == 2
    assert main(["--producer", "mybp", "--nodes", "bp-a", "--pause-on-startup", "bp-a",
                 "--pause-on-startup-all"]) == 2


def test_help_explains_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "double-produce" in text and "--pause-on-startup" in text and "freeze_api" in text
