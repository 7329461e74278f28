"""Where the chain is in the producer schedule: timing a planned switchover to the gap.

A producer signs one round of consecutive slots per schedule (12 slots, 6 s, on
Antelope chains) and nothing while the other producers take theirs (about two minutes
with 21 producers). A handover takes a few seconds (the leader's confirmed pause and
slot end, the successor's takeover delay and doppelganger watch), and every slot of ours
that falls inside it goes unsigned. Moved in the gap after our round, it costs no slot
at all, with every safety layer of the handover left as it is: the gap gives the
handover its time instead of the handover being cut short.

:func:`wait_for_gap` reads only what any nodeos serves (``get_producer_schedule`` and
``get_info``'s head producer); :func:`count_unsigned` reports afterwards how many slots
went without a block while production moved.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from bpleader.nodeos import BLOCK_INTERVAL, ChainInfo, NodeosError


class Chain(Protocol):
    async def get_info(self, budget: float | None = None) -> ChainInfo: ...

    async def producer_schedule(self, budget: float | None = None) -> list[str]: ...


@dataclass(frozen=True)
class GapWait:
    timed: bool  # False: the switchover goes ahead without a gap (why says so)
    why: str
    waited: float  # seconds spent waiting
    head: ChainInfo | None  # the chain when the wait ended: the window's start


async def wait_for_gap(chain: Chain, producer: str, limit: float, poll: float = 0.1,
                       budget: float = 1.0) -> GapWait:
    """Return once a handover that starts now has a whole other producer's round before
    our next slot: right after our round, or at once when our round is not next.

    Waits at most ``limit`` seconds (then says the switchover is not timed); a nodeos that
    does not answer makes it untimed at once, never a failed switchover.
    """
    started = time.monotonic()

    def done(timed: bool, why: str, head: ChainInfo | None) -> GapWait:
        return GapWait(timed, why, round(time.monotonic() - started, 2), head)

    try:
        schedule = await chain.producer_schedule(budget)
        info = await chain.get_info(budget)
    except NodeosError as exc:
        return done(False, f"nodeos did not tell where the schedule is ({exc})", None)
    if producer not in schedule:
        return done(True, f"{producer} is not in the active schedule: no slot of ours due",
                    info)
    if len(schedule) == 1:
        return done(False, f"{producer} is the only producer: every slot is ours", info)
    ours_next = {p: schedule[(i + 1) % len(schedule)] == producer
                 for i, p in enumerate(schedule)}
    seen_ours = False
    while True:
        current = info.head_block_producer
        if current == producer:
            seen_ours = True
        elif seen_ours:
            return done(True, f"our round just ended ({current} produces now)", info)
        elif not ours_next.get(current, False):
            return done(True, f"in the gap: {current} produces, and our round is not next",
                        info)
        if time.monotonic() - started >= limit:
            return done(False, f"no gap within {limit:g} s (head by {current})", info)
        await asyncio.sleep(poll)
        try:
            info = await chain.get_info(budget)
        except NodeosError as exc:
            return done(False, f"nodeos stopped answering ({exc})", info)


def count_unsigned(start: ChainInfo, end: ChainInfo) -> int:
    """Slots between two heads that have no block on the chain: on a healthy network
    every other producer signs its slots, so these are ours, lost to the handover."""
    slots = round((end.head_block_time - start.head_block_time) / BLOCK_INTERVAL)
    return max(0, slots - (end.head_block_num - start.head_block_num))
