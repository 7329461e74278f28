"""The simulated chain and its ledger, driven slot by slot on a fake clock (no sleeping).

The HTTP simulator's engine runs slot ``k`` from its start (the boundary of ``k``: who
signs is decided) to its end (the boundary of ``k + 1``: the blocks are signed, sent and
recorded). So a tick at a boundary first finishes the previous slot, and after ``n``
ticks the ledger holds ``n - 1`` slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpleader.sim.chain import Schedule, format_block_time, make_block_id
from bpleader.sim.engine import Engine
from bpleader.sim.faults import FaultError, check_fault
from bpleader.sim.model import ChainConfig
from bpleader.sim.nodeos_api import Identity
from bpleader.sim.system import SystemContract

CHAIN_ID = "ab" * 32
T0 = 1_800_000_000.25  # a quarter into a 0.5 s slot


@dataclass
class FakeClock:
    t: float

    def __call__(self) -> float:
        return self.t


def make(nodes: dict[str, bool], others: tuple[str, ...] = (), spp: int = 12,
         interval_ms: int = 500, savanna: bool = True,
         vote_timeout: float = 6.0) -> tuple[Engine, FakeClock]:
    """An engine whose ``nodes`` map to their pause-on-startup flag (in this order)."""
    clock = FakeClock(T0)
    config = ChainConfig("mybp", tuple(nodes), Schedule.round_robin(("mybp", *others), spp),
                         interval_ms=interval_ms, savanna=savanna, vote_timeout=vote_timeout,
                         pause_on_startup=nodes)
    contract = SystemContract.for_chain(config) if savanna else None
    engine = Engine(config, Identity(CHAIN_ID), contract, clock)
    return engine, clock


def run_slots(engine: Engine, clock: FakeClock, n: int, into_slot: float = 0.0) -> None:
    """Move the clock to the next ``n`` slot starts (plus ``into_slot`` s) and tick each."""
    for _ in range(n):
        clock.t = engine.next_boundary()
        assert engine.tick() == 1
        clock.t += into_slot


def blocks_of(engine: Engine) -> list[dict[str, Any]]:
    return [b for r in engine.slot_records(0, 100_000) for b in r["blocks"]]


def test_block_ids_and_times_look_like_nodeos() -> None:
    block_id = make_block_id(0x1234, "00" * 32, 7, "bp-a")
    assert len(block_id) == 64 and block_id.startswith("00001234")
    int(block_id, 16)
    assert format_block_time(1_764_035_973_500) == "2025-11-25T01:59:33.500"
    assert format_block_time(1_764_035_973_000) == "2025-11-25T01:59:33.000"


def test_schedule_turns_round_robin_and_irreversible_depth() -> None:
    s = Schedule.round_robin(("mybp", "b", "c"), 2)
    assert [s.producer_at(k) for k in range(8)] == ["mybp", "mybp", "b", "b", "c", "c",
                                                    "mybp", "mybp"]
    assert Schedule.round_robin(("mybp",), 12).irreversible_depth == 8
    assert Schedule.round_robin(("mybp", "b", "c"), 12).irreversible_depth == 24
    uneven = Schedule((("mybp", 2), ("b", 1), ("mybp", 1)))
    assert uneven.round_slots == 4 and uneven.producers == ("mybp", "b")
    assert [uneven.producer_at(k) for k in range(5)] == ["mybp", "mybp", "b", "mybp", "mybp"]
    for turns in [(), (("mybp", 0),)]:
        with pytest.raises(ValueError):
            Schedule(turns)


def test_one_producing_node_signs_every_slot_of_ours_and_the_network_fills_the_rest() -> None:
    engine, clock = make({"bp-a": False, "bp-b": True}, others=("other",), spp=3)
    run_slots(engine, clock, 13)  # 13 boundaries: 12 slots begun and ended
    s = engine.summary()
    assert s["slots"] == 12
    assert s["our_slots"] == 6 and s["missed_slots"] == 0
    assert s["blocks_by_node"] == {"bp-a": 6, "bp-b": 0}
    assert s["double_produced_slots"] == s["double_produced_heights"] == s["forks"] == 0
    assert s["resigned_heights"] == s["vote_equivocations"] == s["shared_bls_keys"] == 0
    # One block per slot, so the head is genesis (1) + 12, and the chain has no gaps.
    assert s["head_block_num"] == 13
    # The 13th slot's block is signed when the engine ends that slot, at the next tick:
    # reaching the boundary without ticking shows nothing new.
    clock.t = engine.next_boundary()
    assert engine.summary()["head_block_num"] == 13
    assert engine.tick() == 1 and engine.summary()["head_block_num"] == 14
    records = engine.slot_records(0, 100)
    assert [r["producer"] for r in records] == [engine.schedule.producer_at(r["slot"])
                                                for r in records]
    assert [b["height"] for b in blocks_of(engine)] == [
        i + 2 for i, r in enumerate(records) if r["producer"] == "mybp"]


def test_all_paused_our_slots_are_missed_and_the_head_stops() -> None:
    engine, clock = make({"bp-a": True, "bp-b": True})
    run_slots(engine, clock, 6)
    s = engine.summary()
    assert s["our_slots"] == 5 and s["missed_slots"] == 5 and s["our_blocks"] == 0
    assert engine.get_info("bp-a").head.height == 1


def test_two_unpaused_nodes_in_one_slot_double_produce() -> None:
    engine, clock = make({"bp-a": False, "bp-b": False})
    run_slots(engine, clock, 5)
    s = engine.summary()
    assert s["double_produced_slots"] == 4
    assert s["double_produced_heights"] == 4
    assert s["blocks_by_node"] == {"bp-a": 4, "bp-b": 4}
    assert s["forks"] == 4  # one of each pair lost
    # Each node has its own BLS key and only bp-a's is in the policy: no equivocation.
    assert s["vote_equivocations"] == 0 and s["votes"] > 0
    slot_events = [e for e in s["double_production_events"] if e["kind"] == "slot"]
    assert len(slot_events) == 4
    first = slot_events[0]
    assert first["nodes"] == ["bp-a", "bp-b"] and first["height"] == 2
    assert len(first["timestamps"]) == 2 and first["slot"] == engine.config.first_slot
    # A tie (same QC claim, same timestamp) keeps the block seen first: bp-a signs and
    # sends first (node order), so the network keeps its block.
    record = engine.slot_records(0, 1)[0]
    assert [(b["node"], b["canonical"]) for b in record["blocks"]] == [("bp-a", True),
                                                                       ("bp-b", False)]


def test_a_resume_in_the_middle_of_our_slot_signs_that_slot_at_once() -> None:
    """Spring's resume starts a block for the slot in progress: a new leader resumed
    while the old one's block of that slot is being signed produces the slot twice;
    one resumed once its head has that slot's block waits for the next slot."""
    engine, clock = make({"bp-a": True, "bp-b": False})
    run_slots(engine, clock, 4, into_slot=0.1)  # bp-b produces; 0.1 s into a slot
    engine.pause("bp-b")  # its block of this slot is still signed at the slot's end
    engine.resume("bp-a")  # same slot: bp-a begins a block for it at once
    run_slots(engine, clock, 1)
    s = engine.summary()
    assert s["double_produced_slots"] == 1
    assert s["blocks_by_node"]["bp-a"] == 1

    engine, clock = make({"bp-a": True, "bp-b": False})
    run_slots(engine, clock, 4, into_slot=0.1)
    engine.pause("bp-b")
    run_slots(engine, clock, 1, into_slot=0.1)  # bp-b's last block is out and seen
    signed = engine.summary()["blocks_by_node"]["bp-b"]
    engine.resume("bp-a")  # in the next slot: bp-a signs it, on bp-b's last block
    run_slots(engine, clock, 3)
    s = engine.summary()
    assert s["double_produced_slots"] == 0 and s["double_produced_heights"] == 0
    assert s["blocks_by_node"]["bp-b"] == signed
    assert s["blocks_by_node"]["bp-a"] == 3 and s["missed_slots"] == 0


def test_a_lagging_node_signs_on_a_stale_head_double_producing_a_height() -> None:
    engine, clock = make({"bp-a": True, "bp-b": False})
    run_slots(engine, clock, 6, into_slot=0.1)  # bp-b produces heights 2..6
    engine.set_fault("bp-a", "lag", {"seconds": 2.0})
    # The lag is physical, not retroactive: what bp-a received before it stays received.
    assert engine.get_info("bp-a").head is engine.get_info("bp-b").head
    run_slots(engine, clock, 3, into_slot=0.1)  # bp-b's next blocks reach bp-a 2 s late
    stale = engine.get_info("bp-a").head.height
    assert stale < engine.get_info("bp-b").head.height
    engine.pause("bp-b")  # its block in progress is still signed at the slot's end
    run_slots(engine, clock, 1, into_slot=0.1)  # (a resume now would sign this slot too)
    engine.resume("bp-a")  # a handover to a node whose head is behind
    run_slots(engine, clock, 8)
    s = engine.summary()
    assert s["double_produced_slots"] == 0  # never two blocks in one slot...
    assert s["double_produced_heights"] >= 1  # ...but heights signed twice
    assert s["forks"] >= 1 and s["resigned_heights"] == 0
    event = next(e for e in s["double_production_events"] if e["kind"] == "height")
    assert sorted(event["nodes"]) == ["bp-a", "bp-b"] and event["slot"] is None
    first_a = next(b for b in blocks_of(engine) if b["node"] == "bp-a")
    assert first_a["height"] == stale + 1  # a height bp-b had already signed
    assert first_a["height"] <= max(b["height"] for b in blocks_of(engine)
                                    if b["node"] == "bp-b")
    # bp-b's branch carries the newer QC claims, so the network kept it and bp-a moved
    # onto it once its blocks arrived: at each doubly signed height exactly one of the
    # two blocks is canonical, and bp-a's later blocks extend the canonical chain.
    for height in {b["height"] for b in blocks_of(engine) if b["node"] == "bp-a"}:
        same = [b for b in blocks_of(engine) if b["height"] == height]
        assert sum(b["canonical"] for b in same) == 1
    assert blocks_of(engine)[-1]["node"] == "bp-a" and blocks_of(engine)[-1]["canonical"]


def test_a_healthy_handover_does_not_double_produce() -> None:
    engine, clock = make({"bp-a": True, "bp-b": False})
    run_slots(engine, clock, 6, into_slot=0.1)
    engine.pause("bp-b")  # mid-slot: bp-b's block of this slot is still signed
    run_slots(engine, clock, 1, into_slot=0.1)  # it is out and seen by bp-a
    engine.resume("bp-a")  # bp-a signs the slot in progress, on bp-b's last block
    run_slots(engine, clock, 5)
    s = engine.summary()
    assert s["double_produced_slots"] == s["double_produced_heights"] == s["forks"] == 0
    assert s["blocks_by_node"] == {"bp-a": 5, "bp-b": 6} and s["missed_slots"] == 0
    assert [b["height"] for b in blocks_of(engine)] == list(range(2, 13))


def test_pause_mid_slot_does_not_undo_the_block_begun_at_the_slot_start() -> None:
    engine, clock = make({"bp-a": False})
    run_slots(engine, clock, 1, into_slot=0.2)  # slot k begins: bp-a begins its block
    engine.pause("bp-a")
    run_slots(engine, clock, 1, into_slot=0.2)  # k ends (signed anyway); k+1 begins
    assert engine.summary()["blocks_by_node"] == {"bp-a": 1}
    engine.resume("bp-a")  # mid-slot k+1: as Spring, it begins k+1's block at once
    run_slots(engine, clock, 1)  # k+1 ends, signed; k+2 begins with bp-a
    s = engine.summary()
    assert s["blocks_by_node"] == {"bp-a": 2} and s["missed_slots"] == 0
    run_slots(engine, clock, 1)
    s = engine.summary()
    assert s["blocks_by_node"] == {"bp-a": 3} and s["missed_slots"] == 0


def test_the_head_shows_at_the_end_of_its_slot_never_in_the_future() -> None:
    engine, clock = make({"bp-a": False})
    run_slots(engine, clock, 1, into_slot=0.1)
    head = engine.get_info("bp-a").head
    assert head.height == 1 and head.timestamp_ms <= clock.t * 1000
    run_slots(engine, clock, 1)
    head = engine.get_info("bp-a").head
    assert head.height == 2 and head.timestamp_ms == clock.t * 1000
    assert head.producer == "mybp"


def test_desync_stops_the_head_and_signing_until_cleared() -> None:
    engine, clock = make({"bp-a": False, "bp-b": True}, others=("other",), spp=2)
    run_slots(engine, clock, 3, into_slot=0.1)  # the slot in progress is the network's
    stuck = engine.get_info("bp-a").head.height
    engine.set_fault("bp-a", "desync", {})
    engine.resume("bp-b")
    run_slots(engine, clock, 8, into_slot=0.1)
    assert engine.get_info("bp-a").head.height == stuck
    assert engine.get_info("bp-b").head.height == stuck + 8
    blocks = engine.summary()["blocks_by_node"]["bp-a"]
    engine.pause("bp-b")
    engine.clear_faults("bp-a")
    assert engine.get_info("bp-a").head.height == stuck + 8  # resynced at once
    run_slots(engine, clock, 4)
    assert engine.summary()["blocks_by_node"]["bp-a"] > blocks
    assert engine.summary()["double_produced_heights"] == 0


def test_pause_at_block_stops_block_application_and_paused_does_not_say_so() -> None:
    engine, clock = make({"bp-a": False})
    run_slots(engine, clock, 3, into_slot=0.1)
    head = engine.get_info("bp-a").head.height
    with pytest.raises(ValueError, match="chain head"):
        engine.pause_at_block("bp-a", head)
    engine.pause_at_block("bp-a", head + 2)
    run_slots(engine, clock, 6, into_slot=0.1)
    assert engine.get_info("bp-a").head.height == head + 2  # signed block N, then held
    assert max(b["height"] for b in blocks_of(engine)) == head + 2
    assert not engine.is_paused("bp-a")  # /v1/producer/paused does not report it
    assert engine.node_status("bp-a")["pause_at_block"] == head + 2
    engine.resume("bp-a")  # resume clears it, as in Spring (and signs the slot in progress)
    run_slots(engine, clock, 3)
    assert engine.get_info("bp-a").head.height == head + 5
    assert engine.node_status("bp-a")["pause_at_block"] is None


def test_a_node_held_by_pause_at_block_applies_the_held_blocks_on_resume() -> None:
    engine, clock = make({"bp-a": True, "bp-b": False})
    run_slots(engine, clock, 3, into_slot=0.1)
    head = engine.get_info("bp-a").head.height
    engine.pause_at_block("bp-a", head + 1)
    run_slots(engine, clock, 5, into_slot=0.1)
    assert engine.get_info("bp-a").head.height == head + 1  # it takes no block past N
    assert engine.get_info("bp-b").head.height == head + 5
    engine.resume("bp-a")
    engine.pause("bp-a")  # (the explicit pause back at once: only bp-b produces)
    assert engine.get_info("bp-a").head is engine.get_info("bp-b").head


def test_restart_comes_back_with_pause_on_startup_and_does_not_sign_while_down() -> None:
    engine, clock = make({"bp-a": False, "bp-b": True})
    engine.resume("bp-b")
    engine.pause("bp-a")
    engine.go_down("bp-a", 1.0)
    engine.go_down("bp-b", None)
    assert engine.faults("bp-a") == {"restart": {"down": 1.0}}
    assert engine.faults("bp-b") == {"kill": {}}
    run_slots(engine, clock, 4, into_slot=0.1)
    assert engine.due_restarts(clock.t) == ["bp-a"]
    assert engine.summary()["our_blocks"] == 0
    engine.come_up("bp-a")
    engine.come_up("bp-b")
    assert not engine.is_paused("bp-a")  # nodeos forgets a pause over a restart
    assert engine.is_paused("bp-b")  # unless started with pause-on-startup
    assert engine.faults("bp-a") == engine.faults("bp-b") == {}


def test_legacy_a_longer_branch_reorganises_the_canonical_chain() -> None:
    # Legacy fork choice (pre-Savanna): the higher block wins, a tie keeps the first seen.
    engine, clock = make({"bp-a": False, "bp-b": False}, savanna=False)
    run_slots(engine, clock, 4, into_slot=0.1)  # both sign; bp-a's blocks win every tie
    assert engine.summary()["forks"] == 3
    engine.pause("bp-a")  # mid-slot: both still sign this slot
    run_slots(engine, clock, 2)  # then bp-b extends its own branch, now the longest
    s = engine.summary()
    assert s["forks"] == 4  # bp-a's four blocks left the canonical chain
    canonical = {b["node"] for b in blocks_of(engine) if b["canonical"]}
    assert canonical == {"bp-b"}


def test_savanna_the_branch_with_the_newer_qc_claim_wins_not_the_longer_one() -> None:
    engine, clock = make({"bp-a": False, "bp-b": False})
    run_slots(engine, clock, 4, into_slot=0.1)
    engine.pause("bp-a")
    run_slots(engine, clock, 2)
    s = engine.summary()
    # The network voted on bp-a's blocks (seen first), so bp-a's branch carries the newer
    # QC claim; bp-b switched onto it and its later blocks extend it: no reorganisation.
    assert s["forks"] == 4
    assert {b["node"] for b in blocks_of(engine) if not b["canonical"]} == {"bp-b"}
    head = engine.model.canonical.head
    assert head.signer == "bp-b" and head.parent is not None and head.parent.signer == "bp-a"


def test_a_late_tick_catches_up_every_slot_and_records_its_lateness() -> None:
    engine, clock = make({"bp-a": False}, interval_ms=100)
    clock.t = engine.next_boundary() + 0.45  # five boundaries have passed
    assert engine.tick() == 5  # they end four slots (and begin a fifth)
    s = engine.summary()
    assert s["slots"] == 4 and s["our_blocks"] == 4
    assert s["late_ticks"] == 4  # even the last one ran 150 ms (1.5 slots) late
    assert s["tick_lateness_ms_max"] == pytest.approx(450, abs=1)
    slots = [r["slot"] for r in engine.slot_records(0, 10)]
    assert slots == list(range(slots[0], slots[0] + 4))


@pytest.mark.parametrize(("savanna", "depth"), [(True, 2), (False, 8)])
def test_last_irreversible_block_trails_the_head_and_is_canonical(savanna: bool,
                                                                  depth: int) -> None:
    # Savanna: two blocks (2-chain rule on QCs); legacy: 2/3 of a 12-slot round.
    engine, clock = make({"bp-a": False}, savanna=savanna)
    run_slots(engine, clock, 2, into_slot=0.1)
    info = engine.get_info("bp-a")
    assert info.head.height == 2 and info.lib.height == 1  # never below 1
    run_slots(engine, clock, 20, into_slot=0.1)
    info = engine.get_info("bp-a")
    assert info.lib.height == info.head.height - depth
    assert engine.model.canonical.is_canonical(info.lib)
    assert info.head.extends(info.lib)


def test_fault_parameters_are_checked() -> None:
    assert check_fault("lag", {"seconds": 2}) == {"seconds": 2.0}
    assert check_fault("desync", {}) == {}
    bad: list[tuple[str, dict[str, object]]] = [
        ("nope", {}), ("lag", {}), ("lag", {"seconds": -1}), ("lag", {"seconds": "2"}),
        ("desync", {"seconds": 1}), ("restart", {"down": float("nan")})]
    for kind, params in bad:
        with pytest.raises(FaultError):
            check_fault(kind, params)
    engine, _ = make({"bp-a": False})
    with pytest.raises(FaultError):
        engine.clear_faults("bp-a", ["nope"])
    with pytest.raises(FaultError):
        engine.set_fault("bp-a", "kill", {})  # a down fault goes through go_down


ACTIONS = st.lists(st.tuples(
    st.sampled_from(["pause", "resume", "lag", "desync", "clear", "down", "up", "none"]),
    st.sampled_from(["bp-a", "bp-b", "bp-c"]),
    st.integers(0, 3)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(ACTIONS, st.booleans(), st.booleans())
def test_ledger_counts_agree_with_the_slot_records(actions: list[tuple[str, str, int]],
                                                   others: bool, savanna: bool) -> None:
    """Whatever happens, the counters say what the per-slot records show."""
    engine, clock = make({"bp-a": False, "bp-b": True, "bp-c": True},
                         others=("zz",) if others else (), spp=3, savanna=savanna)
    for action, node, slots in actions:
        if action in ("pause", "resume"):
            getattr(engine, action)(node)
        elif action == "lag":
            engine.set_fault(node, "lag", {"seconds": 0.5 * slots})
        elif action == "desync":
            engine.set_fault(node, "desync", {})
        elif action == "clear":
            engine.clear_faults(node)
        elif action == "down":
            engine.go_down(node, None)
        elif action == "up":
            engine.come_up(node)
        run_slots(engine, clock, slots, into_slot=0.2)
    s = engine.summary()
    records = engine.slot_records(0, 100_000)
    ours = [r for r in records if r["ours"]]
    blocks = [b for r in ours for b in r["blocks"]]
    assert s["slots"] == len(records) and s["our_slots"] == len(ours)
    assert s["missed_slots"] == sum(1 for r in ours if not r["blocks"])
    assert s["our_blocks"] == len(blocks) == sum(s["blocks_by_node"].values())
    assert s["double_produced_slots"] == sum(1 for r in ours if len(r["blocks"]) >= 2)
    signers: dict[int, list[str]] = {}
    for b in blocks:  # in signing order
        signers.setdefault(b["height"], []).append(b["node"])
    # A height signed by two different nodes is a double production; one node signing a
    # height again (its own block lost a fork) is a re-signed height: every block of the
    # first signer before another node signed that height, but the first block.
    assert s["double_produced_heights"] == sum(1 for ns in signers.values()
                                               if len(set(ns)) >= 2)
    assert s["resigned_heights"] == sum(
        next((i for i, n in enumerate(ns) if n != ns[0]), len(ns)) - 1
        for ns in signers.values())
    assert s["forks"] == sum(1 for b in blocks if not b["canonical"])
    # One event per doubly signed slot and one per doubly signed height.
    assert s["double_production_events_total"] == len(s["double_production_events"]) == \
        s["double_produced_slots"] + s["double_produced_heights"]
    canonical_heights = [b["height"] for b in blocks if b["canonical"]]
    assert len(canonical_heights) == len(set(canonical_heights))
    # Per-node keys and a safety file per node: votes, never an equivocation.
    assert s["vote_equivocations"] == s["shared_bls_keys"] == 0
    if not savanna:
        assert s["votes"] == 0
    # The canonical chain has no gaps: from genesis to the head, one block per height.
    canonical = engine.model.canonical
    head = canonical.head
    assert all(canonical.at(h) is head.ancestor(h) and head.ancestor(h).height == h
               for h in range(1, head.height + 1))
    # The ledger's head is the network's, and the LIB is on the canonical chain.
    assert s["head_block_num"] == head.height
    lib = s["last_irreversible_block_num"]
    assert lib is None if not savanna else canonical.at(lib) is head.final


def test_a_node_catching_up_stops_at_its_pause_at_block() -> None:
    # Spring applies blocks one by one and stops at N even when it has many to catch up
    # (after a desync here): the head is N, not the network's head.
    engine, clock = make({"bp-a": True, "bp-b": False})
    run_slots(engine, clock, 3, into_slot=0.1)
    head = engine.get_info("bp-a").head.height
    engine.set_fault("bp-a", "desync", {})
    engine.pause_at_block("bp-a", head + 3)
    run_slots(engine, clock, 8, into_slot=0.1)
    engine.clear_faults("bp-a")
    network = engine.get_info("bp-b").head
    assert network.height >= head + 8
    assert engine.get_info("bp-a").head is network.ancestor(head + 3)
    engine.resume("bp-a")
    engine.pause("bp-a")
    assert engine.get_info("bp-a").head is network
