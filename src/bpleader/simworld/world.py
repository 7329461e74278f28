"""The simulated world: nodes (host clock, nodeos, agent process, guard), etcd, the chain,
and the invariant checks; one seed, one run, one deterministic trace.

The agent is the production :class:`bpleader.agent.Agent` (or, for the tests that prove
the simulation finds bugs, a subclass with one safety layer removed), built on the
simulated Clock, Store, Nodeos and Fencer and run on a :class:`SimLoop`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bpleader.agent import Agent, AgentSettings, Fencer, Nodeos, Role
from bpleader.antelope import new_private_key, public_key_of
from bpleader.clock import Clock
from bpleader.finalizer import KeySwitcher, TransactionSwitcher
from bpleader.nodeos import FinalityRule, SyncEvaluator
from bpleader.sim.finality import simulated_bls_key
from bpleader.sim.ledger import Violation as LedgerViolation
from bpleader.sim.model import ChainConfig, ChainModel, ChainNode
from bpleader.sim.nodeos_api import Identity, NodeosApi
from bpleader.sim.system import SystemContract
from bpleader.simworld.clocks import EPOCH, HostClock, ProcClock
from bpleader.simworld.etcd import CallHooks, Link, Network, SimEtcd, StoreClient
from bpleader.simworld.fencer import SimGuard
from bpleader.simworld.loop import SimLoop
from bpleader.simworld.nodeos import CHAIN_ID, VERSION, NodeosClient, SimNodeos
from bpleader.simworld.process import Process
from bpleader.simworld.scenario import PERMISSION, PRODUCER, SLOT, Scenario
from bpleader.simworld.trace import Trace
from bpleader.store import Keys, Store

NODE_NAMES = ("bp-a", "bp-b", "bp-c", "bp-d", "bp-e")
NODEOS_RESTART = 5.0  # seconds systemd takes to start a killed nodeos again

AgentFactory = Callable[[AgentSettings, Clock, Store, Nodeos, Fencer, SyncEvaluator,
                         KeySwitcher | None], Agent]
# A block is finished and broadcast this long before its slot ends (nodeos's produce-time
# offset), so the next producer normally has it when its own slot starts.
CUTOFF = 0.1


@dataclass(frozen=True)
class Violation:
    kind: str  # double-production, equivocation, shared-key, lock, liveness, agent-error,
    # sim-error
    time: float
    text: str
    trace: str

    @property
    def safety(self) -> bool:
        return self.kind != "liveness"


@dataclass
class Result:
    seed: int
    scenario: str
    sim_seconds: float
    nodes: int
    violations: list[Violation]
    trace: str
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def node_hours(self) -> float:
        return self.sim_seconds * self.nodes / 3600.0


class Node:
    """One producer host: its clock, nodeos, and the current agent process with its guard."""

    def __init__(self, world: World, name: str, rate: float, skew: float, paused: bool) -> None:
        self.world = world
        self.name = name
        self.host = HostClock(world.loop, rate, 1000.0 + 97.0 * len(world.nodes), skew)
        self.nodeos = SimNodeos(name, world.model, world.api, world.loop,
                                world.rng("nodeos-" + name), world.trace)
        self.process: Process | None = None
        self.agent: Agent | None = None
        self.guard: SimGuard | None = None
        self.incarnation = 0
        self.api_fault_until = 0.0  # the API misbehaved until then (for the lock check)
        self.revoked_at = -1e9  # an operator revoked its lease by hand then
        self._stop: asyncio.Event | None = None
        self._stop_pending = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.alive

    @property
    def role(self) -> Role | None:
        return self.agent.role if self.running and self.agent is not None else None

    def start_agent(self) -> None:
        w = self.world
        if self.running:
            self.crash_agent("killed before a restart")
        self.incarnation += 1
        proc = Process(w.loop, self.name, self.incarnation)
        t = w.scenario.timing
        guard = SimGuard(w.loop, self.host, self.nodeos, t.nodeos_timeout, t.check_interval,
                         w.trace, self.kill_nodeos if w.scenario.kill_fence else None,
                         max(t.nodeos_timeout * 4, 1.0) if w.scenario.slow_kill else None)
        client = NodeosClient(self.nodeos, t.nodeos_timeout, proc, "agent", w.hooks)
        switcher = None
        if w.scenario.savanna and w.scenario.finalizer:
            key = next(iter(w.model.node(self.name).keys))
            switcher = TransactionSwitcher(client, key, PRODUCER, PERMISSION, w.k1_key)
        agent = w.factory(
            t.settings(self.name, w.scenario.finality), ProcClock(self.host, proc),
            StoreClient(w.network, self.name, proc, t.etcd_timeout, w.hooks),
            client, guard,
            SyncEvaluator(t.max_head_lag, CHAIN_ID,
                          FinalityRule(t.max_lib_lag, t.max_lib_age)), switcher)
        self.process, self.agent, self.guard = proc, agent, guard
        self._stop, self._stop_pending = asyncio.Event(), False
        w.trace.add(self.name, f"agent #{self.incarnation} started")
        task = w.loop.spawn(agent.run(self._stop), proc)
        task.add_done_callback(partial(self._agent_done, proc, guard))

    def _agent_done(self, proc: Process, guard: SimGuard, task: asyncio.Task[bool]) -> None:
        if task.cancelled():
            return  # killed: crash_agent did the rest
        exc = task.exception()
        if exc is not None:
            text = "".join(traceback.format_exception(exc)).strip().replace("\n", " | ")
            self.world.violation("agent-error", f"{proc.name} raised: {text}")
        else:
            self.world.trace.add(self.name, f"agent {proc.name} exited "
                                 f"({'clean' if task.result() else 'pause unconfirmed'})")
        proc.kill()  # leftover tasks (a pending sleep) die with the process
        guard.orphan()

    def kill_nodeos(self) -> None:
        """The guard's kill command; systemd starts nodeos again a few seconds later,
        paused (pause-on-startup), and it catches up with the chain."""
        n = self.nodeos
        if not n.up:
            return
        n.crash()

        def restart() -> None:
            if not n.up:
                n.start(True, 1.0)
        self.world.loop.call_at(self.world.loop.time() + NODEOS_RESTART, restart)

    def crash_agent(self, why: str = "crash") -> None:
        if self.process is None or not self.process.alive:
            return
        self.world.trace.add(self.name, f"agent {self.process.name} killed ({why})")
        self.process.kill()
        if self.guard is not None:
            self.guard.orphan()

    def stop_agent(self) -> None:
        """SIGTERM: a stopped (frozen) process handles it once it is continued."""
        if not self.running or self._stop is None:
            return
        self.world.trace.add(self.name, "agent asked to stop (SIGTERM)")
        if self.process is not None and self.process.frozen:
            self._stop_pending = True
        else:
            self._stop.set()

    def freeze(self) -> bool:
        if not self.running or self.process is None or self.process.frozen:
            return False
        self.world.trace.add(self.name, f"agent {self.process.name} frozen (SIGSTOP) as "
                             f"{self.role.value if self.role else '?'}")
        self.process.freeze()
        return True

    def thaw(self, process: Process) -> None:
        if process is not self.process or not process.alive or not process.frozen:
            return
        self.world.trace.add(self.name, f"agent {process.name} thawed (SIGCONT)")
        process.thaw()
        if self._stop_pending and self._stop is not None:
            self._stop_pending = False
            self._stop.set()

    def api_faulty(self, now: float) -> bool:
        n = self.nodeos
        return n.hung or n.api_hung or n.api_extra > 0 or now < self.api_fault_until

    def in_sync(self, now: float) -> bool:
        n = self.nodeos
        return n.up and not n.hung and \
            EPOCH + now - n.head_time() <= self.world.scenario.timing.max_head_lag

    def producing(self, now: float) -> bool:
        """Leader with an unpaused, in-sync nodeos: what liveness asks for."""
        return self.role == Role.LEADER and self.nodeos.producing() and self.in_sync(now)


class World:
    def __init__(self, scenario: Scenario, factory: AgentFactory | None = None) -> None:
        self.scenario = scenario
        self.factory: AgentFactory = factory or Agent
        self.loop = SimLoop()
        self.loop.set_exception_handler(self._loop_error)
        self.loop.set_before_advance(self._check)
        self.trace = Trace(self.loop.time, scenario.keep_trace)
        self.keys = Keys("/bpleader", PRODUCER)
        self.etcd = SimEtcd(self.loop, self.keys, self.rng("etcd"), self.trace)
        self.network = Network(self.loop, self.etcd, self.rng("net"),
                               scenario.faults is not None and scenario.faults.late_requests)
        self._p2p = self.rng("p2p")
        self.hooks = CallHooks()
        self.violations: list[Violation] = []
        self._stop_at: asyncio.TimerHandle | None = None
        self.excused = 0
        self.nodes: dict[str, Node] = {}
        setup = self.rng("setup")
        names = NODE_NAMES[:scenario.nodes]
        clocks = [(1.0 + setup.uniform(-scenario.max_drift, scenario.max_drift),
                   setup.uniform(-scenario.max_wall_skew, scenario.max_wall_skew))
                  for _ in names]
        # A cluster taken over from the old scripts may have one node producing.
        paused = {n: not (i == 0 and setup.random() < 0.5) for i, n in enumerate(names)}
        shared = simulated_bls_key(f"{PRODUCER}-shared")
        keys = {n: shared if scenario.shared_key else simulated_bls_key(f"{scenario.seed}/{n}")
                for n in names}
        config = ChainConfig(PRODUCER, names, scenario.chain_schedule(), round(SLOT * 1000),
                             epoch_ms=round(EPOCH * 1000), savanna=scenario.savanna,
                             bls_keys=keys, vote_timeout=scenario.vote_timeout,
                             pause_on_startup=paused, keep=2000)
        self.k1_key = new_private_key(f"{scenario.seed}/finkey".encode())
        contract = SystemContract.for_chain(config, PERMISSION, public_key_of(self.k1_key)) \
            if scenario.savanna else None
        self.model = ChainModel(config, self._delay, contract, self._ledger_violation)
        self.ledger = self.model.ledger
        self.api = NodeosApi(self.model, contract, Identity(CHAIN_ID, VERSION))
        for name, (rate, skew) in zip(names, clocks, strict=True):
            self.nodes[name] = Node(self, name, rate, skew, paused[name])
            self.network.links[name] = Link()
        self._node_list = list(self.nodes.values())
        self._ended = False
        self._started = False

    def rng(self, stream: str) -> random.Random:
        """An independent, seeded stream per concern: a change in how often one part
        draws numbers does not reshuffle the fault schedule."""
        return random.Random(f"{self.scenario.seed}/{stream}")

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start agents and the slot clock (the fault scheduler is started by run())."""
        self._started = True
        self.loop.call_at(0.0, self._slot, 0)
        for node in self._node_list:
            node.start_agent()

    def run_until(self, t: float) -> None:
        """Advance virtual time to ``t`` (or to the end after a violation)."""
        if not self._started:
            self.start()
        if self._ended or t <= self.loop.time():
            return
        handle = self.loop.call_at(t, self.loop.stop)
        with _TraceLogging(self):
            self.loop.run_forever()
        handle.cancel()

    def run(self, extra: Callable[[World], Any] | None = None) -> Result:
        """The whole scenario; ``extra`` starts the fault scheduler (or anything else)."""
        try:
            if extra is not None:
                extra(self)  # before the agents start: they take the world's hooks
            self.start()
            self.run_until(self.scenario.duration)
            return self.result()
        finally:
            self.close()

    def result(self) -> Result:
        now = self.loop.time()
        stats = {"blocks": self.ledger.our_blocks,
                 "double_productions": self.ledger.double_production_events,
                 "equivocations": self.ledger.equivocations, "votes": self.ledger.votes,
                 "excused_lock": self.excused, "trace_lines": self.trace.count}
        for node in self._node_list:
            if node.agent is not None:
                stats[f"{node.name}.resumes"] = node.agent.stats.resumes
                stats[f"{node.name}.incarnations"] = node.incarnation
        return Result(self.scenario.seed, self.scenario.describe(), now, len(self.nodes),
                      list(self.violations),
                      self.trace.text() if self.scenario.keep_trace is None else "", stats)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        for node in self._node_list:
            if node.process is not None:
                node.process.kill()
        tasks = sorted(asyncio.all_tasks(self.loop), key=lambda t: t.get_name())
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    # ------------------------------------------------------------------- chain

    def now(self) -> float:
        """The chain's wall clock: true time."""
        return EPOCH + self.loop.time()

    def _delay(self, sender: ChainNode, receiver: ChainNode) -> float:
        """p2p propagation between two nodes, slower around a node with slow links."""
        extra = max(sender.p2p_extra, receiver.p2p_extra)
        return self._p2p.uniform(0.005, 0.05) + (self._p2p.uniform(0, extra) if extra
                                                  else 0.0)

    def _slot(self, k: int) -> None:
        """Slot start: whoever may produce now starts a block on its head."""
        self.model.begin_slot(k, self.now())
        self.loop.call_at((k + 1) * SLOT - CUTOFF, self._finish, k)
        self.loop.call_at((k + 1) * SLOT, self._slot, k + 1)

    def _finish(self, k: int) -> None:
        """Blocks started at the slot start are signed and sent, paused since or not."""
        for block in self.model.finish_slot(k, self.now()):
            self.trace.add(str(block.signer), f"signed #{block.height} slot {block.slot}")

    def rejoin(self, n: SimNodeos, catch_up: float) -> None:
        """``n`` is back on the p2p network: it catches up, and the others get its head."""
        self.model.rejoin(n.name, self.now(), catch_up)

    # ------------------------------------------------------------------ checks

    def _ledger_violation(self, v: LedgerViolation) -> None:
        kind = {"slot": "double-production", "height": "double-production",
                "equivocation": "equivocation", "shared_key": "shared-key"}[v.kind]
        self.violation(kind, v.describe())

    def violation(self, kind: str, text: str) -> None:
        now = self.loop.time()
        self.trace.add("CHECK", f"VIOLATION {kind}: {text}")
        self.violations.append(Violation(kind, now, text, self.trace.text()))
        if kind not in ("liveness", "lock", "shared-key") and self._stop_at is None:
            # Let the aftermath play out a little, then end the run (a lock violation
            # goes on: whether it ends in a double production is the next question).
            self._stop_at = self.loop.call_at(now + self.scenario.stop_after_violation,
                                              self._end)

    def _end(self) -> None:
        self._ended = True
        self.loop.stop()

    def _check(self) -> None:
        """Every time virtual time is about to move: nobody produces without the lock."""
        now = self.loop.time()
        leader: tuple[str, float] | None = None
        looked_up = False  # etcd is asked at most once, and only when someone produces
        t = self.scenario.timing
        for node in self._node_list:
            n = node.nodeos
            if n.pause_flag or not n.up or n.unpaused_by != "agent":
                continue
            if not looked_up:
                leader, looked_up = self.etcd.leader(), True
            # The fence fires at the local deadline - fence_guard; its pause call may take
            # up to nodeos_timeout; the host clock may be off by max_drift of the TTL.
            slack = t.nodeos_timeout + self.scenario.max_drift * t.lease_ttl * 2
            if leader and leader[0] == node.name and now <= leader[1] - t.fence_guard + slack:
                continue
            if node.api_faulty(now):
                self.excused += 1  # the agent asked; a hung nodeos did not listen
                continue
            if n.resumed_at < node.revoked_at and \
                    now < node.revoked_at + 2 * t.check_interval + 3 * t.nodeos_timeout + 0.5:
                self.excused += 1  # its lease went behind its back: it learns next tick
                continue
            holder = f"{leader[0]} until {leader[1]:.3f}" if leader else "nobody"
            self.violation("lock", f"{node.name} is unpaused by its agent but the lock is "
                           f"held by {holder} (fence guard {t.fence_guard})")
            n.unpaused_by = "agent (reported)"  # report once per resume

    def producers(self) -> list[str]:
        now = self.loop.time()
        return [node.name for node in self._node_list if node.producing(now)]

    def check_liveness(self, since: float) -> None:
        """Called by the scheduler once faults have been healed for the liveness bound.

        On Savanna with per-node keys, the producing node's own key must be the active one
        by then too: otherwise its production stops at the next implicit pause.
        """
        producers = self.producers()
        if producers and self.scenario.savanna and self.scenario.finalizer \
                and not self.scenario.shared_key:
            state = self.model.canonical.head.policies
            active = state.active.key_of(PRODUCER) if state else None
            keys = self.model.node(producers[0]).keys
            if active not in keys:
                owner = next((n for n, k in self.model.finalizer_keys() if active in k), None)
                self.violation("liveness", f"{producers[0]} produces but the active finalizer"
                               f" key is {owner or 'no node'}'s "
                               f"{self.loop.time() - since:.1f} s after the last fault "
                               "healed: it will stop at the next implicit pause")
            return
        if producers:
            return
        if self.etcd.kvs.get(self.keys.maintenance) is not None:
            return
        if any(n.role == Role.FENCED for n in self._node_list):
            return  # a doppelganger alarm keeps nodes out for a quiet period, by design
        roles = ", ".join(f"{n.name}={n.role.value if n.role else 'down'}"
                          f"{'' if n.in_sync(self.loop.time()) else '(out of sync)'}"
                          for n in self._node_list)
        self.violation("liveness", f"no in-sync node producing {self.loop.time() - since:.1f}"
                       f" s after the last fault healed; {roles}")

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "never retrieved" in message or "destroyed but it is pending" in message:
            return  # garbage collection of futures of killed processes: not an event
        exc = context.get("exception")
        detail = "".join(traceback.format_exception(exc)) if exc else ""
        self.violation("sim-error", f"{message} {detail}".strip().replace("\n", " | "))


class _TraceLogging:
    """Routes the agent's log lines into the trace while the loop runs."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.logger = logging.getLogger("bpleader")
        self.handler = _TraceHandler(world.trace)
        self._saved: tuple[int, bool] = (0, True)

    def __enter__(self) -> None:
        self._saved = (self.logger.level, self.logger.propagate)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.logger.addHandler(self.handler)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._saved[0])
        self.logger.propagate = self._saved[1]


class _TraceHandler(logging.Handler):
    def __init__(self, trace: Trace) -> None:
        super().__init__(logging.INFO)
        self.trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        who = "agent"
        if text.startswith("node="):
            head, _, text = text.partition(" ")
            who = head[len("node="):]
        mark = "!" if record.levelno >= logging.WARNING else " "
        self.trace.add(who, f"{mark}{text}")
