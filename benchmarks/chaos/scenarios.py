"""The chaos scenarios, each a fault, how long it is held, and its heal.

``expect_failover`` is how many times production should move to another node while the
fault lasts for a design that does the right thing: 1 when the leader can no longer
produce safely (or is asked to hand over), 0 when nothing it needs is lost. Moves beyond
it are counted as spurious failovers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.chaos.net import Network
from benchmarks.chaos.world import CHAIN, GAP_CHAIN, Design, Sim, Testbed


@dataclass
class Ctx:
    design: Design
    net: Network
    sim: Sim
    bed: Testbed
    leader: str
    other: str
    state: dict[str, str]


Action = Callable[[Ctx], None]


def _hold(ctx: Ctx, seconds: float) -> None:
    time.sleep(seconds)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    fault: Action
    heal: Action
    duration: float
    expect_failover: int
    designs: tuple[str, ...] = ("bpleader", "keepalived")
    hold: Callable[[Ctx, float], None] = _hold
    ttls: float = 0.0  # if > 0, the fault is held this many lease TTLs instead
    chain: tuple[str, ...] = tuple(CHAIN)  # the simulated chain's schedule

    def held(self, lease_ttl: float) -> float:
        """Seconds the fault is held with a given lease TTL: a failover must fit in the
        hold, and one takes longer with a longer lease (durations are set for 2 s)."""
        if self.ttls:
            return self.ttls * lease_ttl
        return self.duration + (1.5 * (lease_ttl - 2) if self.expect_failover else 0.0)


def _cut_leader(ctx: Ctx) -> None:
    ctx.net.cut(ctx.leader)


def _heal_leader(ctx: Ctx) -> None:
    ctx.net.heal(ctx.leader)


def _block_peers(ctx: Ctx) -> None:
    ctx.net.block_peer(ctx.leader, ctx.other)
    ctx.net.block_peer(ctx.other, ctx.leader)


def _heal_both(ctx: Ctx) -> None:
    ctx.net.heal(ctx.leader)
    ctx.net.heal(ctx.other)


def _kill(ctx: Ctx) -> None:
    ctx.design.kill_leader(ctx.leader)


def _restart(ctx: Ctx) -> None:
    ctx.design.restart(ctx.leader)


def _freeze(ctx: Ctx) -> None:
    ctx.design.freeze(ctx.leader)


def _thaw(ctx: Ctx) -> None:
    ctx.design.thaw(ctx.leader)


def _graceful_stop(ctx: Ctx) -> None:
    ctx.design.graceful_stop(ctx.leader)


def _desync(ctx: Ctx) -> None:
    ctx.sim.fault(ctx.leader, "desync")


def _resync(ctx: Ctx) -> None:
    ctx.sim.clear(ctx.leader)


def _switchover(ctx: Ctx) -> None:
    ctx.state["effective"] = ctx.design.switchover(ctx.leader, ctx.other)


def _switchover_now(ctx: Ctx) -> None:
    ctx.state["effective"] = ctx.design.switchover(ctx.leader, ctx.other, now=True)


def _after_switchover(ctx: Ctx) -> None:
    # The baseline's switchover stopped keepalived on the old master: start it again.
    if ctx.design.name == "keepalived":
        ctx.design.restart(ctx.leader)


def _cut_etcd(ctx: Ctx) -> None:
    member = ctx.bed.etcd_leader()
    ctx.state["etcd"] = member
    ctx.net.cut(member)


def _heal_etcd(ctx: Ctx) -> None:
    ctx.net.heal(ctx.state["etcd"])


def _isolate(ctx: Ctx) -> None:
    ctx.sim.fault(ctx.leader, "isolate")


def _loss(ctx: Ctx) -> None:
    ctx.net.loss(ctx.leader, 30)


FLAP_CUT, FLAP_UP = 3.0, 3.0


def _flap(ctx: Ctx, seconds: float) -> None:
    """The leader's control link: cut (already), up 3 s, cut 3 s, ... for ``seconds``."""
    end = time.monotonic() + seconds
    cut = True
    while True:
        step = FLAP_CUT if cut else FLAP_UP
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(step, left))
        cut = not cut
        if cut:
            ctx.net.cut(ctx.leader)
        else:
            ctx.net.heal(ctx.leader)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("split_brain", "control link cut from the leader (keeps its chain link)",
             _cut_leader, _heal_leader, 8.0, 1),
    Scenario("peer_link_cut", "link between the two producers cut (both reach etcd)",
             _block_peers, _heal_both, 8.0, 0),
    Scenario("leader_killed", "leader's agent / keepalived SIGKILLed",
             _kill, _restart, 8.0, 1),
    Scenario("leader_frozen", "leader's agent / keepalived SIGSTOPped 3 x lease TTL",
             _freeze, _thaw, 6.0, 1, ttls=3),
    Scenario("graceful_stop", "leader's agent / keepalived stopped with SIGTERM "
             "(systemctl stop)", _graceful_stop, _restart, 6.0, 1),
    Scenario("nodeos_desync", "leader's nodeos out of sync (head stops)",
             _desync, _resync, 10.0, 1),
    Scenario("switchover", "planned switchover at a random moment (`bpleader switchover "
             "--now`, timed from its request in etcd / stop keepalived)",
             _switchover_now, _after_switchover, 6.0, 1),
    Scenario("switchover_gap", "planned switchover on a chain with a gap after our round "
             "(bpleader: timed to the gap, the default; timed from the command's start "
             "/ stop keepalived)",
             _switchover, _after_switchover, 14.0, 1, chain=tuple(GAP_CHAIN)),
    Scenario("switchover_gap_now", "the same with `bpleader switchover --now` (the "
             "baseline's is the same SIGTERM as above)", _switchover_now, _after_switchover,
             8.0, 1, chain=tuple(GAP_CHAIN), designs=("bpleader",)),
    Scenario("etcd_minority", "etcd leader member partitioned (minority)",
             _cut_etcd, _heal_etcd, 8.0, 0, designs=("bpleader",)),
    Scenario("p2p_cut", "leader's nodeos cut from the chain's p2p network (keeps etcd)",
             _isolate, _resync, 12.0, 1),
    Scenario("loss30", "30% packet loss on the leader's control link",
             _loss, _heal_leader, 15.0, 0),
    Scenario("flapping", f"leader's control link cut {FLAP_CUT:g} s / up {FLAP_UP:g} s, "
             "3 cycles", _cut_leader, _heal_leader, 18.0, 1, hold=_flap),
]}
QUICK = ("split_brain", "peer_link_cut", "leader_killed")
