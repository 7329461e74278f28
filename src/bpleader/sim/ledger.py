"""The ledger: every block our producer signed, and the double productions among them.

This is the simulator's reason to exist. bpleader's invariant is "no double production",
so every test, demo and benchmark ends by asking the ledger how many slots and heights
our producer signed twice. Counts are kept forever; the per-slot records (who signed what,
for timelines) and the event list are kept for the most recent slots only, so a long run
has bounded memory.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bpleader.sim.chain import Block, BlockTree, Reorg, format_block_time

log = logging.getLogger("bpleader.sim.ledger")

KEEP_SLOTS = 100_000
KEEP_EVENTS = 1_000
# A tick that runs later than this fraction of a block interval after its boundary is late:
# a real producer would have lost that much of its slot.
LATE_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class DoubleProduction:
    """Blocks of ours sharing a slot or a height (formatted only when asked for)."""

    kind: str
    blocks: list[Block]


@dataclass(frozen=True, slots=True)
class SlotRecord:
    slot: int
    start_ms: int
    producer: str
    ours: bool
    blocks: tuple[Block, ...]
    lateness_ms: float


def _block_json(block: Block, tree: BlockTree) -> dict[str, Any]:
    return {"node": block.signer, "slot": block.slot, "height": block.height,
            "timestamp": format_block_time(block.timestamp_ms), "block_id": block.block_id,
            "canonical": tree.is_canonical(block)}


class Ledger:
    """Counts and records slot by slot; the tree tells which blocks are canonical now."""

    def __init__(self, producer: str, nodes: Sequence[str], interval_ms: int,
                 tree: BlockTree) -> None:
        self.producer = producer
        self.interval_ms = interval_ms
        self._tree = tree
        self._records: deque[SlotRecord] = deque(maxlen=KEEP_SLOTS)
        self._events: deque[DoubleProduction] = deque(maxlen=KEEP_EVENTS)
        self._by_height: dict[int, list[Block]] = {}
        self.blocks_by_node: Counter[str] = Counter({n: 0 for n in nodes})
        self.slots = 0
        self.our_slots = 0
        self.missed_slots = 0
        self.our_blocks = 0
        self.our_canonical = 0
        self.double_produced_slots = 0
        self.double_produced_heights = 0
        self.double_production_events = 0
        self.late_ticks = 0
        self._lateness_sum_ms = 0.0
        self.lateness_max_ms = 0.0

    def record_slot(self, slot: int, producer: str, blocks: Sequence[Block],
                    lateness_ms: float) -> None:
        """One slot has begun: ``blocks`` are our blocks signed in it (empty for others)."""
        ours = producer == self.producer
        self._records.append(SlotRecord(slot, slot * self.interval_ms, producer, ours,
                                        tuple(blocks), lateness_ms))
        self.slots += 1
        self._lateness_sum_ms += lateness_ms
        self.lateness_max_ms = max(self.lateness_max_ms, lateness_ms)
        if lateness_ms > LATE_FRACTION * self.interval_ms:
            self.late_ticks += 1
        if not ours:
            return
        self.our_slots += 1
        if not blocks:
            self.missed_slots += 1
            return
        for block in blocks:
            self._count_block(block)
        if len(blocks) >= 2:
            self.double_produced_slots += 1
            self._event("slot", list(blocks))

    def _count_block(self, block: Block) -> None:
        assert block.signer is not None
        self.our_blocks += 1
        self.blocks_by_node[block.signer] += 1
        same = self._by_height.setdefault(block.height, [])
        same.append(block)
        if len(same) == 2:
            self.double_produced_heights += 1
            # The event holds the height's live list: a third signer joins this event.
            self._event("height", same)
        if len(self._by_height) > 2 * KEEP_SLOTS:
            cutoff = self._tree.head.height - KEEP_SLOTS
            self._by_height = {h: bs for h, bs in self._by_height.items() if h >= cutoff}

    def _event(self, kind: str, blocks: list[Block]) -> None:
        self.double_production_events += 1
        self._events.append(DoubleProduction(kind, blocks))
        log.warning("double production (%s) slot=%d height=%d nodes=%s", kind, blocks[-1].slot,
                    blocks[-1].height, ",".join(str(b.signer) for b in blocks))

    def on_reorg(self, reorg: Reorg) -> None:
        """Keep the count of our canonical blocks right when the head changes branch."""
        self.our_canonical += sum(1 for b in reorg.added if b.signer is not None)
        self.our_canonical -= sum(1 for b in reorg.removed if b.signer is not None)
        if reorg.removed:
            log.info("reorganisation: %d block(s) left the canonical chain, new head %d",
                     len(reorg.removed), self._tree.head.height)

    def summary(self, head: Block) -> dict[str, Any]:
        """The counts; ``head`` is the canonical head as visible now."""
        return {
            "producer": self.producer,
            "slots": self.slots,
            "our_slots": self.our_slots,
            "missed_slots": self.missed_slots,
            "our_blocks": self.our_blocks,
            "blocks_by_node": dict(self.blocks_by_node),
            "forks": self.our_blocks - self.our_canonical,
            "double_produced_slots": self.double_produced_slots,
            "double_produced_heights": self.double_produced_heights,
            "double_production_events_total": self.double_production_events,
            "double_production_events": [_describe(e.kind, e.blocks) for e in self._events],
            "head_block_num": head.height,
            "head_block_producer": head.producer,
            "head_block_time": format_block_time(head.timestamp_ms),
            "first_slot": self._records[0].slot if self._records else None,
            "last_slot": self._records[-1].slot if self._records else None,
            "late_ticks": self.late_ticks,
            "tick_lateness_ms_mean": round(self._lateness_sum_ms / self.slots, 3)
            if self.slots else 0.0,
            "tick_lateness_ms_max": round(self.lateness_max_ms, 3),
        }

    def records(self, since: int, limit: int) -> list[dict[str, Any]]:
        """Per-slot records from slot ``since`` on, oldest first, at most ``limit``."""
        return [self._record_json(r) for r in _from(self._records, since, limit)]

    def _record_json(self, r: SlotRecord) -> dict[str, Any]:
        return {"slot": r.slot, "start": format_block_time(r.start_ms), "producer": r.producer,
                "ours": r.ours, "blocks": [_block_json(b, self._tree) for b in r.blocks],
                "lateness_ms": round(r.lateness_ms, 3)}


def _describe(kind: str, blocks: Sequence[Block]) -> dict[str, Any]:
    """A double production: its blocks, and the slot or height they share (None if not)."""
    slots = {b.slot for b in blocks}
    heights = {b.height for b in blocks}
    return {
        "kind": kind,
        "slot": slots.pop() if len(slots) == 1 else None,
        "height": heights.pop() if len(heights) == 1 else None,
        "nodes": [b.signer for b in blocks],
        "timestamps": [format_block_time(b.timestamp_ms) for b in blocks],
        "blocks": [{"node": b.signer, "slot": b.slot, "height": b.height,
                    "timestamp": format_block_time(b.timestamp_ms)} for b in blocks],
    }


def _from(records: deque[SlotRecord], since: int, limit: int) -> Iterable[SlotRecord]:
    """Slots are recorded in order and contiguously, so the start is found by arithmetic."""
    if not records:
        return []
    start = max(0, since - records[0].slot)
    return [records[i] for i in range(start, min(len(records), start + limit))]
