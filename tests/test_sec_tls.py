"""etcd over TLS with client certificates, authentication and a per-producer role, on a
real 3-member etcd cluster and real ``bpleader agent`` processes driving the nodeos
simulator.

What is shown: agents elect and fail over over TLS as a user whose role only reaches
``{prefix}/{producer}/``, and keep one producer while the raft leader member dies (the
client moves to another member with the same credentials); each way of being refused
(wrong CA, expired or unknown client certificate, wrong password, role without rights)
gives a one-line error naming the cause, never a trace; the refused agent's nodeos stays
paused, and its attempts are spaced by a growing backoff. The secret never appears in any
output of a full run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bpleader.sim import SimCluster
from bpleader.store import EtcdSettings, EtcdStore, Keys, StoreError
from harness import CHAIN, PRODUCER, AgentProc, World, toml_value, wait_for
from pki import Pki, make_pki
from secetcd import SecureEtcd

pytestmark = pytest.mark.integration

PASSWORD = "s3cr3t-Pa55-8f1e2d"  # a test secret, grepped for below
WEBHOOK = "https://hooks.slack.com/services/T000/B000/XyZsecretwebhook42"
USER = f"bpleader-{PRODUCER}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_etcd(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    """TLS + --client-cert-auth + auth on, a role limited to /bpleader/mybp/ and a role
    with no rights at all (module-scoped: starting etcd is the slow part)."""
    etcd = SecureEtcd(tmp_path_factory.mktemp("etcd"), pki)
    etcd.start()
    try:
        etcd.enable_auth("root-" + PASSWORD)
        etcd.add_agent_user("/bpleader", PRODUCER, USER, PASSWORD)
        etcd.add_agent_user("/bpleader", PRODUCER, "norights", PASSWORD, grant=False)
        yield etcd
    finally:
        etcd.stop()


@dataclass
class SecureWorld(World):
    """The harness's World, reaching etcd over TLS as the agents' user."""

    pki: Pki | None = None

    def tls(self, **overrides: Any) -> dict[str, Any]:
        assert self.pki is not None
        base = {"etcd__ca_cert": str(self.pki.ca), "etcd__cert": str(self.pki.client.cert),
                "etcd__key": str(self.pki.client.key), "etcd__username": USER,
                "etcd__password": PASSWORD}
        base.update(overrides)
        return base

    def add_agent(self, name: str, **overrides: Any) -> AgentProc:
        """As World's, plus a [notify] section (the harness writes only the others)."""
        notify = {k.split("__")[1]: v for k, v in overrides.items() if k.startswith("notify__")}
        agent = super().add_agent(
            name, **{k: v for k, v in overrides.items() if not k.startswith("notify__")})
        if notify:
            with agent.config.open("a") as f:
                f.write("[notify]\n" + "".join(f"{k} = {toml_value(v)}\n"
                                               for k, v in notify.items()))
        return agent

    def store(self) -> EtcdStore:
        assert self.pki is not None
        return EtcdStore(EtcdSettings(tuple(self.endpoints), 1.0, str(self.pki.ca),
                                      str(self.pki.client.cert), str(self.pki.client.key),
                                      USER, PASSWORD), Keys(self.prefix, PRODUCER))


def _metrics_port(log: str) -> int:
    m = re.search(r"event=metrics_listening port=(\d+)", log)
    assert m, "agent did not log its metrics port"
    return int(m.group(1))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bpleader.cli", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))


def test_agents_elect_and_fail_over_over_tls_with_rbac(secure_etcd: SecureEtcd, pki: Pki,
                                                       tmp_path: Path) -> None:
    """Also the secret-leak check: every output of this full run is grepped for the
    password and the webhook URL."""
    nodes = ["bp-a", "bp-b"]
    with SimCluster(PRODUCER, nodes, pause_on_startup=True, **CHAIN) as sim:
        world = SecureWorld(tmp_path, secure_etcd.endpoints, sim, pki=pki)
        try:
            for n in nodes:
                world.add_agent(n, **world.tls(notify__slack_webhook=WEBHOOK)).start()
            leader = world.wait_single_producer(40)
            other = next(n for n in nodes if n != leader)
            assert sim.node(other).paused
            # Everything the agents wrote lives under the producer's prefix: the role
            # granted nothing else, and the run worked.
            keys = secure_etcd.must("get", "--prefix", "--keys-only", "/").split()
            assert keys and all(k.startswith(f"/bpleader/{PRODUCER}/") for k in keys), keys

            outputs: dict[str, str] = {}
            cfg = str(world.agents[leader].config)
            status = _cli("status", "--json", "--config", cfg)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["leader"] == leader
            outputs["status --json"] = status.stdout + status.stderr
            plain = _cli("status", "--config", cfg)
            outputs["status"] = plain.stdout + plain.stderr
            check = _cli("check-config", cfg)
            assert check.returncode == 0, check.stderr
            outputs["check-config"] = check.stdout + check.stderr
            port = _metrics_port(world.agents[leader].log_text())
            for path in ("/metrics", "/health", "/leader"):
                outputs[path] = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).text

            t0 = time.monotonic()
            world.agents[leader].kill()
            new = world.wait_single_producer(30, exclude=leader)
            assert new == other
            failover_s = time.monotonic() - t0
            assert failover_s < 30
            world.stop_all()
            for n in nodes:
                outputs[f"{n} log"] = world.agents[n].log_text()
            summary = sim.ledger_summary()
            assert summary["double_produced_slots"] == 0, summary
            assert summary["double_produced_heights"] == 0, summary
        finally:
            world.stop_all()
    # The run produced real output (so the grep below can fail): role changes were logged.
    assert "event=transition" in outputs["bp-a log"] + outputs["bp-b log"]
    assert "bpleader_" in outputs["/metrics"]
    for where, text in outputs.items():
        assert PASSWORD not in text, f"etcd password leaked in {where}"
        assert WEBHOOK not in text and "XyZsecretwebhook42" not in text, \
            f"webhook leaked in {where}"
        assert "Traceback" not in text, f"stack trace in {where}"


def test_one_producer_over_tls_while_the_raft_leader_member_is_down(
        secure_etcd: SecureEtcd, pki: Pki, tmp_path: Path) -> None:
    """The raft leader member is killed, and with it down one node produces, and a
    switchover (agents and CLI writing over TLS as their user to the members left)
    moves production to the other node; then the member comes back."""
    nodes = ["bp-a", "bp-b"]
    with SimCluster(PRODUCER, nodes, pause_on_startup=True, **CHAIN) as sim:
        world = SecureWorld(tmp_path, secure_etcd.endpoints, sim, pki=pki)
        try:
            for n in nodes:
                world.add_agent(n, **world.tls()).start()
            world.wait_single_producer(40)
            member = secure_etcd.leader()
            secure_etcd.kill_member(member)
            producer = world.wait_single_producer(20)
            target = next(n for n in nodes if n != producer)
            wait_for(lambda: (r := world.snapshot()) is not None
                     and r.records.get(target) is not None and r.records[target].in_sync,
                     20, what="switchover target in sync")
            res = _cli("switchover", "--config", str(world.agents[producer].config))
            assert res.returncode == 0, res.stdout + res.stderr
            assert world.wait_single_producer(30, exclude=producer) == target
            secure_etcd.start_member(member)
            wait_for(lambda: secure_etcd.etcdctl("endpoint", "health").returncode == 0,
                     30, what="member back")
            logs = "".join(world.agents[n].log_text() for n in nodes)
            world.stop_all()
            summary = sim.ledger_summary()
        finally:
            world.stop_all()
            for m in secure_etcd.members:
                if not m.alive():
                    secure_etcd.start_member(m)
    assert summary["double_produced_slots"] == 0, summary
    assert summary["double_produced_heights"] == 0, summary
    assert "Traceback" not in logs and PASSWORD not in logs


def test_a_fresh_client_logs_in_and_reads_while_a_member_is_down(secure_etcd: SecureEtcd,
                                                                   pki: Pki) -> None:
    """pyetcd logs in on a member drawn at random and gives up when it is down: every
    one-shot command with a password then failed one time in three."""
    secure_etcd.kill_member(secure_etcd.members[0])

    async def fresh_read() -> int:
        store = EtcdStore(EtcdSettings(tuple(secure_etcd.endpoints), 1.0, str(pki.ca),
                                       str(pki.client.cert), str(pki.client.key), USER,
                                       PASSWORD), Keys("/bpleader", PRODUCER))
        try:
            return (await store.snapshot()).revision
        finally:
            store.close()

    try:
        for _ in range(10):  # without the fix all ten succeed with p = (2/3)^10 < 2 %
            assert asyncio.run(fresh_read()) > 0
    finally:
        secure_etcd.start_member(secure_etcd.members[0])
        wait_for(lambda: secure_etcd.etcdctl("endpoint", "health").returncode == 0, 30,
                 what="member back")


# (case, config overrides, words the one-line error must contain)
REFUSALS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("wrong-ca", {"etcd__ca_cert": "stranger_ca"},
     ("server certificate is not trusted by etcd.ca_cert", "CERTIFICATE_VERIFY_FAILED")),
    ("expired-cert", {"etcd__cert": "expired.cert", "etcd__key": "expired.key"},
     ("rejected the client certificate", "etcd.cert expired on")),
    ("unknown-cert", {"etcd__cert": "stranger.cert", "etcd__key": "stranger.key"},
     ("rejected the client certificate", "issued by commonName=stranger-ca")),
    ("wrong-password", {"etcd__password": "not-the-password"},
     ("authentication failed", "etcd.username or etcd.password")),
    ("no-rights", {"etcd__username": "norights"},
     ("permission denied", f"readwrite on prefix /bpleader/{PRODUCER}/")),
]


def _resolve(pki: Pki, overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in overrides.items():
        if k.startswith("etcd__") and k not in ("etcd__password", "etcd__username"):
            obj: Any = pki
            for part in v.split("."):
                obj = getattr(obj, part)
            v = str(obj)
        out[k] = v
    return out


def test_refused_agents_stay_paused_with_one_clear_line_and_backoff(
        secure_etcd: SecureEtcd, pki: Pki, tmp_path: Path) -> None:
    names = [case for case, _, _ in REFUSALS]
    # Watch for at least 7 s, and on until every agent has announced a wait past the
    # first steps: five agents starting at once on a loaded machine may reach their
    # first attempt seconds late, and a fixed window then sees too few steps.
    least_s, most_s = 7.0, 40.0

    def grown(log: str) -> bool:
        return any(float(w) > 1.0 for w in re.findall(r"next try in ([0-9.]+) s", log))

    with SimCluster(PRODUCER, names, pause_on_startup=True, **CHAIN) as sim:
        world = SecureWorld(tmp_path, secure_etcd.endpoints, sim, pki=pki)
        try:
            for case, overrides, _ in REFUSALS:
                world.add_agent(case, **world.tls(**_resolve(pki, overrides))).start()
            t0 = time.monotonic()
            while True:
                assert world.producing() == [], "a refused agent's nodeos was resumed"
                observe_s = time.monotonic() - t0
                if observe_s >= most_s or (observe_s >= least_s and all(
                        grown(world.agents[c].log_text()) for c in names)):
                    break
                time.sleep(0.1)
            for case in names:
                assert world.agents[case].running, f"{case}: the agent exited"
            logs = {case: world.agents[case].log_text() for case in names}
        finally:
            world.stop_all()
        summary = sim.ledger_summary()
    assert sum(summary["blocks_by_node"].values()) == 0, summary
    for case, _, words in REFUSALS:
        log = logs[case]
        assert "Traceback" not in log, f"{case}: stack trace in the log"
        # A request that timed out on a loaded machine is not the refusal under test.
        errors = [ln for ln in log.splitlines()
                  if ("event=etcd_error" in ln or "event=lease_grant_failed" in ln)
                  and "deadline" not in ln.lower() and "no answer within" not in ln]
        assert errors, f"{case}: no etcd error logged"
        for word in words:
            assert all(word in ln for ln in errors), f"{case}: {word!r} missing in {errors[0]}"
        # Backoff: real attempts (lines without "next try in") are few, and the announced
        # wait grows past the first step.
        attempts = [ln for ln in errors if "next try in" not in ln]
        waits = [float(w) for w in re.findall(r"next try in ([0-9.]+) s", log)]
        assert waits and max(waits) > 1.0, f"{case}: backoff did not grow: {waits[-5:]}"
        ticks = observe_s / float(world.timing["check_interval"])
        assert len(attempts) < ticks / 2, f"{case}: {len(attempts)} attempts in {observe_s} s"
        assert "event=transition" not in log or "-> leader" not in log


def test_store_reports_each_refusal_in_one_line(secure_etcd: SecureEtcd, pki: Pki) -> None:
    """The same refusals through EtcdStore alone: fast, and the wording is checked
    without an agent in between."""
    async def reason(overrides: dict[str, Any]) -> str:
        kw: dict[str, Any] = {"ca_cert": str(pki.ca), "cert": str(pki.client.cert),
                              "key": str(pki.client.key), "username": USER,
                              "password": PASSWORD}
        kw.update({k.removeprefix("etcd__").replace("ca_cert", "ca_cert"): v
                   for k, v in _resolve(pki, overrides).items()})
        store = EtcdStore(EtcdSettings((secure_etcd.endpoint,), 1.0, **kw),
                          Keys("/bpleader", PRODUCER))
        try:
            await store.snapshot()
        except StoreError as exc:
            return str(exc)
        finally:
            store.close()
        return ""

    for case, overrides, words in REFUSALS:
        text = asyncio.run(reason(overrides))
        assert text, f"{case}: no error"
        assert "\n" not in text and PASSWORD not in text and "not-the-password" not in text
        for word in words:
            assert word in text, f"{case}: {word!r} not in {text!r}"
    assert asyncio.run(reason({})) == ""  # and the good settings work
