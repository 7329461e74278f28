"""Prometheus metrics and the HTTP probes (/metrics, /health, /leader) of one agent.

Values are read from the agent when scraped, by a collector running in the HTTP server's
own thread: a slow scraper never delays the agent loop, and the loop needs no metric
calls of its own beyond the counters it keeps anyway (:class:`bpleader.agent.AgentStats`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bpleader import __version__
from bpleader.agent import Agent, Role

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentCollector(Collector):
    """Turns the agent's state and counters into metric families at scrape time."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self._agent
        cfg, stats, last = a.cfg, a.stats, a.last
        info = GaugeMetricFamily("bpleader_info", "Agent identity.",
                                 labels=["node", "producer", "version"])
        info.add_metric([cfg.node, cfg.producer, __version__], 1)
        yield info
        yield GaugeMetricFamily("bpleader_is_leader", "1 while this agent leads and may "
                                "produce.", value=int(a.role == Role.LEADER))
        role = GaugeMetricFamily("bpleader_role", "Current role of the agent (1 = current).",
                                 labels=["role"])
        for r in Role:
            role.add_metric([r.value], int(a.role == r))
        yield role
        producing = last is not None and last.paused is False
        yield GaugeMetricFamily("bpleader_nodeos_producing",
                                "1 when nodeos was last seen unpaused.", value=int(producing))
        yield GaugeMetricFamily("bpleader_nodeos_in_sync", "1 when nodeos was last in sync.",
                                value=int(last is not None and last.sync.in_sync))
        lag = last.sync.lag if last is not None and last.sync.lag is not None else float("nan")
        yield GaugeMetricFamily("bpleader_nodeos_head_block_lag_seconds",
                                "Local time minus the head block's time.", value=lag)
        left = a.session.remaining(a.clock.now())
        yield GaugeMetricFamily("bpleader_lease_remaining_seconds",
                                "Seconds of lease the agent can count on (0 without one).",
                                value=max(0.0, left))
        rejected = len(last.snap.rejected) if last is not None and last.snap else 0
        yield GaugeMetricFamily("bpleader_etcd_rejected_entries", "Entries under the "
                                "producer's prefix the last etcd read ignored as unreadable "
                                "or oversized (logged as event=etcd_rejected).",
                                value=rejected)
        counters: list[tuple[str, str, float]] = [
            ("bpleader_role_transitions", "Role changes.", stats.transitions),
            ("bpleader_leader_transitions", "Times this agent became or stopped being leader.",
             stats.leader_changes),
            ("bpleader_reconcile_corrections", "Times nodeos's paused state was corrected.",
             stats.corrections),
            ("bpleader_doppelganger_detected", "Blocks of our producer seen from another "
             "node while taking over.", stats.doppelgangers),
            ("bpleader_etcd_errors", "Failed etcd requests.", stats.etcd_errors),
            ("bpleader_nodeos_errors", "Failed nodeos requests.", stats.nodeos_errors),
            ("bpleader_resumes", "Resume calls that nodeos accepted.", stats.resumes),
            ("bpleader_continuity_timeouts", "Takeovers that waited longer than "
             "continuity_timeout for the previous leader's head.", stats.continuity_waits),
            ("bpleader_implicit_pauses", "Times nodeos read paused while leader after a "
             "resume (Spring's implicit pause).", stats.implicit_pauses),
            ("bpleader_lease_renewal_failures", "Keepalives or grants that failed.",
             a.session.stats.renewal_failures),
            ("bpleader_lease_losses", "Leases lost (TTL 0 or local deadline passed).",
             a.session.stats.losses),
        ]
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=value)
        fences = CounterMetricFamily("bpleader_fence_pauses", "Pauses forced by the fence.",
                                     labels=["reason"])
        for reason, count in sorted(stats.fences.items()):
            fences.add_metric([reason], count)
        yield fences
        yield GaugeMetricFamily("bpleader_finality_savanna", "1 once the chain runs Savanna "
                                "(the LIB is part of being in sync).", value=int(a.sync.savanna))
        yield from _finalizer_metrics(a)


def _finalizer_metrics(a: Agent) -> Iterator[Metric]:
    """The [finalizer] key failover: which key is active, and how switches go."""
    keys = a.keys
    if keys is None:
        return
    now = a.clock.now()
    yield GaugeMetricFamily("bpleader_finalizer_key_active", "1 while this node's BLS "
                            "finalizer key is the producer's active one on-chain.",
                            value=int(keys.ours))
    active = GaugeMetricFamily("bpleader_finalizer_active_info", "The producer's active "
                               "finalizer key as this node last saw it, and its node.",
                               labels=["key", "node"])
    if keys.active_key is not None:
        active.add_metric([keys.active_key, a.owner_of(keys.active_key) or "unknown"], 1)
    yield active
    yield GaugeMetricFamily("bpleader_finalizer_switch_seconds", "Seconds the switch of the "
                            "active key to this node has been going on (0: none).",
                            value=keys.switching_for(now))
    yield GaugeMetricFamily("bpleader_finalizer_last_switch_duration_seconds", "How long "
                            "the last confirmed switch took, from its start to the key "
                            "active on-chain.", value=keys.stats.last_switch_seconds)
    info = keys.info
    vote = info.last_vote(keys.active_key) if info and keys.active_key else None
    yield GaugeMetricFamily("bpleader_finalizer_last_vote_block", "Block of the active "
                            "key's last vote seen in a QC (nan: none seen).",
                            value=vote.block_num if vote else float("nan"))
    for name, text, value in (
            ("bpleader_finalizer_switches", "Switches confirmed on-chain.",
             keys.stats.switches),
            ("bpleader_finalizer_submissions", "actfinkey submissions.",
             keys.stats.submissions),
            ("bpleader_finalizer_switch_failures", "Submissions the chain or the command "
             "refused.", keys.stats.failures),
            ("bpleader_finalizer_switch_timeouts", "Switches not confirmed within "
             "finalizer.switch_timeout.", keys.stats.alarms)):
        yield CounterMetricFamily(name, text, value=value)


def health(agent: Agent, stale_after: float) -> tuple[bool, dict[str, Any]]:
    """Healthy: the loop completed a tick recently and etcd answered it."""
    last = agent.last
    if last is None:
        return False, {"healthy": False, "reason": "no tick completed yet"}
    age = agent.clock.now() - last.now
    body: dict[str, Any] = {"role": agent.role.value, "last_tick_age": round(age, 3),
                            "in_sync": last.sync.in_sync, "paused": last.paused}
    if age > stale_after:
        return False, {**body, "healthy": False, "reason": f"loop stalled for {age:.1f} s"}
    if last.snap is None:
        return False, {**body, "healthy": False, "reason": "etcd unreachable"}
    return True, {**body, "healthy": True, "reason": ""}


class Metrics:
    """The agent's HTTP listener; ``port`` tells where it listens (0 picks a free one)."""

    def __init__(self, agent: Agent, listen: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(AgentCollector(agent))
        self.nodeos_duration = Histogram(
            "bpleader_nodeos_request_duration_seconds", "nodeos API call latency.",
            ["call"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        host, _, port = listen.rpartition(":")
        stale_after = 3 * agent.cfg.check_interval + 4 * agent.cfg.nodeos_timeout + 1.0
        self._server = ThreadingHTTPServer((host.strip("[]"), int(port)),
                                           _handler(self, agent, stale_after))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    def observe_nodeos(self, call: str, seconds: float, _error: str | None) -> None:
        self.nodeos_duration.labels(call).observe(seconds)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(metrics: Metrics, agent: Agent, stale_after: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE)
            elif path == "/health":
                ok, body = health(agent, stale_after)
                self._json(200 if ok else 503, body)
            elif path == "/leader":
                leading = agent.role == Role.LEADER
                self._json(200 if leading else 503, {"leader": leading, "node": agent.cfg.node,
                                                     "role": agent.role.value})
            else:
                self._json(404, {"error": f"unknown path {path}",
                                 "paths": ["/metrics", "/health", "/leader"]})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, (json.dumps(body) + "\n").encode(), "application/json")

        def _send(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the agent's own log lines

    return Handler
