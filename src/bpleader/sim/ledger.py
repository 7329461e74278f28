"""The ledger: every block and vote our producer signed, and the violations among them.

This is the simulator's reason to exist. bpleader's invariant is "no double production"
and, on Savanna, "no vote equivocation", so every test, demo, benchmark and simulated run
ends by asking the ledger:

* a **double-produced slot**: two blocks signed with our key for one slot;
* a **double-produced height**: blocks of ours by two different nodes at one block number
  (a node that resumed on a stale head forked the chain). One node signing a height again
  after its own block lost a fork is counted apart (``resigned_heights``): Spring does it
  by design on Savanna, where no producer watermark exists and votes decide finality;
  on a legacy chain nodeos's watermark prevents it (the model has that rule too);
* a **vote equivocation**: one finalizer key voting for two different blocks with the same
  timestamp (two nodes sharing a BLS key; the safety file protects one node only);
* a **shared BLS key**: one finalizer key configured on two of our nodes, which makes the
  previous one possible.

Counts are kept forever; per-slot records (who signed what, for timelines) and the event
list are kept for the most recent slots only, so a long run has bounded memory.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bpleader.sim.chain import Block, Canonical, Reorg, format_block_time

log = logging.getLogger("bpleader.sim.ledger")

KEEP_EVENTS = 1_000
# A tick that runs later than this fraction of a block interval after its boundary is late:
# a real producer would have lost that much of its slot.
LATE_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class Violation:
    """Blocks of ours sharing a slot or a height, votes of one key for one timestamp,
    or a key configured twice (formatted only when asked for)."""

    kind: str  # "slot", "height", "equivocation" or "shared_key"
    blocks: list[Block]
    key: str = ""
    nodes: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "shared_key":
            return f"BLS key {self.key[:20]}… configured on {', '.join(self.nodes)}"
        parts = ", ".join(f"{b.signer or b.producer} #{b.height} slot {b.slot}"
                          for b in self.blocks)
        if self.kind == "equivocation":
            return (f"vote equivocation: key {self.key[:20]}… (on {', '.join(self.nodes)}) "
                    f"voted for {parts}")
        return f"double production ({self.kind}): {parts}"


@dataclass(frozen=True, slots=True)
class SlotRecord:
    slot: int
    start_ms: int
    producer: str
    ours: bool
    blocks: tuple[Block, ...]
    lateness_ms: float


def _block_json(block: Block, canonical: Canonical) -> dict[str, Any]:
    return {"node": block.signer, "slot": block.slot, "height": block.height,
            "timestamp": format_block_time(block.timestamp_ms), "block_id": block.block_id,
            "canonical": canonical.is_canonical(block)}


class Ledger:
    """Counts and records slot by slot; ``canonical`` tells which blocks the network kept.

    ``on_violation`` hears of each violation as it happens (the deterministic simulation
    turns it into a failed run); ``keep`` bounds the per-slot records and the heights
    remembered for the double-production check.
    """

    def __init__(self, producer: str, nodes: Sequence[str], interval_ms: int,
                 canonical: Canonical, keep: int = 100_000,
                 on_violation: Callable[[Violation], None] | None = None) -> None:
        self.producer = producer
        self.interval_ms = interval_ms
        self.keep = keep
        self._canonical = canonical
        self._on_violation = on_violation
        self._records: deque[SlotRecord] = deque(maxlen=keep)
        self._events: deque[Violation] = deque(maxlen=KEEP_EVENTS)
        self._by_height: dict[int, list[Block]] = {}
        self._votes: dict[str, dict[int, tuple[Block, str]]] = {}
        self._last_ours: tuple[int, list[Block]] | None = None  # the newest slot of ours
        self.blocks_by_node: Counter[str] = Counter({n: 0 for n in nodes})
        self.slots = 0
        self.our_slots = 0
        self.missed_slots = 0
        self.our_blocks = 0
        self.our_canonical = 0
        self.double_produced_slots = 0
        self.double_produced_heights = 0
        self.double_production_events = 0
        self.resigned_heights = 0
        self.votes = 0
        self.equivocations = 0
        self.shared_bls_keys = 0
        self.late_ticks = 0
        self._lateness_sum_ms = 0.0
        self.lateness_max_ms = 0.0

    @property
    def violations(self) -> int:
        return (self.double_produced_slots + self.double_produced_heights
                + self.equivocations + self.shared_bls_keys)

    def record_slot(self, slot: int, start_ms: int, producer: str, blocks: Sequence[Block],
                    lateness_ms: float = 0.0) -> None:
        """One slot has ended: ``blocks`` are our blocks signed in it (empty for others)."""
        ours = producer == self.producer
        if self.keep:
            self._records.append(SlotRecord(slot, start_ms, producer, ours,
                                            tuple(blocks), lateness_ms))
        self.slots += 1
        self._lateness_sum_ms += lateness_ms
        self.lateness_max_ms = max(self.lateness_max_ms, lateness_ms)
        if lateness_ms > LATE_FRACTION * self.interval_ms:
            self.late_ticks += 1
        if not ours:
            return
        self.our_slots += 1
        self._last_ours = (slot, list(blocks))
        if not blocks:
            self.missed_slots += 1
            return
        for block in blocks:
            self._count_block(block)
        if len(blocks) >= 2:
            self.double_produced_slots += 1
            self._event(Violation("slot", list(blocks)))

    def record_late(self, block: Block) -> None:
        """A block of ours signed for the slot just recorded: a producer resumed in the
        last moments of its slot, past the block's deadline, and signed at once."""
        if self._last_ours is None or self._last_ours[0] != block.slot:
            raise ValueError(f"late block for slot {block.slot}, not the newest of ours")
        slot, blocks = self._last_ours
        if not blocks:
            self.missed_slots -= 1
        blocks.append(block)
        if self.keep and self._records and self._records[-1].slot == slot:
            last = self._records.pop()
            self._records.append(SlotRecord(slot, last.start_ms, last.producer, True,
                                            tuple(blocks), last.lateness_ms))
        self._count_block(block)
        if len(blocks) == 2:
            self.double_produced_slots += 1
            self._event(Violation("slot", list(blocks)))

    def _count_block(self, block: Block) -> None:
        assert block.signer is not None
        self.our_blocks += 1
        self.blocks_by_node[block.signer] += 1
        same = self._by_height.setdefault(block.height, [])
        if same and all(b.signer == block.signer for b in same):
            # One node signing a height again after its own block lost a fork: Spring does
            # that by design on a Savanna chain (no watermark there; votes decide), and
            # nothing outside nodeos can stop it. Reported, not a double production.
            self.resigned_heights += 1
        same.append(block)
        signers = {b.signer for b in same}
        if len(signers) == 2 and block.signer in signers and \
                sum(1 for b in same if b.signer == block.signer) == 1:
            self.double_produced_heights += 1
            # The event holds the height's live list: a third signer joins this event.
            self._event(Violation("height", same))
        if len(self._by_height) > 2 * self.keep + 100:
            cutoff = block.height - self.keep
            self._by_height = {h: bs for h, bs in self._by_height.items() if h >= cutoff}

    def record_vote(self, key: str, node: str, block: Block) -> None:
        """Our node ``node`` signed a vote with ``key`` for ``block``."""
        self.votes += 1
        seen = self._votes.setdefault(key, {})
        earlier = seen.get(block.timestamp_ms)
        if earlier is None:
            seen[block.timestamp_ms] = (block, node)
            if len(seen) > 2 * self.keep + 100:
                cutoff = block.timestamp_ms - self.keep * self.interval_ms
                self._votes[key] = {t: v for t, v in seen.items() if t >= cutoff}
        elif earlier[0] is not block:
            self.equivocations += 1
            self._event(Violation("equivocation", [earlier[0], block], key,
                                  (earlier[1], node)))

    def record_shared_key(self, key: str, nodes: Sequence[str]) -> None:
        self.shared_bls_keys += 1
        self._event(Violation("shared_key", [], key, tuple(nodes)))

    def _event(self, violation: Violation) -> None:
        self.double_production_events += violation.kind in ("slot", "height")
        self._events.append(violation)
        log.warning("%s", violation.describe())
        if self._on_violation is not None:
            self._on_violation(violation)

    def on_reorg(self, reorg: Reorg) -> None:
        """Keep the count of our canonical blocks right when the network changes branch."""
        self.our_canonical += sum(1 for b in reorg.added if b.signer is not None)
        self.our_canonical -= sum(1 for b in reorg.removed if b.signer is not None)
        if reorg.removed:
            log.info("reorganisation: %d block(s) left the canonical chain, new head %d",
                     len(reorg.removed), self._canonical.head.height)

    def summary(self, head: Block) -> dict[str, Any]:
        """The counts; ``head`` is the network's head as visible now."""
        productions = [e for e in self._events if e.kind in ("slot", "height")]
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
            "resigned_heights": self.resigned_heights,
            "double_production_events": [_describe(e.kind, e.blocks) for e in productions],
            "votes": self.votes,
            "vote_equivocations": self.equivocations,
            "shared_bls_keys": self.shared_bls_keys,
            "finality_events": [e.describe() for e in self._events
                                if e.kind in ("equivocation", "shared_key")],
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
                "ours": r.ours, "blocks": [_block_json(b, self._canonical) for b in r.blocks],
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
