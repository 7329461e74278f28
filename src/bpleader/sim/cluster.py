"""SimCluster: the simulated nodes of one producer, their chain, and the slot clock.

This is what tests, the demo and benchmarks start. Each node is a real HTTP server
(TCP or unix socket) speaking nodeos's API; the agents cannot tell it from nodeos for
the calls they make. The slot clock is a thread that runs each slot at its wall-clock
boundary, computing every wait from the wall clock so that it never drifts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from bpleader.antelope import decode_bls_public_key
from bpleader.sim.chain import Schedule
from bpleader.sim.control import ControlServer
from bpleader.sim.engine import Engine
from bpleader.sim.faults import DOWN_FAULTS, check_fault
from bpleader.sim.finality import DEFAULT_VOTE_TIMEOUT
from bpleader.sim.model import ChainConfig
from bpleader.sim.node import ApiCall, NodeServer
from bpleader.sim.nodeos_api import Identity
from bpleader.sim.system import SystemContract

log = logging.getLogger("bpleader.sim.cluster")

DEFAULT_CHAIN_ID = hashlib.sha256(b"bpleader simulated chain").hexdigest()
SPRING_VERSION = "v1.2.2"  # what a Savanna chain's nodeos reports
LEAP_VERSION = "v5.0.3"  # and a legacy one's
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
PERMISSION_NAME = re.compile(r"^[a-z1-5.]{1,12}$")  # an Antelope name
# A failed restart (its port taken meanwhile) is tried again this much later.
RETRY_START = 0.5


class SimNode:
    """A handle on one simulated nodeos: its URL, its state, and its faults."""

    def __init__(self, cluster: SimCluster, server: NodeServer) -> None:
        self._cluster = cluster
        self._server = server
        self.name = server.name

    def __repr__(self) -> str:
        return f"SimNode({self.name!r}, {self.url!r})"

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def paused(self) -> bool:
        """nodeos's pause flag (while down: the flag the process had when it stopped)."""
        return self._cluster.engine.is_paused(self.name)

    @property
    def up(self) -> bool:
        return self._cluster.engine.is_up(self.name)

    @property
    def producing(self) -> bool:
        """Up and unpaused: it signs in our slots unless desynced."""
        return self.up and not self.paused

    @property
    def faults(self) -> dict[str, dict[str, float]]:
        return self._cluster.engine.faults(self.name)

    @property
    def calls(self) -> list[ApiCall]:
        """The most recent API calls (100 000 kept), oldest first."""
        return self._server.calls.snapshot()

    def call_count(self, path: str) -> int:
        """How many calls ``path`` received since the start (for example the resumes)."""
        return self._server.calls.count(path)

    def status(self) -> dict[str, Any]:
        return {**self._cluster.engine.node_status(self.name), "url": self.url,
                "calls": self._server.calls.count_all()}

    def set_fault(self, kind: str, **params: float) -> None:
        """Inject a fault (see :data:`bpleader.sim.faults.FAULTS`); ValueError if invalid."""
        checked = check_fault(kind, params)
        if kind == "restart":
            self.restart(checked["down"])
        elif kind == "kill":
            self.kill()
        else:
            self._cluster.engine.set_fault(self.name, kind, checked)

    def clear_faults(self, *kinds: str) -> None:
        """Clear the given faults, or all; clearing a kill or restart starts the node now."""
        cleared = self._cluster.engine.clear_faults(self.name, kinds)
        if DOWN_FAULTS & set(cleared):
            self.start()

    def restart(self, down_seconds: float) -> None:
        """Stop the process now; it starts again after ``down_seconds``."""
        check_fault("restart", {"down": down_seconds})
        with self._cluster.life_lock:
            self._cluster.engine.go_down(self.name, down_seconds)
            self._server.stop()
        self._cluster.wake()

    def kill(self) -> None:
        """Stop the process until :meth:`start`; connections are refused meanwhile."""
        with self._cluster.life_lock:
            self._cluster.engine.go_down(self.name, None)
            self._server.stop()

    def start(self) -> None:
        """Start a stopped process (paused only with pause-on-startup); no-op when up."""
        self._cluster.bring_up(self.name)


class SimCluster:
    """Simulated nodeos nodes of ``producer`` on one simulated chain, plus a control API.

    ``pause_on_startup`` is one flag for all nodes or a flag per node (missing: False):
    True starts and restarts that node paused, as nodeos's ``pause-on-startup``; False
    starts it producing, as nodeos does by default. With ``unix_dir`` every node listens
    on ``unix_dir/<name>.sock`` instead of TCP.
    """

    def __init__(self, producer: str, nodes: Sequence[str], *,
                 other_producers: Sequence[str] = (), slots_per_producer: int = 12,
                 block_interval: float = 0.5,
                 pause_on_startup: Mapping[str, bool] | bool = False,
                 unix_dir: Path | None = None, host: str = "127.0.0.1", base_port: int = 0,
                 control_port: int = 0, chain_id: str = DEFAULT_CHAIN_ID,
                 server_version_string: str | None = None, savanna: bool = True,
                 bls_keys: Mapping[str, str | None] | None = None,
                 vote_timeout: float = DEFAULT_VOTE_TIMEOUT,
                 finalizer_permission: str | None = None,
                 finalizer_permission_key: str | None = None,
                 link_finalizer_permission: bool = True,
                 unregistered_keys: Sequence[str] = ()) -> None:
        _check(producer, nodes, other_producers, slots_per_producer, block_interval,
               pause_on_startup, chain_id, base_port)
        _check_savanna(nodes, savanna, bls_keys or {}, vote_timeout, finalizer_permission,
                       finalizer_permission_key, unregistered_keys)
        flags = {n: (pause_on_startup if isinstance(pause_on_startup, bool)
                     else pause_on_startup.get(n, False)) for n in nodes}
        config = ChainConfig(
            producer, tuple(nodes),
            Schedule.round_robin((producer, *other_producers), slots_per_producer),
            interval_ms=round(block_interval * 1000), savanna=savanna,
            bls_keys=dict(bls_keys or {}), vote_timeout=vote_timeout,
            pause_on_startup=flags)
        contract = SystemContract.for_chain(
            config, finalizer_permission, finalizer_permission_key,
            link_finalizer_permission, unregistered_keys) if savanna else None
        version = server_version_string or (SPRING_VERSION if savanna else LEAP_VERSION)
        identity = Identity(chain_id, version)
        self.engine = Engine(config, identity, contract)
        self.savanna = savanna
        self.block_interval = block_interval
        self._servers = {
            name: NodeServer(name, self.engine, host=host,
                             port=base_port + i if base_port else 0,
                             unix_path=unix_dir / f"{name}.sock" if unix_dir else None)
            for i, name in enumerate(nodes)}
        self._nodes = {name: SimNode(self, s) for name, s in self._servers.items()}
        self.control = ControlServer(self, host=host, port=control_port)
        self.life_lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._clock: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._clock is not None:
            raise RuntimeError("a SimCluster starts once")
        for server in self._servers.values():
            if server.http.unix_path is not None:
                server.http.unix_path.parent.mkdir(parents=True, exist_ok=True)
        started: list[NodeServer] = []
        try:
            for server in self._servers.values():
                server.start()
                started.append(server)
            self.control.start()
        except OSError:
            for server in started:
                server.stop()
            raise
        self._clock = threading.Thread(target=self._run_clock, name="sim-slot-clock",
                                       daemon=True)
        self._clock.start()
        log.info("simulator started producer=%s nodes=%s control=%s", self.engine.producer,
                 ",".join(f"{n}={s.url}" for n, s in self._servers.items()), self.control_url)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._clock is not None:
            self._clock.join()
        self.control.stop()
        with self.life_lock:
            for server in self._servers.values():
                server.stop()
                server.http.remove_socket_file()
        log.info("simulator stopped")

    def __enter__(self) -> SimCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def wake(self) -> None:
        """Let the slot clock re-plan (a restart was scheduled)."""
        self._wake.set()

    def bring_up(self, name: str) -> None:
        with self.life_lock:
            server = self._servers[name]
            if self.engine.is_up(name) and server.http.running:
                return
            try:
                server.start()
            except OSError as exc:
                log.error("node=%s event=start_failed error=%s retry_in=%ss", name, exc,
                          RETRY_START)
                self.engine.go_down(name, RETRY_START)
                self.wake()
                return
            self.engine.come_up(name)

    def _run_clock(self) -> None:
        """Run each slot at its boundary; bring restarted nodes back when due."""
        while not self._stopping.is_set():
            now = time.time()
            for name in self.engine.due_restarts(now):
                self.bring_up(name)
            boundary = self.engine.next_boundary()
            if now >= boundary:
                self.engine.tick(now)
                continue
            restart = self.engine.next_restart()
            wake_at = boundary if restart is None else min(boundary, restart)
            self._wake.wait(max(0.0, wake_at - time.time()))
            self._wake.clear()

    # ---------------------------------------------------------------- queries

    @property
    def control_url(self) -> str:
        return self.control.url

    @property
    def node_names(self) -> list[str]:
        return list(self._nodes)

    def node(self, name: str) -> SimNode:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"no simulated node {name!r} (have {list(self._nodes)})") from None

    def urls(self) -> dict[str, str]:
        return {name: node.url for name, node in self._nodes.items()}

    def ledger_summary(self) -> dict[str, Any]:
        """Counts of slots, blocks and double productions (JSON-serialisable)."""
        return self.engine.summary()

    def finalizer_keys(self) -> dict[str, str | None]:
        """Each node's BLS finalizer public key, to configure agents (empty if legacy)."""
        return self.engine.finalizer_keys()

    def finalizers(self) -> dict[str, Any]:
        """The active finalizer key, the node holding it, the policy generation and each
        node's implicit-pause status (JSON-serialisable)."""
        return self.engine.finalizers()

    def slot_records(self, since: int = 0, limit: int = 10_000) -> list[dict[str, Any]]:
        """Who signed what, slot by slot, from slot ``since`` on (oldest first)."""
        return self.engine.slot_records(since, limit)

    def wait_slots(self, n: int, timeout: float | None = None) -> None:
        """Wait until ``n`` more slots have run (TimeoutError after ``timeout``)."""
        limit = timeout if timeout is not None else n * self.block_interval * 2 + 5
        self.engine.wait_slots(n, limit)


def _check_savanna(nodes: Sequence[str], savanna: bool, bls_keys: Mapping[str, str | None],
                   vote_timeout: float, permission: str | None, permission_key: str | None,
                   unregistered: Sequence[str]) -> None:
    """ValueError for finalizer options that are inconsistent or malformed."""
    unknown = sorted((set(bls_keys) | set(unregistered)) - set(nodes))
    if unknown:
        raise ValueError(f"bls_keys and unregistered_keys name unknown nodes: {unknown}")
    for node, key in bls_keys.items():
        if key is not None:
            try:
                decode_bls_public_key(key)
            except ValueError as exc:
                raise ValueError(f"bls_keys[{node!r}] is not a PUB_BLS_ key: {exc}") from None
    if not math.isfinite(vote_timeout) or vote_timeout < 0:
        raise ValueError("vote_timeout must be a number of seconds >= 0")
    if (permission is None) != (permission_key is None):
        raise ValueError("finalizer_permission and finalizer_permission_key go together")
    if permission is not None and not savanna:
        raise ValueError("finalizer_permission needs a Savanna chain (savanna=True)")
    if permission is not None and not PERMISSION_NAME.match(permission):
        raise ValueError(f"finalizer_permission {permission!r} is not an Antelope name")


def _check(producer: str, nodes: Sequence[str], others: Sequence[str], slots_per_producer: int,
           block_interval: float, pause_on_startup: Mapping[str, bool] | bool, chain_id: str,
           base_port: int) -> None:
    """ValueError for a configuration the simulator cannot honour, naming the problem."""
    names = [producer, *nodes, *others]
    bad = [n for n in names if not isinstance(n, str) or not NAME.match(n)]
    if bad:
        raise ValueError(f"names must match {NAME.pattern}: {bad}")
    if not nodes:
        raise ValueError("at least one node is needed")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"node names must be unique: {list(nodes)}")
    if producer in others or len(set(others)) != len(others):
        raise ValueError("other producers must be unique and differ from the producer")
    if slots_per_producer < 1:
        raise ValueError("slots_per_producer must be >= 1")
    if not 0.01 <= block_interval <= 60 or abs(block_interval * 1000 -
                                              round(block_interval * 1000)) > 1e-6:
        raise ValueError("block_interval must be whole milliseconds between 0.01 and 60 s")
    if not isinstance(pause_on_startup, bool):
        unknown = sorted(set(pause_on_startup) - set(nodes))
        if unknown:
            raise ValueError(f"pause_on_startup names unknown nodes: {unknown}")
    if not HEX64.match(chain_id):
        raise ValueError("chain_id must be 64 lowercase hex digits")
    if not 0 <= base_port <= 65535 - len(nodes):
        raise ValueError("base_port out of range")
