"""Blocks, the producer schedule and the block tree with its fork choice.

Pure data and logic, no clock and no threads: whoever drives it passes times in. Times
are integer milliseconds since the epoch, so slot arithmetic never suffers float rounding
(``0.1 * k`` is not exact; ``100 * k`` is).

The tree keeps every block, canonical or not, because a double production is exactly a
block that lost: the ledger must still see it. The canonical head is chosen as nodeos's
legacy fork choice does: the highest block wins, and a block no higher than the head
never displaces it (first seen wins a tie). A longer fork therefore *reorganises* the
canonical chain, as it would on a real network.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from collections import deque
from dataclasses import dataclass

GENESIS_PRODUCER = "eosio"


@dataclass(frozen=True, slots=True)
class Block:
    """One signed block; ``signer`` is our node that signed it (None: the rest of the network)."""

    height: int
    slot: int
    timestamp_ms: int
    producer: str
    signer: str | None
    block_id: str
    parent_id: str


def make_block_id(height: int, parent_id: str, slot: int, signer: str | None) -> str:
    """64 hex digits whose first 8 are the block number, as nodeos's block ids.

    Two blocks at one height (a fork) get different ids because they differ in signer,
    slot or parent, exactly the fields that make real blocks differ.
    """
    digest = hashlib.sha256(f"{parent_id}:{slot}:{signer}".encode()).hexdigest()
    return f"{height:08x}{digest[8:]}"


def format_block_time(ms: int) -> str:
    """nodeos's block time: UTC, milliseconds, no zone suffix (``2026-11-25T01:59:33.500``)."""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ms // 1000))}.{ms % 1000:03d}"


@dataclass(frozen=True)
class Schedule:
    """Round robin: each producer signs ``slots_per_producer`` consecutive slots."""

    producers: tuple[str, ...]
    slots_per_producer: int

    def producer_at(self, slot: int) -> str:
        return self.producers[(slot // self.slots_per_producer) % len(self.producers)]

    @property
    def round_slots(self) -> int:
        return len(self.producers) * self.slots_per_producer

    @property
    def irreversible_depth(self) -> int:
        """How far the last irreversible block trails the head: about 2/3 of a round."""
        return max(1, -(-2 * self.round_slots // 3))


@dataclass(frozen=True)
class Reorg:
    """What a change of canonical head took off the canonical chain and put on it."""

    removed: tuple[Block, ...]
    added: tuple[Block, ...]


class BlockTree:
    """Every recent block by id, the canonical branch by height, and the head's history.

    The history (when each head became visible) answers "what was the head at time t",
    which is what a node that receives blocks late sees. Only the last ``keep`` heights
    are kept, so memory stays bounded on long runs; older questions are answered with the
    oldest block still kept.
    """

    def __init__(self, genesis: Block, keep: int) -> None:
        self.keep = keep
        self.head = genesis
        self._by_id: dict[str, Block] = {genesis.block_id: genesis}
        self._order: deque[Block] = deque([genesis])
        self._canonical: dict[int, Block] = {genesis.height: genesis}
        self._oldest_canonical = genesis.height
        self._visible_ms: list[int] = [genesis.timestamp_ms]
        self._visible_head: list[Block] = [genesis]

    @property
    def oldest_height(self) -> int:
        return self._oldest_canonical

    def add(self, block: Block) -> None:
        self._by_id[block.block_id] = block
        self._order.append(block)

    def offer(self, block: Block, visible_ms: int) -> Reorg | None:
        """Make ``block`` the head if it is higher than the head; it shows at ``visible_ms``."""
        if block.height <= self.head.height:
            return None
        added: list[Block] = []
        cursor: Block | None = block
        while cursor is not None and self._canonical.get(cursor.height) is not cursor:
            added.append(cursor)
            cursor = self._by_id.get(cursor.parent_id)
        fork_point = cursor.height if cursor is not None else self._oldest_canonical - 1
        removed = [self._canonical.pop(h) for h in range(self.head.height, fork_point, -1)
                   if h in self._canonical]
        for b in added:
            self._canonical[b.height] = b
        self.head = block
        self._visible_ms.append(visible_ms)
        self._visible_head.append(block)
        self._trim()
        return Reorg(tuple(removed), tuple(reversed(added)))

    def is_canonical(self, block: Block) -> bool:
        return self._canonical.get(block.height) is block

    def head_as_of(self, t_ms: int) -> Block:
        """The canonical head as it could be seen at ``t_ms``."""
        i = bisect.bisect_right(self._visible_ms, t_ms)
        return self._visible_head[max(0, i - 1)]

    def ancestor(self, block: Block, height: int) -> Block:
        """``block``'s ancestor at ``height`` (or the oldest one still kept)."""
        cursor = block
        while cursor.height > height:
            if self.is_canonical(cursor):
                return self._canonical.get(height) or self._canonical[self._oldest_canonical]
            parent = self._by_id.get(cursor.parent_id)
            if parent is None:
                return cursor
            cursor = parent
        return cursor

    def _trim(self) -> None:
        cutoff = self.head.height - self.keep
        while self._order and self._order[0].height < cutoff:
            old = self._order.popleft()
            self._by_id.pop(old.block_id, None)
        while self._oldest_canonical < cutoff:
            self._canonical.pop(self._oldest_canonical, None)
            self._oldest_canonical += 1
        if len(self._visible_ms) > 2 * self.keep:
            del self._visible_ms[: self.keep]
            del self._visible_head[: self.keep]
