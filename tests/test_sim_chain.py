"""The simulated chain and its ledger, driven slot by slot on a fake clock (no sleeping)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpleader.sim.chain import Schedule, format_block_time, make_block_id
from bpleader.sim.engine import Engine, PauseAtBlockRejected
from bpleader.sim.faults import FaultError, check_fault

CHAIN_ID = "ab" * 32
T0 = 1_800_000_000.25  # a quarter into a 0.5 s slot


@dataclass
class FakeClock:
    t: float

    def __call__(self) -> float:
        return self.t


def make(nodes: dict[str, bool], others: tuple[str, ...] = (), spp: int = 12,
         interval_ms: int = 500) -> tuple[Engine, FakeClock]:
    clock = FakeClock(T0)
    engine = Engine("mybp", nodes, Schedule(("mybp", *others), spp), interval_ms, CHAIN_ID,
                    clock)
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


def test_schedule_round_robin_and_irreversible_depth() -> None:
    s = Schedule(("mybp", "b", "c"), 2)
    assert [s.producer_at(k) for k in range(8)] == ["mybp", "mybp", "b", "b", "c", "c",
                                                    "mybp", "mybp"]
    assert Schedule(("mybp",), 12).irreversible_depth == 8
    assert Schedule(("mybp", "b", "c"), 12).irreversible_depth == 24


def test_one_producing_node_signs_every_slot_of_ours_and_the_network_fills_the_rest() -> None:
    engine, clock = make({"bp-a": False, "bp-b": True}, others=("other",), spp=3)
    run_slots(engine, clock, 12)
    s = engine.summary()
    assert s["slots"] == 12
    assert s["our_slots"] == 6 and s["missed_slots"] == 0
    assert s["blocks_by_node"] == {"bp-a": 6, "bp-b": 0}
    assert s["double_produced_slots"] == s["double_produced_heights"] == s["forks"] == 0
    # One block per slot, so the head is genesis (1) + 12, and the chain has no gaps.
    clock.t = engine.next_boundary()
    assert s["head_block_num"] == 12  # the 12th block becomes visible at its slot's end
    assert engine.summary()["head_block_num"] == 13
    records = engine.slot_records(0, 100)
    assert [r["producer"] for r in records] == [engine.schedule.producer_at(r["slot"])
                                                for r in records]
    assert [b["height"] for b in blocks_of(engine)] == [
        i + 2 for i, r in enumerate(records) if r["producer"] == "mybp"]


def test_all_paused_our_slots_are_missed_and_the_head_stops() -> None:
    engine, clock = make({"bp-a": True, "bp-b": True})
    run_slots(engine, clock, 5)
    s = engine.summary()
    assert s["our_slots"] == 5 and s["missed_slots"] == 5 and s["our_blocks"] == 0
    assert engine.get_info("bp-a").head.height == 1


def test_two_unpaused_nodes_in_one_slot_double_produce() -> None:
    engine, clock = make({"bp-a": False, "bp-b": False})
    run_slots(engine, clock, 4)
    s = engine.summary()
    assert s["double_produced_slots"] == 4
    assert s["double_produced_heights"] == 4
    assert s["blocks_by_node"] == {"bp-a": 4, "bp-b": 4}
    assert s["forks"] == 4  # one of each pair lost
    slot_events = [e for e in s["double_production_events"] if e["kind"] == "slot"]
    assert len(slot_events) == 4
    first = slot_events[0]
    assert first["nodes"] == ["bp-a", "bp-b"] and first["height"] == 2
    assert len(first["timestamps"]) == 2 and first["slot"] == engine.next_slot - 4
    # Tie on height: the first name in sort order is canonical.
    record = engine.slot_records(0, 1)[0]
    assert [(b["node"], b["canonical"]) for b in record["blocks"]] == [("bp-a", True),
                                                                       ("bp-b", False)]


def test_a_lagging_node_signs_on_a_stale_head_double_producing_a_height() -> None:
    engine, clock = make({"bp-a": True, "bp-b": False})
    run_slots(engine, clock, 10, into_slot=0.1)  # bp-b produces heights 2..11
    engine.set_fault("bp-a", "lag", {"seconds": 2.0})
    engine.pause("bp-b")
    engine.resume("bp-a")  # a handover to a node whose head is 2 s behind
    run_slots(engine, clock, 6)
    s = engine.summary()
    assert s["double_produced_slots"] == 0  # never two blocks in one slot...
    assert s["double_produced_heights"] >= 1  # ...but heights signed twice
    assert s["forks"] >= 1
    event = next(e for e in s["double_production_events"] if e["kind"] == "height")
    assert sorted(event["nodes"]) == ["bp-a", "bp-b"] and event["slot"] is None
    first_a = next(b for b in blocks_of(engine) if b["node"] == "bp-a")
    assert first_a["height"] <= 11  # a height bp-b had already signed
    # bp-a went on building its own branch, which outgrew bp-b's and became canonical:
    # at each doubly signed height exactly one of the two blocks is canonical.
    same = [b for b in blocks_of(engine) if b["height"] == first_a["height"]]
    assert sorted(b["canonical"] for b in same) == [False, True]


def test_a_healthy_handover_does_not_double_produce() -> None:
    engine, clock = make({"bp-a": True, "bp-b": False})
    run_slots(engine, clock, 5, into_slot=0.1)
    engine.pause("bp-b")
    engine.resume("bp-a")
    run_slots(engine, clock, 5)
    s = engine.summary()
    assert s["double_produced_slots"] == s["double_produced_heights"] == s["forks"] == 0
    assert s["blocks_by_node"] == {"bp-a": 5, "bp-b": 5}
    assert [b["height"] for b in blocks_of(engine)] == list(range(2, 12))


def test_pause_mid_slot_does_not_undo_the_block_begun_at_the_slot_start() -> None:
    engine, clock = make({"bp-a": False})
    run_slots(engine, clock, 1, into_slot=0.2)
    engine.pause("bp-a")  # mid-slot: the block of this slot is already being signed
    assert engine.summary()["blocks_by_node"] == {"bp-a": 1}
    run_slots(engine, clock, 1, into_slot=0.2)
    assert engine.summary()["blocks_by_node"] == {"bp-a": 1}
    assert engine.summary()["missed_slots"] == 1
    engine.resume("bp-a")  # mid-slot: too late for this slot as well
    run_slots(engine, clock, 1)
    s = engine.summary()
    assert s["blocks_by_node"] == {"bp-a": 2} and s["missed_slots"] == 1


def test_the_head_shows_at_the_end_of_its_slot_never_in_the_future() -> None:
    engine, clock = make({"bp-a": False})
    run_slots(engine, clock, 1, into_slot=0.1)
    head = engine.get_info("bp-a").head
    assert head.height == 1 and head.timestamp_ms <= clock.t * 1000
    clock.t = engine.next_boundary()
    head = engine.get_info("bp-a").head
    assert head.height == 2 and head.timestamp_ms == clock.t * 1000
    assert head.producer == "mybp"


def test_desync_stops_the_head_and_signing_until_cleared() -> None:
    engine, clock = make({"bp-a": False, "bp-b": True}, others=("other",), spp=2)
    run_slots(engine, clock, 3, into_slot=0.1)
    stuck = engine.get_info("bp-a").head.height
    engine.set_fault("bp-a", "desync", {})
    engine.resume("bp-b")
    run_slots(engine, clock, 8, into_slot=0.1)
    assert engine.get_info("bp-a").head.height == stuck
    assert engine.get_info("bp-b").head.height == stuck + 8
    blocks = engine.summary()["blocks_by_node"]["bp-a"]
    engine.clear_faults("bp-a")
    assert engine.get_info("bp-a").head.height == stuck + 8
    run_slots(engine, clock, 4)
    assert engine.summary()["blocks_by_node"]["bp-a"] > blocks


def test_pause_at_block_pauses_once_the_head_reaches_it() -> None:
    engine, clock = make({"bp-a": False})
    run_slots(engine, clock, 2, into_slot=0.1)
    head = engine.get_info("bp-a").head.height
    with pytest.raises(PauseAtBlockRejected):
        engine.pause_at_block("bp-a", head)
    engine.pause_at_block("bp-a", head + 2)
    run_slots(engine, clock, 6, into_slot=0.1)
    assert engine.is_paused("bp-a")
    heights = [b["height"] for b in blocks_of(engine)]
    assert max(heights) == head + 2  # it signed block N, then stopped
    engine.pause_at_block("bp-a", head + 10)
    engine.resume("bp-a")  # resume cancels a pending pause_at_block, as in Spring
    run_slots(engine, clock, 12)
    assert not engine.is_paused("bp-a")


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


def test_a_longer_branch_reorganises_the_canonical_chain() -> None:
    engine, clock = make({"bp-a": False, "bp-b": False})
    run_slots(engine, clock, 3, into_slot=0.1)  # both sign; bp-a wins every tie
    assert engine.summary()["forks"] == 3
    engine.pause("bp-a")
    run_slots(engine, clock, 1)  # bp-b extends its own branch, now the longest
    s = engine.summary()
    assert s["forks"] == 3  # bp-a's three blocks left the canonical chain
    canonical = {b["node"] for b in blocks_of(engine) if b["canonical"]}
    assert canonical == {"bp-b"}


def test_a_late_tick_catches_up_every_slot_and_records_its_lateness() -> None:
    engine, clock = make({"bp-a": False}, interval_ms=100)
    clock.t = engine.next_boundary() + 0.45  # five boundaries have passed
    assert engine.tick() == 5
    s = engine.summary()
    assert s["slots"] == 5 and s["our_blocks"] == 5
    assert s["late_ticks"] == 5  # even the last one ran 50 ms (half a slot) late
    assert s["tick_lateness_ms_max"] == pytest.approx(450, abs=1)
    slots = [r["slot"] for r in engine.slot_records(0, 10)]
    assert slots == list(range(slots[0], slots[0] + 5))


def test_last_irreversible_block_trails_the_head_and_is_canonical() -> None:
    engine, clock = make({"bp-a": False})
    run_slots(engine, clock, 3, into_slot=0.1)
    info = engine.get_info("bp-a")
    assert info.lib.height == 1  # never below 1
    run_slots(engine, clock, 20, into_slot=0.1)
    info = engine.get_info("bp-a")
    assert info.lib.height == info.head.height - 8
    assert engine.tree.is_canonical(info.lib)


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


ACTIONS = st.lists(st.tuples(
    st.sampled_from(["pause", "resume", "lag", "desync", "clear", "down", "up", "none"]),
    st.sampled_from(["bp-a", "bp-b", "bp-c"]),
    st.integers(0, 3)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(ACTIONS, st.booleans())
def test_ledger_counts_agree_with_the_slot_records(actions: list[tuple[str, str, int]],
                                                   others: bool) -> None:
    """Whatever happens, the counters say what the per-slot records show."""
    engine, clock = make({"bp-a": False, "bp-b": True, "bp-c": True},
                         others=("zz",) if others else (), spp=3)
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
    heights = [b["height"] for b in blocks]
    assert s["double_produced_heights"] == sum(1 for h in set(heights) if heights.count(h) > 1)
    assert s["forks"] == sum(1 for b in blocks if not b["canonical"])
    # One event per doubly signed slot and one per doubly signed height.
    assert s["double_production_events_total"] == len(s["double_production_events"]) == \
        s["double_produced_slots"] + s["double_produced_heights"]
    canonical_heights = [b["height"] for b in blocks if b["canonical"]]
    assert len(canonical_heights) == len(set(canonical_heights))
    # The canonical chain has no gaps: from genesis to the head, one block per height.
    head = engine.tree.head
    assert all(engine.tree.ancestor(head, h).height == h for h in range(1, head.height + 1))
