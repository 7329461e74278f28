"""Failovers on a Savanna chain, with finalizer keys, and the same ones on a legacy chain:
real etcd (3 members), the nodeos simulator, real `bpleader agent` processes.

On Savanna each node has its own BLS key and the agents move the producer's active key to
the new leader with eosio::actfinkey. After every failover the test checks what an
operator needs: the new leader's own key is active, our producer then misses no slot for
two full rounds (the simulator's implicit pause is shortened to 3 s, so a leader without
its key active would stop inside that watch), and the ledger counts no double-produced
slot or height and no vote equivocation. The control test shows the watch can fail: the
same crash without a [finalizer] section ends in an implicit pause.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpleader.localetcd import EtcdCluster
from bpleader.sim import SimCluster
from harness import (
    LEGACY_CHAIN,
    PRODUCER,
    SAVANNA_CHAIN,
    VOTE_TIMEOUT,
    World,
    record_result,
    wait_for,
)
from tcpcut import CuttableProxy

pytestmark = pytest.mark.integration

NODES = ["bp-a", "bp-b"]


# The crash and the freeze on a legacy chain are tests/test_agent_integration.py's; here
# they run on Savanna, the cut from etcd and the switchover there and back on both.
BOTH = pytest.mark.parametrize("world", ["savanna", "legacy"], indirect=True)
SAVANNA = pytest.mark.parametrize("world", ["savanna"], indirect=True)


@pytest.fixture
def world(request: pytest.FixtureRequest, etcd3: EtcdCluster,
          tmp_path: Path) -> Iterator[World]:
    savanna = request.param == "savanna"
    chain = SAVANNA_CHAIN if savanna else LEGACY_CHAIN
    with SimCluster(PRODUCER, NODES, pause_on_startup=True, **chain) as sim:
        w = World(tmp_path, etcd3.endpoints, sim, finalizer=savanna)
        try:
            yield w
        finally:
            w.stop_all()


def other(name: str) -> str:
    return next(n for n in NODES if n != name)


def start(world: World, **overrides: object) -> str:
    for n in NODES:
        world.add_agent(n, **overrides.get(n, {})).start()  # type: ignore[arg-type]
    leader = world.wait_single_producer(40)
    if world.finalizer:
        wait_for(lambda: world.active_finalizer_node() == leader, 20,
                 what=f"{leader}'s finalizer key active")
    return leader


def settle(world: World, scenario: str, fault_at: float, old: str, missed_before: int,
           timeout: float = 40.0) -> str:
    """The new leader produces, with its own finalizer key active on Savanna; then two
    full rounds without a missed slot of ours; the ledger stays clean throughout."""
    new = world.wait_single_producer(timeout, exclude=old)
    if world.finalizer:
        wait_for(lambda: world.active_finalizer_node() == new, timeout,
                 what=f"{new}'s finalizer key active")
    ready = time.monotonic() - fault_at
    # The slot in which it resumed had begun without it: the watch starts after it.
    world.sim.wait_slots(2)
    missed_failover = world.ledger()["missed_slots"] - missed_before
    rounds = world.ledger()["round_slots"]
    start_missed = world.ledger()["missed_slots"]
    # On Savanna one vote timeout more: an implicit pause would show within it.
    world.sim.wait_slots(2 * rounds + (int(VOTE_TIMEOUT / 0.5) if world.sim.savanna else 0))
    ledger = world.ledger()
    record_result(f"{scenario} ({'savanna' if world.sim.savanna else 'legacy'})",
                  producing_with_own_key_s=round(ready, 2), missed_slots=missed_failover)
    assert ledger["missed_slots"] == start_missed, \
        f"our producer missed slots after the failover: {ledger}"
    assert world.producing() == [new]
    assert not world.sim.node(new).status()["implicitly_paused"]
    assert ledger["double_produced_slots"] == 0, ledger
    assert ledger["double_produced_heights"] == 0, ledger
    assert ledger["vote_equivocations"] == 0, ledger
    if world.finalizer:
        assert world.active_finalizer_node() == new
    return new


@SAVANNA
def test_leader_agent_and_nodeos_killed(world: World) -> None:
    old = start(world)
    before = world.ledger()["missed_slots"]
    t0 = time.monotonic()
    world.agents[old].kill()
    world.sim.node(old).kill()
    new = settle(world, "leader agent and nodeos SIGKILL", t0, old, before)
    assert new == other(old)


@SAVANNA
def test_leader_frozen_three_ttl(world: World) -> None:
    old = start(world)
    before = world.ledger()["missed_slots"]
    t0 = time.monotonic()
    world.agents[old].freeze()
    new = settle(world, "leader agent SIGSTOP 3xTTL", t0, old, before)
    remaining = 3 * 2 - (time.monotonic() - t0)
    if remaining > 0:
        time.sleep(remaining)
    world.agents[old].thaw()
    world.sim.wait_slots(8)
    assert world.producing() == [new] and world.etcd_leader() == new
    assert world.ledger()["double_produced_slots"] == 0


@BOTH
def test_leader_cut_from_etcd(world: World, etcd3: EtcdCluster) -> None:
    proxies = {n: [CuttableProxy("127.0.0.1", m.client_port).start() for m in etcd3.members]
               for n in NODES}
    try:
        old = start(world, **{n: {"etcd__endpoints": [p.url for p in proxies[n]]}
                              for n in NODES})
        before = world.ledger()["missed_slots"]
        t0 = time.monotonic()
        for p in proxies[old]:
            p.cut()
        new = settle(world, "leader cut from etcd", t0, old, before)
        assert new == other(old)
        assert world.sim.node(old).paused  # it fenced itself
        for p in proxies[old]:
            p.heal()
        world.sim.wait_slots(8)
        assert world.producing() == [new]
    finally:
        for ps in proxies.values():
            for p in ps:
                p.close()


def switchover(world: World, frm: str, to: str) -> None:
    # --now: the handover itself, at any point of the round (the gap-timed default is
    # tested in test_agent_integration.py).
    res = subprocess.run([sys.executable, "-m", "bpleader.cli", "switchover", "--now",
                          "--config", str(world.agents[frm].config), "--to", to],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


@BOTH
def test_switchover_there_and_back(world: World) -> None:
    a = start(world)
    b = other(a)
    for frm, to in ((a, b), (b, a)):
        wait_for(lambda t=to: (s := world.snapshot()) is not None  # type: ignore[misc]
                 and s.records.get(t) is not None and s.records[t].in_sync, 20,
                 what=f"{to} in sync")
        before = world.ledger()["missed_slots"]
        t0 = time.monotonic()
        switchover(world, frm, to)
        assert settle(world, f"switchover {frm} -> {to}", t0, frm, before) == to


def test_without_finalizer_failover_the_new_leader_is_implicitly_paused(
        etcd3: EtcdCluster, tmp_path: Path) -> None:
    """Control: the watch of the tests above can fail. Without a [finalizer] section the
    active key stays the dead leader's, and the new leader stops producing."""
    with SimCluster(PRODUCER, NODES, pause_on_startup=True, **SAVANNA_CHAIN) as sim:
        world = World(tmp_path, etcd3.endpoints, sim)
        try:
            # bp-a leads first: the key active at genesis is its own.
            world.add_agent("bp-a").start()
            old = world.wait_single_producer(40)
            assert old == "bp-a" and world.active_finalizer_node() == old
            world.add_agent("bp-b").start()
            wait_for(lambda: (s := world.snapshot()) is not None
                     and len(s.candidates) == 2, 20, what="bp-b campaigning")
            world.agents[old].kill()
            world.sim.node(old).kill()
            new = wait_for(lambda: next((n for n in NODES if n != old
                                         and world.sim.node(n).status()["implicitly_paused"]),
                                        None), 40, what="the new leader implicitly paused")
            assert world.active_finalizer_node() == old
            # The agent sees it and raises the alarm (it resumes, to no avail).
            wait_for(lambda: world.agents[new].count("implicit_pause") >= 1, 15,
                     what="the implicit_pause alarm")
        finally:
            world.stop_all()
