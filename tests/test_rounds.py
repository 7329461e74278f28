"""Timing a switchover to the gap after our round (bpleader.rounds), on scripted heads.

The end-to-end case (real agents, the simulator's schedule, missed slots from its ledger)
is test_agent_integration.py::test_switchover_in_the_gap_after_our_round_misses_no_slot.
"""

from __future__ import annotations

import asyncio

from bpleader.nodeos import ChainInfo, NodeosTimeout
from bpleader.rounds import count_unsigned, wait_for_gap


def head(num: int, producer: str, t: float | None = None) -> ChainInfo:
    return ChainInfo(num, 1000.0 + num * 0.5 if t is None else t, producer, num - 3, "id", "v")


class Heads:
    """A chain whose get_info answers the given heads in turn (the last one forever)."""

    def __init__(self, schedule: list[str], producers: list[str],
                 fail_at: int | None = None) -> None:
        self.schedule, self.producers, self.fail_at, self.calls = schedule, producers, \
            fail_at, 0

    async def producer_schedule(self, budget: float | None = None) -> list[str]:
        return self.schedule

    async def get_info(self, budget: float | None = None) -> ChainInfo:
        i = min(self.calls, len(self.producers) - 1)
        self.calls += 1
        if self.fail_at is not None and i >= self.fail_at:
            raise NodeosTimeout("get_info", "no answer")
        return head(100 + i, self.producers[i])


def run(chain: Heads, limit: float = 5.0) -> tuple[bool, str, int]:
    gap = asyncio.run(wait_for_gap(chain, "mybp", limit, poll=0.0))
    assert gap.head is not None or not gap.timed
    return gap.timed, gap.why, chain.calls


def test_in_our_round_it_waits_for_the_round_to_end() -> None:
    timed, why, calls = run(Heads(["a", "mybp", "b", "c"], ["mybp", "mybp", "mybp", "b"]))
    assert timed and "our round just ended" in why and calls == 4


def test_with_our_round_next_it_waits_for_that_round_to_pass() -> None:
    timed, why, calls = run(Heads(["a", "mybp", "b"], ["a", "a", "mybp", "mybp", "b"]))
    assert timed and "our round just ended" in why and calls == 5


def test_with_another_round_before_ours_it_switches_at_once() -> None:
    timed, why, calls = run(Heads(["a", "mybp", "b", "c"], ["b"]))
    assert timed and "not next" in why and calls == 1


def test_without_a_gap_it_says_so_and_switches() -> None:
    assert run(Heads(["mybp"], ["mybp"]))[:2] == (
        False, "mybp is the only producer: every slot is ours")
    timed, why, _ = run(Heads(["a", "b"], ["a"]))
    assert timed and "not in the active schedule" in why
    timed, why, _ = run(Heads(["a", "mybp"], ["mybp"]), limit=0.05)
    assert not timed and "no gap within" in why
    timed, why, _ = run(Heads(["a", "mybp"], ["mybp", "mybp"], fail_at=1))
    assert not timed and "stopped answering" in why


def test_unsigned_slots_are_slots_without_a_block() -> None:
    start = head(100, "a", t=1000.0)
    assert count_unsigned(start, head(110, "b", t=1005.0)) == 0  # 10 slots, 10 blocks
    assert count_unsigned(start, head(107, "b", t=1005.0)) == 3
    assert count_unsigned(start, start) == 0
