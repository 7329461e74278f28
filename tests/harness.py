"""Real processes for integration tests: agents (``bpleader agent``) against real etcd
members and the nodeos simulator, plus polling helpers.

Nothing here fakes behaviour: agents are separate Python processes started exactly as an
operator would start them, talking HTTP to simulated nodeos and gRPC to etcd.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bpleader.antelope import new_private_key, public_key_of
from bpleader.fence import kill_guards
from bpleader.localetcd import ELECTION_TIMEOUT, free_ports
from bpleader.store import EtcdSettings, EtcdStore, Keys, Snapshot, StoreError

T = TypeVar("T")

PRODUCER = "mybp"
# The fast profile of DESIGN.md, so scenarios finish quickly.
FAST_TIMING = {
    "lease_ttl": 2,
    "keepalive_interval": 0.3,
    "fence_guard": 0.9,
    "takeover_delay": 0.5,
    "check_interval": 0.25,
    "continuity_timeout": 3.0,
    "doppelganger_quiet": 10.0,
}
# The simulated chain of agent tests: another producer fills half of every round, as on a
# real chain. Without it the head would stop whenever our leader stops, and a standby
# (or a new leader during its takeover delay) could never look in sync.
CHAIN: dict[str, Any] = {"block_interval": 0.5, "other_producers": ["otherbp"],
                         "slots_per_producer": 4}
# The legacy (pre-Savanna) chain of the agent tests, and the Savanna one: every node its
# own BLS key, the producer's finkey permission linked to eosio::actfinkey, and the agents
# sign actfinkey with its K1 key. A vote timeout shorter than Spring's 6 s default, so a
# new leader without its own key active would stop within the tests' watch.
LEGACY_CHAIN: dict[str, Any] = {**CHAIN, "savanna": False}
FINKEY = new_private_key(b"bpleader tests finkey")
VOTE_TIMEOUT = 3.0
SAVANNA_CHAIN: dict[str, Any] = {**CHAIN, "savanna": True, "vote_timeout": VOTE_TIMEOUT,
                                 "finalizer_permission": "finkey",
                                 "finalizer_permission_key": public_key_of(FINKEY)}
RESULTS = Path(os.environ.get("BPLEADER_RESULTS", "/tmp/bpleader-test-results.jsonl"))


def wait_for(pred: Callable[[], T], timeout: float, interval: float = 0.05,
              what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def start_delay_proxy(target: str, delay: float) -> tuple[int, subprocess.Popen[bytes]]:
    """The chaos benchmark's delaying proxy (``benchmarks.chaos.delay``) in front of
    ``target`` (host:port), adding ``delay`` seconds each way; its loopback port, once it
    listens (the check opens and closes one connection through it)."""
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.chaos.delay", "--listen",
                             f"127.0.0.1:{port}", "--to", target, "--delay", str(delay)],
                            cwd=Path(__file__).resolve().parents[1])

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_for(listening, 10, what="the delaying proxy to listen")
    except AssertionError:
        proc.kill()
        raise
    return port, proc


@contextmanager
def delay_proxies(target: str, delays: Iterable[float]) -> Iterator[list[int]]:
    """One delaying proxy in front of ``target`` per delay; their ports, while in use."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        ports = []
        for delay in delays:
            port, proc = start_delay_proxy(target, delay)
            started.append(proc)
            ports.append(port)
        yield ports
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def record_result(scenario: str, **figures: Any) -> None:
    """Append a scenario's measured figures (for the note and the README, not asserted)."""
    with RESULTS.open("a") as f:
        f.write(json.dumps({"scenario": scenario, **figures}) + "\n")


def toml_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, fields in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in fields.items() if v is not None]
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


@dataclass
class AgentProc:
    name: str
    config: Path
    log_path: Path
    nodeos_url: str
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bpleader.cli", "agent", "--config", str(self.config)],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.running:
            self.thaw()
            self.signal(signal.SIGKILL)
            assert self.proc is not None
            self.proc.wait()

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.running:
            self.signal(signal.SIGCONT)
        self.frozen = False

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, as systemd would; returns the exit status."""
        assert self.proc is not None
        self.thaw()
        if self.running:
            self.signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def count(self, event: str) -> int:
        return self.log_text().count(f"event={event} ")


@dataclass
class World:
    """etcd + simulator + agents of one producer, and what a test asks of them."""

    root: Path
    endpoints: list[str]
    sim: Any  # bpleader.sim.SimCluster
    agents: dict[str, AgentProc] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=lambda: dict(FAST_TIMING))
    prefix: str = "/bpleader"
    # Give agents a [finalizer] section (the simulator needs SAVANNA_CHAIN's permission).
    finalizer: bool = False

    def add_agent(self, name: str, **overrides: Any) -> AgentProc:
        url = self.sim.node(name).url
        sections: dict[str, dict[str, Any]] = {
            "node": {"name": name, "producer": PRODUCER},
            "etcd": {"endpoints": self.endpoints, "prefix": self.prefix,
                     "election_timeout": ELECTION_TIMEOUT},
            "nodeos": {"url": url, "timeout": 0.3, "max_head_lag": 3.0},
            "timing": dict(self.timing),
            "metrics": {"listen": "127.0.0.1:0"},
        }
        use_finalizer = overrides.pop("finalizer", True)
        if self.finalizer and use_finalizer:
            key_file = self.root / f"{name}.finkey"
            key_file.write_text(FINKEY + "\n")
            key_file.chmod(0o600)
            sections["finalizer"] = {"key": self.bls_key(name),
                                     "permission": f"{PRODUCER}@finkey",
                                     "signing_key_file": str(key_file)}
        for key, value in overrides.items():
            section, fld = key.split("__")
            sections.setdefault(section, {})[fld] = value
        cfg = write_config(self.root / f"{name}.toml", sections)
        agent = AgentProc(name, cfg, self.root / f"{name}.log", url)
        self.agents[name] = agent
        return agent

    def bls_key(self, name: str) -> str:
        """The BLS finalizer key the simulator gave node ``name``."""
        return str(next(iter(self.sim.engine.model.node(name).keys)))

    def active_finalizer_node(self) -> str | None:
        return self.ledger().get("active_finalizer_node")  # type: ignore[no-any-return]

    def store(self) -> EtcdStore:
        return EtcdStore(EtcdSettings(tuple(self.endpoints), 1.0), Keys(self.prefix, PRODUCER))

    def snapshot(self) -> Snapshot | None:
        store = self.store()
        try:
            return asyncio.run(store.snapshot())
        except StoreError:
            return None
        finally:
            store.close()

    def etcd_leader(self) -> str | None:
        snap = self.snapshot()
        return snap.leader.node if snap and snap.leader else None

    def producing(self) -> list[str]:
        """Nodes whose simulated nodeos is up and unpaused right now."""
        return [n for n in self.agents if self.sim.node(n).producing]

    def wait_single_producer(self, timeout: float, exclude: str | None = None) -> str:
        def one() -> str | None:
            p = self.producing()
            if len(p) == 1 and p[0] != exclude and self.etcd_leader() == p[0]:
                return p[0]
            return None

        return wait_for(one, timeout, what="exactly one producing leader")

    def ledger(self) -> dict[str, Any]:
        return dict(self.sim.ledger_summary())

    def stop_all(self) -> None:
        for a in self.agents.values():
            if a.running:
                try:
                    a.stop(timeout=10)
                except subprocess.TimeoutExpired:
                    a.kill()
            kill_guards({a.nodeos_url})
