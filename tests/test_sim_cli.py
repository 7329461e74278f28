"""``python -m bpleader.sim`` as a separate process, driven through its control API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from bpleader.antelope import (
    decode_bls_public_key,
    new_private_key,
    public_key_of,
    sign_actfinkey,
)
from bpleader.sim import SimControl, SimControlError
from bpleader.sim.cli import main

FINKEY = new_private_key(b"test_sim_cli finkey")
FINKEY_PUB = public_key_of(FINKEY)


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
    assert set(ready["finalizer_keys"]) == {"bp-a", "bp-b"}  # Savanna by default
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
    capsys.readouterr()
    base = ["--producer", "mybp", "--nodes", "bp-a"]
    for bad in (["--vote-timeout", "-1"], ["--vote-timeout", "soon"],
                ["--vote-timeout", "nan"], ["--finalizer-permission", "finkey"],
                ["--finalizer-permission", f"FinKey={FINKEY_PUB}"],
                ["--finalizer-permission", "finkey=PUB_K1_garbage"],
                ["--legacy", "--vote-timeout", "1"],
                ["--legacy", "--finalizer-permission", f"finkey={FINKEY_PUB}"]):
        assert main(base + bad) == 2, bad
        assert "error" in capsys.readouterr().err, bad


def test_help_explains_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "double-produce" in text and "--pause-on-startup" in text and "freeze_api" in text
    for option in ("--legacy", "--vote-timeout", "--finalizer-permission", "NAME=PUB_K1_",
                   "GET /finalizers", '"finalizer_keys"', "actfinkey", "implicit pause"):
        assert option in text, option


def start_sim(tmp_path: Path, *options: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    ready_file = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bpleader.sim", "--producer", "mybp", "--nodes", "bp-a,bp-b",
         "--block-interval", "0.1", "--ready-file", str(ready_file), *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        return proc, read_ready(ready_file, proc)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def stop_sim(proc: subprocess.Popen[str]) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    out, err_text = proc.communicate(timeout=10)
    assert proc.returncode == 0, err_text
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_savanna_options_the_finalizer_keys_and_a_key_switch(tmp_path: Path) -> None:
    proc, ready = start_sim(tmp_path, "--pause-on-startup", "bp-b", "--vote-timeout", "0.5",
                            "--finalizer-permission", f"finkey={FINKEY_PUB}")
    try:
        keys = ready["finalizer_keys"]
        assert set(keys) == {"bp-a", "bp-b"} and keys["bp-a"] != keys["bp-b"]
        for key in keys.values():
            assert len(decode_bls_public_key(key)) == 96  # well-formed PUB_BLS_ keys
        a, b = ready["nodes"]["bp-a"], ready["nodes"]["bp-b"]
        with SimControl(ready["control"]) as ctl:
            fins = ctl.finalizers()
            assert fins["savanna"] is True and fins["vote_timeout"] == 0.5
            assert fins["active_finalizer_key"] == keys["bp-a"]
            assert fins["active_finalizer_node"] == "bp-a"
            assert fins["finalizer_policy_generation"] == 1
            assert fins["pending_finalizer_key"] is None
            assert {n: v["finalizer_key"] for n, v in fins["nodes"].items()} == keys
            assert not any(v["implicitly_paused"] for v in fins["nodes"].values())
            perms = {p["perm_name"]: p for p in httpx.post(
                a + "/v1/chain/get_account", json={"account_name": "mybp"}).json()["permissions"]}
            assert perms["finkey"]["linked_actions"] == [{"account": "eosio",
                                                          "action": "actfinkey"}]
            assert perms["finkey"]["required_auth"]["keys"][0]["key"] == FINKEY_PUB

            # The active node dies and the standby, resumed, pauses itself...
            ctl.kill("bp-a")
            httpx.post(b + "/v1/producer/resume")
            wait_until(lambda: ctl.finalizers()["nodes"]["bp-b"]["implicitly_paused"], 5,
                       "the implicit pause")
            node = ctl.finalizers()["nodes"]["bp-b"]
            assert node["pause_reason"] == "no recent votes received from configured producer"
            assert httpx.post(b + "/v1/producer/paused").text == "true"
            # ...until the active key is switched to its own.
            info = httpx.post(b + "/v1/chain/get_info").json()
            expiration = int(datetime.fromisoformat(
                info["head_block_time"] + "+00:00").timestamp()) + 60
            body = sign_actfinkey(info["chain_id"], info["last_irreversible_block_id"],
                                  expiration, FINKEY, "mybp", "finkey", keys["bp-b"])
            resp = httpx.post(b + "/v1/chain/send_transaction2", json={
                "return_failure_trace": True, "retry_trx": False, "transaction": body})
            assert resp.status_code == 202 and resp.json()["processed"]["except"] is None
            httpx.post(b + "/v1/producer/resume")
            wait_until(lambda: ctl.finalizers()["active_finalizer_node"] == "bp-b", 5,
                       "the switch")
            fins = ctl.finalizers()
            assert fins["finalizer_policy_generation"] == 2
            assert fins["nodes"]["bp-b"]["active"] and not fins["nodes"]["bp-a"]["up"]
            time.sleep(2.0)  # well past the vote timeout: bp-b's own votes count now
            assert not ctl.finalizers()["nodes"]["bp-b"]["implicitly_paused"]
            assert httpx.get(ready["control"] + "/finalizers").status_code == 200
            assert httpx.post(ready["control"] + "/finalizers").status_code == 405
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    summary = stop_sim(proc)
    assert summary["active_finalizer_node"] == "bp-b" and summary["savanna"] is True
    assert summary["double_produced_heights"] == summary["vote_equivocations"] == 0


def test_legacy_option_runs_a_chain_without_finalizers(tmp_path: Path) -> None:
    proc, ready = start_sim(tmp_path, "--legacy")
    try:
        assert ready["finalizer_keys"] == {}
        a = ready["nodes"]["bp-a"]
        info = httpx.post(a + "/v1/chain/get_info").json()
        assert info["server_version_string"] == "v5.0.3"
        assert httpx.post(a + "/v1/chain/get_finalizer_info").json()[
            "active_finalizer_policy"] is None
        with SimControl(ready["control"]) as ctl:
            fins = ctl.finalizers()
            assert fins["savanna"] is False and fins["active_finalizer_key"] is None
            assert fins["nodes"]["bp-a"]["finalizer_key"] is None
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    summary = stop_sim(proc)
    assert summary["savanna"] is False and summary["votes"] == 0
