"""Notifications against real local HTTP servers: payloads, retries, bounds, secrecy,
and that a hung webhook never delays the caller."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pytest

from bpleader.agent import AgentEvent, Role
from bpleader.config import NotifyConfig, check_config_main
from bpleader.notify import (
    AgentEvents,
    Notifier,
    NotifierCollector,
    PagerDutySink,
    SlackSink,
    WebhookSink,
)
from harness import wait_for, write_config
from ops_http import Hook, HookServer

SECRET_PATH = "/services/T000/B000/sEcReTtOkEn"
ROUTING_KEY = "R0UT1NGKEYsecret0123456789abcdef"


def notifier(*sinks: object, **kw: object) -> Notifier:
    opts: dict[str, object] = {"timeout": 0.5, "attempts": 3, "backoff": 0.01,
                               "max_time": 5.0, "node": "bp-a", "producer": "mybp"}
    opts.update(kw)
    return Notifier(sinks, **opts)  # type: ignore[arg-type]


def test_slack_webhook_and_pagerduty_payloads() -> None:
    with HookServer(Hook(status=202)) as srv:
        n = notifier(SlackSink(srv.url + "/slack"), WebhookSink(srv.url + "/hook"),
                     PagerDutySink(ROUTING_KEY, srv.url + "/pd"))
        n.start()
        n.event("role_change", "bp-a", "leader", "taking_over -> leader: resumed")
        n.event("no_in_sync_node", "bp-a", "follower", "nothing in sync", "critical",
                action="trigger", dedup_key="bpleader/mybp/no_in_sync_node")
        n.event("no_in_sync_node", "bp-a", "follower", "cleared", "info",
                action="resolve", dedup_key="bpleader/mybp/no_in_sync_node")
        wait_for(lambda: sum(s.sent for s in n.stats().values()) == 8, 5, what="8 sent")
        n.stop()
        slack, hook, pd = (srv.hook.bodies(p) for p in ("/slack", "/hook", "/pd"))
    assert len(slack) == 3 and all(set(b) == {"text"} for b in slack)
    assert "mybp/bp-a role_change" in slack[0]["text"]
    assert slack[1]["text"].startswith(":rotating_light:")
    assert "resolved" in slack[2]["text"]
    assert [b["kind"] for b in hook] == ["role_change", "no_in_sync_node", "no_in_sync_node"]
    assert hook[0]["node"] == "bp-a" and hook[0]["producer"] == "mybp"
    assert hook[0]["role"] == "leader" and hook[1]["severity"] == "critical"
    # PagerDuty gets alarms only, trigger then resolve with one dedup key.
    assert [b["event_action"] for b in pd] == ["trigger", "resolve"]
    assert {b["dedup_key"] for b in pd} == {"bpleader/mybp/no_in_sync_node"}
    assert all(b["routing_key"] == ROUTING_KEY for b in pd)
    payload = pd[0]["payload"]
    assert payload["severity"] == "critical" and payload["source"] == "bp-a"
    assert payload["component"] == "mybp" and payload["summary"]
    assert "payload" not in pd[1]


def test_retries_5xx_until_success_but_not_4xx() -> None:
    with HookServer(Hook(fail_first=2, fail_status=503)) as srv:
        n = notifier(WebhookSink(srv.url))
        n.start()
        n.event("fence", "bp-a", "leader", "lease ends")
        wait_for(lambda: n.stats()["webhook"].sent == 1, 5, what="delivery after retries")
        n.stop()
        assert len(srv.hook.received) == 3
        assert n.stats()["webhook"].retries == 2
    with HookServer(Hook(status=400)) as srv:
        n = notifier(WebhookSink(srv.url))
        n.start()
        n.event("fence", "bp-a", "leader", "lease ends")
        wait_for(lambda: n.stats()["webhook"].failed == 1, 5, what="permanent failure")
        n.stop()
        assert len(srv.hook.received) == 1  # a 400 is not retried


def test_gives_up_after_bounded_attempts_and_never_logs_the_secret(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with HookServer(Hook(status=500)) as srv:
        url = srv.url + SECRET_PATH
        n = notifier(SlackSink(url), attempts=3)
        n.start()
        n.event("doppelganger", "bp-a", "fenced", "another node signs", "critical")
        wait_for(lambda: n.stats()["slack"].failed == 1, 5, what="give up")
        n.stop()
        assert len(srv.hook.received) == 3
    assert "event=notify_failed" in caplog.text and "HTTP 500" in caplog.text
    assert "sEcReTtOkEn" not in caplog.text
    assert "sEcReTtOkEn" not in repr(n.workers[0].sink)
    assert ROUTING_KEY not in repr(PagerDutySink(ROUTING_KEY))


def test_hung_webhook_never_blocks_the_caller_and_the_queue_is_bounded() -> None:
    with HookServer(Hook(mode="hang")) as srv:
        n = notifier(SlackSink(srv.url), WebhookSink(srv.url), timeout=30.0, max_queue=5)
        n.start()
        n.event("fence", "bp-a", "leader", "first", "warning")
        wait_for(lambda: len(srv.hook.received) >= 2, 5, what="both workers stuck")
        slowest = 0.0
        for i in range(50):
            t0 = time.perf_counter()
            n.event("fence", "bp-a", "leader", f"fence {i}", "warning")
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 0.010, f"event() took {slowest * 1000:.1f} ms"
        stats = n.stats()
        # Each worker is stuck on the first event and holds the newest 5: 45 dropped.
        assert stats["slack"].dropped == stats["webhook"].dropped == 50 - 5
        t0 = time.monotonic()
        n.stop(drain=0.3)
        assert time.monotonic() - t0 < 1.0  # stop() is bounded too


def test_hung_webhook_does_not_delay_an_agent_fence_event() -> None:
    """The agent's fence path reports ``fence`` before pausing; with every destination
    hung, handing the event to the bridge stays an in-memory append."""
    with HookServer(Hook(mode="hang")) as srv:
        n = notifier(SlackSink(srv.url), WebhookSink(srv.url), timeout=30.0)
        n.start()
        bridge = AgentEvents(n, "bp-a", "mybp", alarm_after=1.0)
        try:
            for _ in range(20):
                t0 = time.perf_counter()
                bridge(AgentEvent("fence", "bp-a", Role.LEADER,
                                  "lease ends within the fence guard", logging.WARNING))
                assert time.perf_counter() - t0 < 0.010
            wait_for(lambda: len(srv.hook.received) >= 2, 5, what="requests in flight")
        finally:
            n.stop(drain=0.1)
        assert all("fence" in json.dumps(r.body) for r in srv.hook.received)


def test_bridge_maps_agent_events_to_notifications() -> None:
    with HookServer(Hook()) as srv:
        n = notifier(WebhookSink(srv.url), PagerDutySink(ROUTING_KEY, srv.url + "/pd"))
        n.start()
        bridge = AgentEvents(n, "bp-a", "mybp", alarm_after=1.0)

        def transition(old: Role, new: Role, why: str) -> AgentEvent:
            return AgentEvent("transition", "bp-a", new, f"{old.value} -> {new.value}: {why}",
                              logging.INFO, previous=old)

        try:
            # candidate churn is not news; becoming leader, losing it and doppelganger are
            bridge(transition(Role.FOLLOWER, Role.CANDIDATE, "in sync, campaigning"))
            bridge(transition(Role.TAKING_OVER, Role.LEADER, "resumed production"))
            bridge(transition(Role.LEADER, Role.FOLLOWER, "stepped down: out of sync: head "
                                                          "stale"))
            bridge(AgentEvent("doppelganger", "bp-a", Role.CANDIDATE,
                              "block 9 signed by mybp after we won", logging.CRITICAL))
            bridge(AgentEvent("resumed", "bp-a", Role.LEADER, "takeover", logging.INFO))
            wait_for(lambda: n.stats()["webhook"].sent == 3 and
                     n.stats()["pagerduty"].sent == 1, 5, what="deliveries")
        finally:
            n.stop()
        hook = srv.hook.bodies("/")
        pd = srv.hook.bodies("/pd")
    assert [(b["kind"], b["role"], b["severity"]) for b in hook] == [
        ("role_change", "leader", "info"), ("role_change", "follower", "warning"),
        ("doppelganger", "candidate", "critical")]
    assert hook[1]["reason"] == "leader -> follower: stepped down: out of sync: head stale"
    assert pd[0]["event_action"] == "trigger"
    assert pd[0]["dedup_key"] == "bpleader/mybp/doppelganger"


def test_metrics_collector_counts_per_sink() -> None:
    with HookServer(Hook(status=500)) as srv:
        n = notifier(WebhookSink(srv.url), attempts=1, max_queue=1)
        n.start()
        n.event("fence", "bp-a", "leader", "x")
        wait_for(lambda: n.stats()["webhook"].failed == 1, 5, what="failure")
        n.stop()
    families = {f.name: f for f in NotifierCollector(n).collect()}
    failed = families["bpleader_notifications_failed"].samples
    assert [(s.name, s.labels, s.value) for s in failed] == [
        ("bpleader_notifications_failed_total", {"sink": "webhook"}, 1.0)]


def test_check_config_redacts_notify_secrets(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "bp.toml", {
        "node": {"name": "bp-a", "producer": "mybp"},
        "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
        "notify": {"slack_webhook": "https://hooks.slack.com" + SECRET_PATH,
                   "webhook_url": "https://ops.example/hook?token=sEcReTtOkEn",
                   "pagerduty_routing_key": ROUTING_KEY}})
    out, err = io.StringIO(), io.StringIO()
    assert check_config_main(str(cfg), out, err) == 0
    text = out.getvalue() + err.getvalue()
    assert "sEcReTtOkEn" not in text and ROUTING_KEY not in text
    notify = json.loads(out.getvalue())["notify"]
    assert notify == {"slack_webhook": "***", "webhook_url": "***",
                      "pagerduty_routing_key": "***", "timeout": 5.0, "max_time": 30.0}


def test_state_alarms_trigger_after_the_grace_and_resolve_once() -> None:
    """etcd unreachable and no in-sync node, from the agent's last observation."""
    from types import SimpleNamespace

    from bpleader.agent import Role

    with HookServer(Hook(status=202)) as srv:
        n = notifier(PagerDutySink(ROUTING_KEY, srv.url + "/pd"))
        n.start()
        bridge = AgentEvents(n, "bp-a", "mybp", alarm_after=2.0)
        rec = SimpleNamespace(valid=True, in_sync=False)
        in_sync = SimpleNamespace(valid=True, in_sync=True)

        def tick(now: float, snap: object) -> None:
            bridge.on_tick(SimpleNamespace(  # type: ignore[arg-type]
                role=Role.FOLLOWER, last=SimpleNamespace(now=now, snap=snap)))

        tick(0.0, None)  # etcd down from t=0
        tick(1.9, None)  # within the grace: nothing
        tick(2.0, None)  # trigger
        tick(3.0, None)  # already raised: nothing
        tick(4.0, SimpleNamespace(records={"bp-a": rec}))  # etcd back (resolve); none in sync
        tick(6.5, SimpleNamespace(records={"bp-a": rec}))  # trigger no_in_sync_node
        tick(7.0, SimpleNamespace(records={"bp-a": rec, "bp-b": in_sync}))  # resolve
        tick(8.0, SimpleNamespace(records={"bp-b": in_sync}))  # nothing
        wait_for(lambda: n.stats()["pagerduty"].sent == 4, 5, what="4 PagerDuty events")
        n.stop()
        pd = srv.hook.bodies("/pd")
    assert [(b["event_action"], b["dedup_key"]) for b in pd] == [
        ("trigger", "bpleader/mybp/bp-a/etcd_unreachable"),
        ("resolve", "bpleader/mybp/bp-a/etcd_unreachable"),
        ("trigger", "bpleader/mybp/no_in_sync_node"),
        ("resolve", "bpleader/mybp/no_in_sync_node")]
    assert pd[0]["payload"]["severity"] == "error"
    assert pd[2]["payload"]["severity"] == "critical"


def test_notify_timeouts_come_from_the_config() -> None:
    """``notify.timeout`` bounds each attempt, ``notify.max_time`` all of them: a hung
    webhook costs the event, counted, after about max_time."""
    with HookServer(Hook(mode="hang")) as srv:
        cfg = NotifyConfig(webhook_url=srv.url, timeout=0.2, max_time=0.5)
        n = Notifier.from_config(cfg, "bp-a", "mybp", attempts=100, backoff=0.01)
        assert (n.timeout, n.max_time) == (0.2, 0.5)
        n.start()
        t0 = time.monotonic()
        n.event("fence", "bp-a", "leader", "hung", "warning")
        wait_for(lambda: n.stats()["webhook"].failed == 1, 5, what="the event given up")
        took = time.monotonic() - t0
        n.stop(drain=0.1)
    assert 0.4 <= took < 2.0, took
    assert 2 <= len(srv.hook.received) <= 5  # attempts of 0.2 s within 0.5 s, not 100
