"""The seeded fault scheduler: storms of faults, calm periods, and liveness checks.

A run alternates *storms* (faults arrive at random, each healing after its own duration)
and *calm* periods: once every fault of a storm has healed, the world must have one
in-sync node producing within the liveness bound. Node faults are aimed at the current
leader more often than at random, because that is where failovers, and the races they
open, happen.

Besides faults of the environment, "buggify" faults act at the agent's own I/O points
(as FoundationDB's BUGGIFY does in code): freezing a process right after an answer while
it is taking over or leading, or holding a request back on the wire for seconds. These
reach the narrow windows (between a check and the action it guards) that faults arriving
at random times almost never hit.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from bpleader.agent import Role
from bpleader.simworld.etcd import CallHooks
from bpleader.simworld.process import Process
from bpleader.simworld.scenario import Faults
from bpleader.simworld.world import Node, World

# Store calls whose request buggify may hold back on the wire.
DELAYABLE = frozenset({"resign", "campaign", "keepalive", "publish", "confirm_leader",
                       "revoke", "clear_switchover"})


class FaultScheduler(CallHooks):
    def __init__(self, world: World, cfg: Faults) -> None:
        self.w = world
        self.cfg = cfg
        self.rng = world.rng("faults")
        self.bug_rng = world.rng("buggify")
        self.kinds = [k for k, _ in cfg.weights]
        self.weights = [w for _, w in cfg.weights]
        self.busy: dict[tuple[str, str], float] = {}  # (category, node) -> heal time
        self.heal_by = 0.0
        self.storming = False
        self.injected = 0
        t = world.scenario.timing
        # Old leases may live a TTL after the heal (two with an etcd leader change), then
        # the takeover, a sync check of a restarted nodeos, and a few ticks of slack.
        self.bound = 2 * t.lease_ttl + t.takeover_delay + t.max_head_lag + \
            6 * t.check_interval + 3.0
        # Continuity (layer 10): when a leader vanished without a handover, its successor
        # waits until the network has built past every height the old one may have signed
        # unseen, one per slot for up to a lease TTL (and the key switch); the other
        # producers of these small schedules make only a share of the blocks.
        rounds = world.scenario.schedule
        share = rounds.others / (rounds.ours + rounds.others)
        self.bound += (t.lease_ttl + 4.0) / share

    @classmethod
    def install(cls, world: World) -> FaultScheduler | None:
        cfg = world.scenario.faults
        if cfg is None:
            return None
        scheduler = cls(world, cfg)
        world.hooks = scheduler
        world.loop.spawn(scheduler.run(), None, name="faults")
        return scheduler

    # ----------------------------------------------------------------- phases

    def now(self) -> float:
        return self.w.loop.time()

    async def run(self) -> None:
        await asyncio.sleep(self.bound)
        self.w.check_liveness(0.0)
        while True:
            storm_end = self.now() + self.rng.uniform(*self.cfg.storm)
            self.storming = True
            self.w.trace.add("faults", "storm begins")
            while True:
                gap = self.rng.expovariate(1.0 / self.cfg.mean_gap)
                if self.now() + gap >= storm_end:
                    break
                await asyncio.sleep(gap)
                self.inject()
            self.storming = False
            while self.now() < self.heal_by:
                await asyncio.sleep(self.heal_by - self.now())
            healed = self.now()
            self.w.trace.add("faults", "calm: every fault healed")
            await asyncio.sleep(self.bound)
            self.w.check_liveness(healed)
            await asyncio.sleep(self.cfg.calm)

    # ------------------------------------------------------------ fault plumbing

    def _hold(self, category: str, node: Node, duration: float,
              heal: Callable[[], None], what: str) -> None:
        """Mark ``category`` busy on ``node`` and heal it after ``duration``."""
        until = self.now() + duration
        self.busy[(category, node.name)] = until
        self.heal_by = max(self.heal_by, until)
        self.w.trace.add("faults", f"{what} on {node.name} for {duration:.2f}s")

        def done() -> None:
            self.busy.pop((category, node.name), None)
            heal()
        self.w.loop.call_at(until, done)

    def _free(self, category: str, node: Node) -> bool:
        return (category, node.name) not in self.busy

    def _span(self, low: float, high: float) -> float:
        """Log-uniform: short and long durations equally likely by order of magnitude."""
        return math.exp(self.rng.uniform(math.log(low), math.log(high)))

    def _target(self) -> Node:
        leader = self.w.etcd.leader()
        if leader is not None and leader[0] in self.w.nodes and \
                self.rng.random() < self.cfg.leader_bias:
            return self.w.nodes[leader[0]]
        return self.rng.choice(list(self.w.nodes.values()))

    def inject(self) -> None:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        self.injected += 1
        getattr(self, "_" + kind)(self._target())

    # ------------------------------------------------------------ agent faults

    def _agent_crash(self, node: Node) -> None:
        if self._free("agent", node) and node.running:
            node.crash_agent()
            self._hold("agent", node, self._span(0.2, self.cfg.max_down), node.start_agent,
                       "agent down (SIGKILL)")

    def _agent_stop(self, node: Node) -> None:
        if self._free("agent", node) and node.running:
            node.stop_agent()
            self._hold("agent", node, self._span(0.5, self.cfg.max_down), node.start_agent,
                       "agent stopped (SIGTERM), restart")

    def _agent_freeze(self, node: Node) -> None:
        self._freeze(node, self._span(0.05, self.cfg.max_freeze), "agent frozen")

    def _freeze(self, node: Node, duration: float, what: str) -> None:
        process = node.process
        if process is not None and self._free("freeze", node) and node.freeze():
            self._hold("freeze", node, duration, lambda: node.thaw(process), what)

    # ------------------------------------------------------------ store faults

    def _store_partition(self, node: Node) -> None:
        link = self.w.network.links[node.name]
        if self._free("link", node):
            link.partitioned = True
            self._hold("link", node, self._span(0.3, 20.0),
                       lambda: setattr(link, "partitioned", False), "etcd partition")

    def _store_loss(self, node: Node) -> None:
        link = self.w.network.links[node.name]
        if self._free("link", node):
            link.loss = self.rng.uniform(0.1, 0.9)
            self._hold("link", node, self._span(1.0, 30.0), lambda: setattr(link, "loss", 0.0),
                       f"etcd message loss {link.loss:.0%}")

    def _store_slow(self, node: Node) -> None:
        link = self.w.network.links[node.name]
        if self._free("link", node):
            link.extra_delay = self.rng.uniform(0.05, 3.0)
            self._hold("link", node, self._span(1.0, 30.0),
                       lambda: setattr(link, "extra_delay", 0.0),
                       f"etcd slow by up to {link.extra_delay:.2f}s")

    def _store_watch_hang(self, node: Node) -> None:
        """The node's watch stream delivers nothing for a while, and nothing says so (a
        member gone without closing the connection): only its timed reads see changes."""
        watch = self.w.network.watches.get(node.name)
        if watch is not None and self._free("watch", node):
            watch.hung_until = self.now() + self._span(1.0, 30.0)
            self._hold("watch", node, watch.hung_until - self.now(), lambda: None,
                       "etcd watch hung")

    def _store_revoke(self, node: Node) -> None:
        """A node's lease revoked behind its back (``etcdctl lease revoke``): its keys go at
        once, while its agent still counts on the lease until it next asks etcd. Only
        aimed at a node taking over (buggify): revoking a producing leader's lease by
        hand defeats any lease-based design, see the README's residual risks."""
        lease = node.agent.session.lease if node.running and node.agent else None
        if lease is not None and self.w.etcd.revoke_by_hand(lease.id):
            node.revoked_at = self.now()
            self.w.trace.add("faults", f"operator: lease of {node.name} revoked by hand")

    def _store_leader_change(self, node: Node) -> None:
        outage = self.rng.uniform(0.1, 3.0)
        self.w.etcd.leader_change(outage)
        self.heal_by = max(self.heal_by, self.now() + outage)

    # ----------------------------------------------------------- nodeos faults

    def _nodeos_restart(self, node: Node) -> None:
        n = node.nodeos
        if not self._free("nodeos", node):
            return
        n.crash()
        catch_up = self.rng.uniform(0.1, 2.0)

        def back() -> None:
            n.start(self.w.scenario.pause_on_startup, catch_up)
        self._hold("nodeos", node, self._span(0.5, self.cfg.max_down), back, "nodeos down")

    def _api_heal(self, node: Node, attr: str, value: object) -> Callable[[], None]:
        def heal() -> None:
            setattr(node.nodeos, attr, value)
            node.nodeos.recover()
            # Requests queued or delayed by the fault may still land a little later.
            node.api_fault_until = max(node.api_fault_until, self.now() + 1.0)
        return heal

    def _nodeos_hang(self, node: Node) -> None:
        if self._free("nodeos", node):
            node.nodeos.hung = True
            self._hold("nodeos", node, self._span(0.1, 15.0),
                       self._api_heal(node, "hung", False), "nodeos hung")

    def _nodeos_api_hang(self, node: Node) -> None:
        if self._free("nodeos", node):
            node.nodeos.api_hung = True
            self._hold("nodeos", node, self._span(0.1, 15.0),
                       self._api_heal(node, "api_hung", False),
                       "nodeos API hung (production goes on)")

    def _nodeos_slow_api(self, node: Node) -> None:
        if self._free("nodeos", node):
            node.nodeos.api_extra = self.rng.uniform(0.1, 2.0)
            self._hold("nodeos", node, self._span(1.0, 20.0),
                       self._api_heal(node, "api_extra", 0.0),
                       f"nodeos API slow by up to {node.nodeos.api_extra:.2f}s")

    def _nodeos_desync(self, node: Node) -> None:
        """Its peers stop sending it blocks: its head stalls (its own blocks still go out)."""
        n = node.nodeos
        if self._free("nodeos", node) and n.up:
            n.node.receiving = False
            catch_up = self.rng.uniform(0.1, 2.0)
            self._hold("nodeos", node, self._span(1.0, 30.0),
                       lambda: self.w.rejoin(n, catch_up) if n.up else None,
                       "nodeos gets no blocks (head stalls)")

    def _p2p_isolation(self, node: Node) -> None:
        """Cut from the p2p network both ways: a producing node builds a fork of its own."""
        n = node.nodeos
        if self._free("nodeos", node) and n.up:
            n.node.receiving = n.node.sending = False
            catch_up = self.rng.uniform(0.1, 2.0)
            self._hold("nodeos", node, self._span(1.0, 30.0),
                       lambda: self.w.rejoin(n, catch_up) if n.up else None,
                       "nodeos isolated from p2p (both ways)")

    def _nodeos_slow_p2p(self, node: Node) -> None:
        n = node.nodeos.node
        if self._free("p2p", node):
            n.p2p_extra = self.rng.uniform(0.05, max(0.05, self.w.scenario.max_block_delay
                                                     - 0.05))
            self._hold("p2p", node, self._span(1.0, 30.0),
                       lambda: setattr(n, "p2p_extra", 0.0),
                       f"blocks to/from it slow by up to {n.p2p_extra:.2f}s")

    def _nodeos_implicit_pause(self, node: Node) -> None:
        n = node.nodeos
        if self._free("nodeos", node):
            n.implicit = True
            self._hold("nodeos", node, self._span(1.0, 20.0),
                       lambda: setattr(n, "implicit", False), "nodeos implicitly paused")

    # ------------------------------------------------------- clocks, operators

    def _clock_rate(self, node: Node) -> None:
        drift = self.w.scenario.max_drift
        node.host.set_rate(1.0 + self.rng.uniform(-drift, drift))
        self.w.trace.add("faults", f"{node.name} clock rate now {node.host.rate:.6f}")

    def _switchover(self, node: Node) -> None:
        target = self.rng.choice([*self.w.nodes, ""])
        ttl = max(10, 3 * self.w.scenario.timing.lease_ttl)  # as ops.switchover_command
        self.w.etcd.request_switchover(target, ttl)
        self.heal_by = max(self.heal_by, self.now() + ttl)
        self.w.trace.add("faults", f"operator: switchover to {target or 'any node'}")

    def _maintenance(self, node: Node) -> None:
        if self._free("maintenance", node):
            self.w.etcd.set_maintenance("simulated maintenance")
            self._hold("maintenance", node, self._span(1.0, 20.0),
                       lambda: self.w.etcd.set_maintenance(None), "operator: maintenance")

    # ------------------------------------------------------- buggify (CallHooks)

    def request_delay(self, process: Process, op: str) -> float:
        if not self.storming or op not in DELAYABLE:
            return 0.0
        if self.bug_rng.random() < 0.01 * self.cfg.buggify:
            delay = self.bug_rng.uniform(0.3, 4.0)
            self.w.trace.add("buggify", f"{op} of {process.name} held on the wire "
                             f"{delay:.2f}s")
            return delay
        return 0.0

    def nodeos_delay(self, process: Process, call: str) -> float:
        """A leader's pause stuck behind a busy nodeos: the step-down race of layer 4."""
        if not self.storming or call != "pause" or \
                self.w.nodes[process.node].role != Role.LEADER:
            return 0.0
        if self.bug_rng.random() < 0.2 * self.cfg.buggify:
            delay = self.bug_rng.uniform(0.2, 3.0)
            node = self.w.nodes[process.node]
            # The lock check excuses a nodeos that does not listen in time (see World).
            node.api_fault_until = max(node.api_fault_until, self.now() + 2 * delay + 1.0)
            self.w.trace.add("buggify", f"pause of {process.name} held in nodeos "
                             f"{delay:.2f}s")
            return delay
        return 0.0

    def after_call(self, process: Process, op: str) -> None:
        if not self.storming:
            return
        node = self.w.nodes[process.node]
        role = node.role
        if role == Role.TAKING_OVER and op == "snapshot" and \
                self.bug_rng.random() < 0.02 * self.cfg.buggify:
            # The lock goes between the read that elected it and its resume: only the
            # re-check of layer 6 sees it.
            self._store_revoke(node)
            return
        p = {Role.TAKING_OVER: 0.03, Role.LEADER: 0.002}.get(role, 0.0005) if role else 0.0
        if self.bug_rng.random() < p * self.cfg.buggify:
            duration = math.exp(self.bug_rng.uniform(math.log(0.05),
                                                     math.log(self.cfg.max_freeze)))
            self._freeze(node, duration, f"buggify: frozen after {op} answered")
