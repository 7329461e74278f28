"""A real ``bpleader agent`` process against real etcd and the nodeos simulator, seen from
outside as an operator sees it: /metrics checked by promtool, /health and /leader, and
notifications to webhooks that hang while the agent fences and shuts down."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bpleader.localetcd import EtcdCluster
from bpleader.sim import SimCluster
from harness import CHAIN, PRODUCER, AgentProc, World, wait_for
from ops_http import Hook, HookServer

pytestmark = pytest.mark.integration

# Every metric the operations issue names, as exposed (text format 0.0.4), with its type.
REQUIRED = {
    "bpleader_is_leader": "gauge",
    "bpleader_nodeos_producing": "gauge",
    "bpleader_nodeos_in_sync": "gauge",
    "bpleader_nodeos_head_block_lag_seconds": "gauge",
    "bpleader_lease_remaining_seconds": "gauge",
    "bpleader_leader_transitions_total": "counter",
    "bpleader_fence_pauses_total": "counter",
    "bpleader_reconcile_corrections_total": "counter",
    "bpleader_doppelganger_detected_total": "counter",
    "bpleader_etcd_errors_total": "counter",
    "bpleader_nodeos_request_duration_seconds": "histogram",
    "bpleader_info": "gauge",
    "bpleader_etcd_rejected_entries": "gauge",
}


@pytest.fixture
def world(etcd1: EtcdCluster, tmp_path: Path) -> Iterator[World]:
    with SimCluster(PRODUCER, ["bp-a"], pause_on_startup=True, **CHAIN) as sim:
        w = World(tmp_path, etcd1.endpoints, sim)
        try:
            yield w
        finally:
            w.stop_all()


def metrics_url(agent: AgentProc) -> str:
    def port() -> int | None:
        m = re.search(r"event=metrics_listening port=(\d+)", agent.log_text())
        return int(m.group(1)) if m else None

    return f"http://127.0.0.1:{wait_for(port, 20, what='metrics listener')}"


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=2.0)


def metrics_with(base: str, pattern: str) -> str | None:
    text = get(base + "/metrics").text
    return text if re.search(pattern, text, re.M) else None


def parse_types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def test_metrics_health_and_leader_of_a_live_agent(world: World, etcd1: EtcdCluster) -> None:
    agent = world.add_agent("bp-a")
    agent.start()
    base = metrics_url(agent)
    world.wait_single_producer(30)
    wait_for(lambda: get(base + "/leader").status_code == 200, 10, what="/leader 200")
    # The gauges reflect the last observation: one tick after the resume it reads unpaused.
    body = wait_for(lambda: metrics_with(base, r"^bpleader_nodeos_producing 1\.0$"), 10,
                    what="producing = 1")

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is required (scripts/bootstrap.sh installs Debian's "
                    "'prometheus' package)")
    check = subprocess.run([promtool, "check", "metrics"], input=body, text=True,
                           capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stderr

    types = parse_types(body)
    for name, kind in REQUIRED.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert re.search(r'^bpleader_info\{node="bp-a",producer="mybp",version="[^"]+"\} 1\.0$',
                     body, re.M)
    assert re.search(r"^bpleader_is_leader 1\.0$", body, re.M)
    assert re.search(r"^bpleader_leader_transitions_total [1-9]", body, re.M)
    for call in ("get_info", "paused", "resume"):
        m = re.search(rf'^bpleader_nodeos_request_duration_seconds_count\{{call="{call}"\}} '
                      r"(\S+)$", body, re.M)
        assert m and float(m.group(1)) >= 1, call

    health = get(base + "/health")
    assert health.status_code == 200, health.text
    assert health.json()["healthy"] is True and health.json()["role"] == "leader"
    leader = get(base + "/leader")
    assert leader.json() == {"leader": True, "node": "bp-a", "role": "leader"}
    assert get(base + "/nope").status_code == 404

    # A client that sends half a request and holds the connection must not block the
    # server (or the agent): the listener answers others and the loop keeps ticking.
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as stuck:
        stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        for _ in range(5):
            assert get(base + "/health").status_code == 200
        assert time.monotonic() - t0 < 2.0
        assert get(base + "/health").json()["last_tick_age"] < 2.0

    # An unreadable entry under the prefix is ignored, and the operator is told: once in
    # the log, and for as long as it stays in the metric.
    ghost = f"{world.prefix}/{PRODUCER}/nodes/ghost"
    assert etcd1.etcdctl("put", ghost, "{not json").returncode == 0
    wait_for(lambda: metrics_with(base, r"^bpleader_etcd_rejected_entries 1\.0$"), 10,
             what="the rejected entry counted")
    assert agent.log_text().count("event=etcd_rejected") == 1
    assert "nodes/ghost: unreadable node record" in agent.log_text()
    assert etcd1.etcdctl("del", ghost).returncode == 0
    wait_for(lambda: metrics_with(base, r"^bpleader_etcd_rejected_entries 0\.0$"), 10,
             what="the rejected entry gone")
    assert get(base + "/leader").status_code == 200  # a bad entry changes nothing else

    # etcd gone: the leader fences itself; /health says why, /leader stops answering 200.
    etcd1.stop()
    wait_for(lambda: get(base + "/leader").status_code == 503, 10, what="/leader 503")
    wait_for(lambda: get(base + "/health").status_code == 503, 10, what="/health 503")
    assert get(base + "/health").json()["reason"] == "etcd unreachable"
    assert world.sim.node("bp-a").paused
    body = get(base + "/metrics").text
    assert re.search(r"^bpleader_is_leader 0\.0$", body, re.M)
    assert re.search(r'^bpleader_fence_pauses_total\{reason="[^"]+"\} [1-9]', body, re.M)
    assert re.search(r"^bpleader_etcd_errors_total [1-9]", body, re.M)


def test_hung_webhooks_do_not_delay_the_fence_or_shutdown(world: World,
                                                          etcd1: EtcdCluster) -> None:
    """Slack and the JSON webhook accept and never answer. The leader loses etcd: its
    fence must pause nodeos before the lease runs out, exactly as without webhooks; and
    SIGTERM must still pause, confirm and exit promptly."""
    with HookServer(Hook(mode="hang")) as hung:
        agent = world.add_agent("bp-a")
        with agent.config.open("a") as f:
            f.write(f'[notify]\nslack_webhook = "{hung.url}/slack/SECRET"\n'
                    f'webhook_url = "{hung.url}/hook"\n')
        agent.start()
        world.wait_single_producer(30)
        # Becoming leader was notified, and both requests are now hanging.
        wait_for(lambda: len(hung.hook.received) >= 2, 10, what="hung notifications")
        etcd_gone = time.monotonic()
        etcd1.stop()
        wait_for(lambda: world.sim.node("bp-a").paused, 10, interval=0.01,
                 what="fence pause")
        fence_s = time.monotonic() - etcd_gone
        # lease_ttl is 2 s: the fence fires at the lease deadline minus fence_guard.
        assert fence_s < float(world.timing["lease_ttl"]), fence_s
        # The agent loop itself (which queues the notifications) stepped down in time too:
        # its fence is not only the fence thread's.
        wait_for(lambda: "reason='leader -> follower" in agent.log_text(), 5, interval=0.01,
                 what="agent loop fenced")
        loop_s = time.monotonic() - etcd_gone
        assert loop_s < float(world.timing["lease_ttl"]) + 0.5, loop_s
        assert agent.count("fence") >= 1
        t0 = time.monotonic()
        status = agent.stop(timeout=15)
        stop_s = time.monotonic() - t0
        assert status == 0, agent.log_text()[-2000:]
        # shutdown pause (fast) + at most the notifier's 2 s drain, never the 5 s timeouts
        assert stop_s < 4.0, stop_s
        text = agent.log_text()
        assert "SECRET" not in text
        kinds = [json.dumps(r.body) for r in hung.hook.received]
    assert any("role_change" in k for k in kinds), kinds
    assert "event=notify_destinations reason='slack,webhook'" in text
