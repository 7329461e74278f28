"""End to end over HTTP, as the agents drive it: the ledger sees double production exactly
when two nodes of our producer are resumed at once."""

from __future__ import annotations

import httpx

from bpleader.sim import SimCluster

INTERVAL = 0.1


def post(url: str, path: str) -> httpx.Response:
    resp = httpx.post(url + path, timeout=2)
    assert resp.status_code in (200, 201), resp.text
    return resp


def test_two_resumed_nodes_double_produce() -> None:
    with SimCluster("mybp", ["bp-a", "bp-b"], block_interval=INTERVAL,
                    pause_on_startup=False) as sim:  # nodeos's default: both produce
        sim.wait_slots(6)
        s = sim.ledger_summary()
    assert s["double_produced_slots"] > 0
    assert s["double_produced_heights"] > 0
    assert s["blocks_by_node"]["bp-a"] > 0 and s["blocks_by_node"]["bp-b"] > 0
    event = s["double_production_events"][0]
    assert sorted(event["nodes"]) == ["bp-a", "bp-b"]


def test_one_resumed_one_paused_never_double_produces() -> None:
    with SimCluster("mybp", ["bp-a", "bp-b"], block_interval=INTERVAL,
                    pause_on_startup=True) as sim:
        post(sim.node("bp-a").url, "/v1/producer/resume")
        sim.wait_slots(10)
        s = sim.ledger_summary()
    assert s["double_produced_slots"] == 0 and s["double_produced_heights"] == 0
    assert s["forks"] == 0
    assert s["blocks_by_node"]["bp-a"] >= 9 and s["blocks_by_node"]["bp-b"] == 0
    assert s["our_blocks"] + s["missed_slots"] == s["our_slots"]


def test_handover_pause_first_is_clean_resume_first_is_not() -> None:
    with SimCluster("mybp", ["bp-a", "bp-b"], block_interval=INTERVAL,
                    pause_on_startup=True) as sim:
        a, b = sim.node("bp-a").url, sim.node("bp-b").url
        post(a, "/v1/producer/resume")
        sim.wait_slots(3)
        # Right: pause, confirm, let the slot in progress end, then resume the other.
        post(a, "/v1/producer/pause")
        assert post(a, "/v1/producer/paused").json() is True
        sim.wait_slots(1)
        post(b, "/v1/producer/resume")
        sim.wait_slots(3)
        clean = sim.ledger_summary()
        assert clean["double_produced_slots"] == clean["double_produced_heights"] == 0
        assert clean["blocks_by_node"]["bp-b"] > 0
        # Wrong: resume the other before pausing the leader (split brain).
        post(a, "/v1/producer/resume")
        sim.wait_slots(3)
        post(b, "/v1/producer/pause")
        s = sim.ledger_summary()
    assert s["double_produced_slots"] >= 2


def test_other_producers_fill_their_slots_while_we_are_paused() -> None:
    with SimCluster("mybp", ["bp-a"], other_producers=["prodb", "prodc"],
                    slots_per_producer=2, block_interval=INTERVAL,
                    pause_on_startup=True) as sim:
        before = httpx.get(sim.node("bp-a").url + "/v1/chain/get_info").json()
        sim.wait_slots(12)
        after = httpx.get(sim.node("bp-a").url + "/v1/chain/get_info").json()
        s = sim.ledger_summary()
    assert after["head_block_num"] > before["head_block_num"]
    assert after["head_block_producer"] in ("prodb", "prodc")
    assert 0 < s["our_slots"] < s["slots"] and s["missed_slots"] == s["our_slots"]
    assert s["other_producers"] == ["prodb", "prodc"]
