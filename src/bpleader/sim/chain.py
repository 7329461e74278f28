"""Blocks, the producer schedule and the canonical chain: the vocabulary of the chain model.

Pure data and logic, no clock and no threads. Block timestamps are integer milliseconds
since the Unix epoch, so slot arithmetic never suffers float rounding (``0.1 * k`` is not
exact; ``100 * k`` is).

Blocks point at their parent. Every block stays reachable while it is recent, canonical
or not, because a double production is exactly a block that lost: the ledger must still
see it. :class:`Canonical` is the chain the rest of the network follows, by height; the
model trims blocks older than its ``keep`` heights so long runs have bounded memory.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bpleader.sim.finality import PolicyState

GENESIS_PRODUCER = "eosio"
NO_PARENT = "0" * 64


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


class Block:
    """One signed block; ``signer`` is our node that signed it (None: the rest of the network).

    Savanna fields: ``qc`` is the ancestor this block claims a strong quorum certificate
    on, ``final`` the last final block as of this block (what a node whose head this is
    reports as irreversible), ``policies`` the finalizer policies in force after it.
    """

    __slots__ = ("block_id", "final", "height", "parent", "policies", "producer", "qc",
                 "signer", "slot", "timestamp_ms", "txs")

    def __init__(self, height: int, slot: int, timestamp_ms: int, producer: str,
                 signer: str | None, parent: Block | None) -> None:
        self.height = height
        self.slot = slot
        self.timestamp_ms = timestamp_ms
        self.producer = producer
        self.signer = signer
        self.parent = parent
        self.block_id: str = make_block_id(height, parent.block_id if parent else NO_PARENT,
                                      slot, signer)
        self.qc: Block | None = None
        self.final: Block = self
        self.policies: PolicyState | None = None
        self.txs: tuple[str, ...] = ()  # ids of the transactions it carries

    def __repr__(self) -> str:
        return f"Block(#{self.height} slot {self.slot} by {self.signer or self.producer})"

    def ancestor(self, height: int) -> Block:
        """This block's ancestor at ``height`` (or the oldest one still kept)."""
        cursor = self
        while cursor.height > height and cursor.parent is not None:
            cursor = cursor.parent
        return cursor

    def extends(self, other: Block) -> bool:
        """True when ``other`` is this block or one of its (kept) ancestors."""
        return self.ancestor(other.height) is other


def genesis_block(slot: int, timestamp_ms: int) -> Block:
    return Block(1, slot, timestamp_ms, GENESIS_PRODUCER, None, None)


@dataclass(frozen=True)
class Schedule:
    """The producer schedule as turns: each ``(producer, slots)`` signs that many
    consecutive slots, then the next; a round is all turns once."""

    turns: tuple[tuple[str, int], ...]

    @classmethod
    def round_robin(cls, producers: tuple[str, ...], slots_per_producer: int) -> Schedule:
        return cls(tuple((p, slots_per_producer) for p in producers))

    def __post_init__(self) -> None:
        if not self.turns or any(n < 1 for _, n in self.turns):
            raise ValueError("a schedule needs turns of at least one slot")

    @property
    def round_slots(self) -> int:
        return sum(n for _, n in self.turns)

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for p, _ in self.turns))

    def producer_at(self, slot: int) -> str:
        k = slot % self.round_slots
        for producer, n in self.turns:
            if k < n:
                return producer
            k -= n
        raise AssertionError("unreachable")

    @property
    def irreversible_depth(self) -> int:
        """Legacy (pre-Savanna) finality: LIB trails the head by about 2/3 of a round."""
        return max(1, -(-2 * self.round_slots // 3))


@dataclass(frozen=True)
class Reorg:
    """What a change of canonical head took off the canonical chain and put on it."""

    removed: tuple[Block, ...]
    added: tuple[Block, ...]


class Canonical:
    """The chain the rest of the network follows, indexed by height (recent heights only)."""

    def __init__(self, genesis: Block, keep: int) -> None:
        self.keep = keep
        self.head = genesis
        self._by_height: dict[int, Block] = {genesis.height: genesis}
        self.oldest_height = genesis.height

    def adopt(self, head: Block) -> Reorg | None:
        """``head`` is the network's new head; the blocks that changed side, if any did."""
        if head is self.head:
            return None
        added: list[Block] = []
        cursor: Block | None = head
        while cursor is not None and self._by_height.get(cursor.height) is not cursor \
                and cursor.height >= self.oldest_height:
            added.append(cursor)
            cursor = cursor.parent
        fork_point = cursor.height if cursor is not None else self.oldest_height - 1
        removed = [self._by_height.pop(h) for h in range(self.head.height, fork_point, -1)
                   if h in self._by_height]
        for b in added:
            self._by_height[b.height] = b
        self.head = head
        cutoff = head.height - self.keep
        while self.oldest_height < cutoff:
            self._by_height.pop(self.oldest_height, None)
            self.oldest_height += 1
        return Reorg(tuple(removed), tuple(reversed(added)))

    def at(self, height: int) -> Block | None:
        return self._by_height.get(height)

    def is_canonical(self, block: Block) -> bool:
        return self._by_height.get(block.height) is block
