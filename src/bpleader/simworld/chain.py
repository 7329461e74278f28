"""The chain the producer signs: 0.5 s slots, a producer schedule, and the ledger of who
signed what, which is where a double production is seen.

A double production is two blocks signed with our key for one slot (two nodes producing
at once), or for one height (a node that resumed on a stale head forks the chain with a
second block at a height we already signed). Either one is what the agent must prevent.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from bpleader.simworld.clocks import EPOCH

SLOT = 0.5
# A block is finished and broadcast this long before its slot ends (nodeos's produce-time
# offset), so the next producer normally has it when its own slot starts.
CUTOFF = 0.1
EXTERNAL = "ext"  # the signer name of blocks by the other producers


@dataclass(frozen=True, eq=False)
class Block:
    num: int
    slot: int
    producer: str
    signer: str  # the node that signed it, or EXTERNAL

    @property
    def time(self) -> float:
        """The block timestamp: the end of its slot, on the wall clock."""
        return EPOCH + (self.slot + 1) * SLOT


@dataclass(frozen=True)
class Schedule:
    """Rounds of ``ours`` slots for our producer, then ``others`` slots for the rest."""

    ours: int = 2
    others: int = 1

    def is_ours(self, slot: int) -> bool:
        return slot % (self.ours + self.others) < self.ours


@dataclass(frozen=True)
class DoubleProduction:
    kind: str  # "slot" or "height"
    first: Block
    second: Block

    def describe(self) -> str:
        a, b = self.first, self.second
        return (f"double production ({self.kind}): {a.signer} signed #{a.num} in slot "
                f"{a.slot}, {b.signer} signed #{b.num} in slot {b.slot}")


class Ledger:
    """Every block signed with our key, by slot and by height (recent ones only)."""

    KEEP = 2000  # slots and heights kept; a stale head is never that far behind

    def __init__(self, on_double: Callable[[DoubleProduction], None]) -> None:
        self._on_double = on_double
        self._by_slot: dict[int, Block] = {}
        self._by_height: dict[int, Block] = {}
        self.blocks = 0
        self.doubles = 0

    def record(self, block: Block) -> None:
        self.blocks += 1
        same_slot = self._by_slot.get(block.slot)
        same_height = self._by_height.get(block.num)
        if same_slot is not None:
            self.doubles += 1
            self._on_double(DoubleProduction("slot", same_slot, block))
        elif same_height is not None:
            self.doubles += 1
            self._on_double(DoubleProduction("height", same_height, block))
        self._by_slot.setdefault(block.slot, block)
        self._by_height.setdefault(block.num, block)
        if len(self._by_slot) > 2 * self.KEEP:
            self._by_slot = {s: b for s, b in self._by_slot.items() if s > block.slot - self.KEEP}
            self._by_height = {n: b for n, b in self._by_height.items()
                               if n > block.num - self.KEEP}


class Peer:
    """A chain view that receives blocks over p2p: a head and an inbox of arrivals.

    Arrivals are processed lazily, when the head is needed, instead of one timer per
    block and peer: the result is the same and it is much cheaper.
    """

    def __init__(self, name: str, genesis: Block) -> None:
        self.name = name
        self.head = genesis
        self._inbox: list[tuple[float, int, Block]] = []
        self._seq = 0
        self.receiving = True  # False: gets no blocks from the p2p network (or down)
        self.sending = True  # False: its blocks reach nobody (isolated, or down)
        self.p2p_extra = 0.0  # extra propagation delay bound for blocks sent to this peer

    def push(self, at: float, block: Block) -> None:
        self._seq += 1
        heapq.heappush(self._inbox, (at, self._seq, block))

    def take_arrivals(self, now: float) -> None:
        inbox = self._inbox
        while inbox and inbox[0][0] <= now:
            block = heapq.heappop(inbox)[2]
            if block.num > self.head.num:  # longest chain wins; ties keep the first seen
                self.head = block

    def drop_inbox(self) -> None:
        self._inbox.clear()
