"""The simulated nodeos over real HTTP, on TCP and on a unix socket: shapes and faults."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from bpleader.antelope import new_private_key, public_key_of
from bpleader.sim import FaultError, SimCluster
from harness import wait_for

T = TypeVar("T")
INTERVAL = 0.1
INFO_KEYS = [
    "server_version", "chain_id", "head_block_num", "last_irreversible_block_num",
    "last_irreversible_block_id", "head_block_id", "head_block_time", "head_block_producer",
    "virtual_block_cpu_limit", "virtual_block_net_limit", "block_cpu_limit", "block_net_limit",
    "server_version_string", "fork_db_head_block_num", "fork_db_head_block_id",
    "server_full_version_string", "total_cpu_weight", "total_net_weight",
    "earliest_available_block_num", "last_irreversible_block_time",
]
BLOCK_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def wait_until(pred: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    return wait_for(pred, timeout, interval=0.02, what=what)


def client(url: str, timeout: float = 2.0) -> httpx.Client:
    if url.startswith("unix://"):
        return httpx.Client(transport=httpx.HTTPTransport(uds=url[len("unix://"):]),
                            base_url="http://localhost", timeout=timeout)
    return httpx.Client(base_url=url, timeout=timeout)


def call(url: str, path: str, body: bytes = b"", method: str = "POST",
         timeout: float = 2.0) -> httpx.Response:
    with client(url, timeout) as c:
        return c.request(method, path, content=body)


def info(url: str) -> dict[str, Any]:
    resp = call(url, "/v1/chain/get_info")
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def assert_nodeos_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status
    body: dict[str, Any] = resp.json()
    assert body["code"] == status and isinstance(body["message"], str)
    err = body["error"]
    assert set(err) == {"code", "name", "what", "details"}
    assert isinstance(err["code"], int) and err["details"]
    assert set(err["details"][0]) == {"message", "file", "line_number", "method"}
    return body


@pytest.fixture(params=["tcp", "unix"])
def sim(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimCluster]:
    """bp-a produces, bp-b is paused; on TCP or on unix sockets."""
    unix_dir = tmp_path if request.param == "unix" else None
    with SimCluster("mybp", ["bp-a", "bp-b"], block_interval=INTERVAL, unix_dir=unix_dir,
                    pause_on_startup={"bp-a": False, "bp-b": True}) as cluster:
        yield cluster


@pytest.fixture
def tcp_sim() -> Iterator[SimCluster]:
    with SimCluster("mybp", ["bp-a", "bp-b"], block_interval=INTERVAL,
                    pause_on_startup={"bp-a": False, "bp-b": True}) as cluster:
        yield cluster


def test_get_info_has_nodeos_shape_and_a_fresh_utc_head(sim: SimCluster) -> None:
    url = sim.node("bp-a").url
    assert url.startswith("unix://" if "sock" in url else "http://127.0.0.1:")
    sim.wait_slots(3)
    body = info(url)
    assert list(body) == INFO_KEYS
    assert re.fullmatch(r"[0-9a-f]{8}", body["server_version"])
    # A Savanna chain (the default) runs Spring; legacy mode reports Leap (see
    # test_sim_savanna.py).
    assert body["server_version_string"] == "v1.2.2"
    assert body["server_full_version_string"].startswith("v1.2.2-")
    for key in ("chain_id", "head_block_id", "last_irreversible_block_id",
                "fork_db_head_block_id"):
        assert HEX64.match(body[key]), key
    assert body["head_block_id"][:8] == f"{body['head_block_num']:08x}"
    assert body["last_irreversible_block_id"][:8] == \
        f"{body['last_irreversible_block_num']:08x}"
    assert 1 <= body["last_irreversible_block_num"] <= body["head_block_num"]
    assert body["head_block_producer"] == "mybp"
    for key in ("head_block_time", "last_irreversible_block_time"):
        assert BLOCK_TIME.match(body[key]), body[key]
        parsed = datetime.fromisoformat(body[key])
        assert parsed.tzinfo is None
    head_time = datetime.fromisoformat(body["head_block_time"] + "+00:00").timestamp()
    assert time.time() - 2.0 < head_time <= time.time()
    assert isinstance(body["total_cpu_weight"], str)


def test_producer_api_bodies_and_status(sim: SimCluster) -> None:
    url = sim.node("bp-b").url
    resp = call(url, "/v1/producer/paused")
    assert (resp.status_code, resp.text) == (201, "true")
    resp = call(url, "/v1/producer/resume", b"{}")
    assert resp.status_code == 201 and resp.json() == {"result": "ok"}
    assert resp.headers["content-type"] == "application/json"
    assert call(url, "/v1/producer/paused", method="GET").text == "false"
    assert not sim.node("bp-b").paused
    resp = call(url, "/v1/producer/pause", b" { } ", method="GET")
    assert resp.status_code == 201 and resp.json() == {"result": "ok"}
    assert call(url, "/v1/producer/paused", b"{}").json() is True
    assert sim.node("bp-b").paused
    assert call(url, "/v1/chain/get_info", method="GET").status_code == 200


def test_calls_are_recorded_per_node(tcp_sim: SimCluster) -> None:
    url = tcp_sim.node("bp-b").url
    for path in ("/v1/producer/resume", "/v1/producer/pause", "/v1/producer/resume"):
        call(url, path)
    node = tcp_sim.node("bp-b")
    assert node.call_count("/v1/producer/resume") == 2
    assert [(c.method, c.path, c.status) for c in node.calls] == [
        ("POST", "/v1/producer/resume", 201), ("POST", "/v1/producer/pause", 201),
        ("POST", "/v1/producer/resume", 201)]
    assert tcp_sim.node("bp-a").calls == []


def test_unknown_endpoint_and_bad_bodies_answer_nodeos_errors(tcp_sim: SimCluster) -> None:
    url = tcp_sim.node("bp-a").url
    body = assert_nodeos_error(call(url, "/v1/chain/get_nothing"), 404)
    assert body["message"] == "Not Found"
    assert body["error"]["details"][0]["message"] == "Unknown Endpoint"
    assert_nodeos_error(call(url, "/v1/producer/pause/"), 404)
    body = assert_nodeos_error(call(url, "/v1/producer/pause", b'{"x": 1}'), 400)
    assert body["error"]["name"] == "invalid_http_request"
    assert not tcp_sim.node("bp-a").paused  # a refused call has no effect
    body = assert_nodeos_error(call(url, "/v1/producer/pause_at_block", b"{not json"), 400)
    assert body["error"]["code"] == 3200006
    body = assert_nodeos_error(call(url, "/v1/producer/pause_at_block", b"{}"), 400)
    assert body["error"]["details"][0]["message"] == "A Request body is required"
    assert_nodeos_error(call(url, "/v1/producer/pause_at_block", b"[1]"), 400)
    assert_nodeos_error(call(url, "/v1/producer/pause_at_block", b'{"block_num": -3}'), 400)


def test_pause_at_block(tcp_sim: SimCluster) -> None:
    url = tcp_sim.node("bp-a").url
    tcp_sim.wait_slots(2)
    head = info(url)["head_block_num"]
    body = assert_nodeos_error(call(url, "/v1/producer/pause_at_block",
                                    json.dumps({"block_num": head}).encode()), 500)
    assert body["error"]["name"] == "invalid_pause_at_block_request"
    assert body["error"]["code"] == 3170017
    assert "chain head" in body["error"]["details"][0]["message"]
    target = head + 8  # far enough ahead even on a slow machine
    resp = call(url, "/v1/producer/pause_at_block", json.dumps({"block_num": target}).encode())
    assert resp.status_code == 201 and resp.json() == {"result": "ok"}
    # Spring stops applying blocks at N (and so producing); /v1/producer/paused does not
    # report it.
    wait_until(lambda: info(url)["head_block_num"] == target, what="the head at the block")
    tcp_sim.wait_slots(3)
    assert info(url)["head_block_num"] == target  # signed block N, then nothing more
    assert call(url, "/v1/producer/paused").text == "false"
    assert tcp_sim.node("bp-a").status()["pause_at_block"] == target
    # resume clears it.
    assert call(url, "/v1/producer/resume").status_code == 201
    wait_until(lambda: info(url)["head_block_num"] > target, what="production again")


def test_desync_freezes_the_head_until_cleared(tcp_sim: SimCluster) -> None:
    a, b = tcp_sim.node("bp-a"), tcp_sim.node("bp-b")
    call(b.url, "/v1/producer/resume")  # the standby takes over while bp-a is stuck
    a.set_fault("desync")
    call(a.url, "/v1/producer/pause")
    tcp_sim.wait_slots(1)  # a block bp-a had begun is out, and on its own head
    stuck = info(a.url)["head_block_num"]
    tcp_sim.wait_slots(5)
    assert info(a.url)["head_block_num"] == stuck
    assert info(b.url)["head_block_num"] > stuck
    assert a.faults == {"desync": {}}
    a.clear_faults()  # resynced at once (a tick may fall between the two calls)
    assert abs(info(a.url)["head_block_num"] - info(b.url)["head_block_num"]) <= 1


def test_isolate_cuts_a_node_from_p2p_until_cleared(tcp_sim: SimCluster) -> None:
    """The leader cut from the chain's p2p network (the chaos benchmark's p2p_cut): it
    keeps signing on a fork of its own, nobody else sees those blocks."""
    a, b = tcp_sim.node("bp-a"), tcp_sim.node("bp-b")
    tcp_sim.wait_slots(3)
    a.set_fault("isolate")
    cut_at = info(b.url)["head_block_num"]
    tcp_sim.wait_slots(6)
    assert info(a.url)["head_block_num"] >= cut_at + 4  # still producing, alone
    assert info(b.url)["head_block_num"] <= cut_at + 1  # a block in flight at the cut
    assert a.faults == {"isolate": {}}
    a.clear_faults("isolate")  # back on the network: the others get its head
    tcp_sim.wait_slots(2)
    assert abs(info(a.url)["head_block_num"] - info(b.url)["head_block_num"]) <= 1


def test_lag_shows_an_older_head(tcp_sim: SimCluster) -> None:
    a, b = tcp_sim.node("bp-a"), tcp_sim.node("bp-b")
    tcp_sim.wait_slots(3)
    # The lag is physical: from now on every block reaches bp-b 0.8 s late. Nothing it
    # has already received is taken back, so its head first stands still...
    b.set_fault("lag", seconds=0.8)
    assert abs(info(a.url)["head_block_num"] - info(b.url)["head_block_num"]) <= 1
    tcp_sim.wait_slots(12)
    # ...then follows 0.8 s (8 blocks of 0.1 s) behind.
    lagged_head = info(b.url)["head_block_num"]  # first, so slowness only adds to the gap
    assert info(a.url)["head_block_num"] - lagged_head >= 6
    lagged = datetime.fromisoformat(info(b.url)["head_block_time"] + "+00:00").timestamp()
    assert time.time() - lagged >= 0.7
    b.clear_faults("lag")  # blocks in flight still arrive late; new ones do not
    tcp_sim.wait_slots(12)
    assert info(a.url)["head_block_num"] - info(b.url)["head_block_num"] <= 1


def test_freeze_api_holds_calls_without_blocking_others(tcp_sim: SimCluster) -> None:
    a, b = tcp_sim.node("bp-a"), tcp_sim.node("bp-b")
    a.set_fault("freeze_api")
    with pytest.raises(httpx.ReadTimeout):
        call(a.url, "/v1/chain/get_info", timeout=0.3)
    answered: list[httpx.Response] = []
    held = threading.Thread(target=lambda: answered.append(
        call(a.url, "/v1/producer/pause", timeout=10)))
    held.start()
    assert call(b.url, "/v1/producer/paused").status_code == 201  # another node answers
    time.sleep(0.2)
    assert not answered and not a.paused  # held back, and without effect so far
    a.clear_faults("freeze_api")
    held.join(5)
    assert answered[0].status_code == 201 and a.paused  # answered and applied on release
    assert call(a.url, "/v1/producer/paused").status_code == 201


def test_a_frozen_call_does_not_stop_the_node_from_stopping(tmp_path: Path) -> None:
    cluster = SimCluster("mybp", ["bp-a"], block_interval=INTERVAL)
    cluster.start()
    url = cluster.node("bp-a").url
    cluster.node("bp-a").set_fault("freeze_api")
    errors: list[Exception] = []

    def frozen_call() -> None:
        try:
            call(url, "/v1/chain/get_info", timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    held = threading.Thread(target=frozen_call)
    held.start()
    wait_until(lambda: cluster.node("bp-a").calls, what="the call to arrive")
    started = time.monotonic()
    cluster.stop()
    held.join(5)
    assert time.monotonic() - started < 3
    assert errors and not held.is_alive()  # dropped unanswered, as a dying process


def test_slow_api_delays_answers(tcp_sim: SimCluster) -> None:
    a = tcp_sim.node("bp-a")
    a.set_fault("slow_api", seconds=0.4)
    started = time.monotonic()
    assert call(a.url, "/v1/producer/paused").status_code == 201
    assert time.monotonic() - started >= 0.35
    with pytest.raises(httpx.ReadTimeout):
        call(a.url, "/v1/chain/get_info", timeout=0.1)


def test_http_500_garbage_and_missing_producer_api(tcp_sim: SimCluster) -> None:
    a = tcp_sim.node("bp-a")
    a.set_fault("http_500")
    body = assert_nodeos_error(call(a.url, "/v1/producer/pause"), 500)
    assert body["message"] == "Internal Service Error"
    assert not a.paused  # answered by the fault, not by nodeos
    a.clear_faults()
    a.set_fault("garbage")
    resp = call(a.url, "/v1/chain/get_info")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        resp.json()
    a.clear_faults()
    a.set_fault("no_producer_api")
    for path in ("/v1/producer/pause", "/v1/producer/resume", "/v1/producer/paused",
                 "/v1/producer/pause_at_block"):
        assert_nodeos_error(call(a.url, path), 404)
    assert call(a.url, "/v1/chain/get_info").status_code == 200
    assert not a.paused


@pytest.mark.parametrize("pause_on_startup", [False, True])
def test_restart_refuses_connections_then_comes_back(pause_on_startup: bool,
                                                     tmp_path: Path) -> None:
    with SimCluster("mybp", ["bp-a", "bp-b"], block_interval=INTERVAL,
                    pause_on_startup=pause_on_startup, unix_dir=tmp_path) as cluster:
        a = cluster.node("bp-a")
        call(a.url, "/v1/producer/resume")
        call(a.url, "/v1/producer/pause")
        assert a.paused
        with client(a.url) as keepalive:
            assert keepalive.post("/v1/producer/paused").status_code == 201
            a.restart(1.0)
            assert not a.up and not a.producing and "restart" in a.faults
            with pytest.raises(httpx.TransportError):  # the open connection is cut too
                keepalive.post("/v1/producer/paused")
        with pytest.raises(httpx.ConnectError):
            call(a.url, "/v1/chain/get_info")
        wait_until(lambda: a.up, 5, "the node back up")
        assert a.faults == {}
        assert call(a.url, "/v1/producer/paused").json() is pause_on_startup
        head_b = info(cluster.node("bp-b").url)["head_block_num"]
        assert abs(info(a.url)["head_block_num"] - head_b) <= 1  # resynced


def test_kill_until_start(tcp_sim: SimCluster) -> None:
    a = tcp_sim.node("bp-a")
    url = a.url
    a.set_fault("kill")
    assert a.faults == {"kill": {}}
    tcp_sim.wait_slots(3)
    assert not a.up
    with pytest.raises(httpx.ConnectError):
        call(url, "/v1/chain/get_info")
    blocks = tcp_sim.ledger_summary()["blocks_by_node"]["bp-a"]
    tcp_sim.wait_slots(3)
    assert tcp_sim.ledger_summary()["blocks_by_node"]["bp-a"] == blocks  # down: no signing
    a.start()
    assert a.url == url and a.up and not a.paused
    assert call(url, "/v1/producer/paused").json() is False
    a.kill()
    a.clear_faults()  # clearing a kill starts the node again
    assert a.up


def test_invalid_faults_are_refused(tcp_sim: SimCluster) -> None:
    a = tcp_sim.node("bp-a")
    with pytest.raises(FaultError):
        a.set_fault("melt")
    with pytest.raises(FaultError):
        a.set_fault("lag")
    with pytest.raises(FaultError):
        a.set_fault("slow_api", seconds=-1)
    with pytest.raises(KeyError):
        tcp_sim.node("bp-z")
    assert a.faults == {}


def test_cluster_arguments_are_checked() -> None:
    for kwargs in [{"nodes": []}, {"nodes": ["a", "a"]}, {"nodes": ["a b"]},
                   {"nodes": ["a"], "block_interval": 0.0005},
                   {"nodes": ["a"], "pause_on_startup": {"b": True}},
                   {"nodes": ["a"], "other_producers": ["mybp"]},
                   {"nodes": ["a"], "chain_id": "xyz"},
                   # Savanna options: keys of known nodes, well-formed; a permission with
                   # its key, a valid name, on a Savanna chain.
                   {"nodes": ["a"], "bls_keys": {"b": None}},
                   {"nodes": ["a"], "bls_keys": {"a": "PUB_BLS_nope"}},
                   {"nodes": ["a"], "unregistered_keys": ["b"]},
                   {"nodes": ["a"], "vote_timeout": -1.0},
                   {"nodes": ["a"], "finalizer_permission": "finkey"},
                   {"nodes": ["a"], "finalizer_permission": "FinKey",
                    "finalizer_permission_key": public_key_of(new_private_key(b"k"))},
                   {"nodes": ["a"], "finalizer_permission": "finkey",
                    "finalizer_permission_key": "PUB_K1_garbage"},
                   {"nodes": ["a"], "savanna": False, "finalizer_permission": "finkey",
                    "finalizer_permission_key": public_key_of(new_private_key(b"k"))}]:
        with pytest.raises(ValueError):
            SimCluster("mybp", **kwargs)  # type: ignore[arg-type]
