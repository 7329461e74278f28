"""The simulated network of one producer: its nodes' state, slot by slot.

Pure logic behind one lock, driven by an injectable wall clock: the HTTP servers call it
from their threads and the slot clock thread calls :meth:`Engine.tick`, while unit tests
call everything directly on a fake clock, without sleeping.

How a slot runs (``tick`` at the slot's start, the boundary):

1. a node with a ``pause_at_block`` whose head has reached that block pauses;
2. a slot of another producer gets its block from "the rest of the network", on the
   canonical head;
3. in one of our slots, every node that is up, unpaused and not desynced begins a block
   on *its own* view of the head. Deciding signers at the slot start is what makes a
   pause that arrives mid-slot too late for that slot, as in nodeos.

A block carries the timestamp of the slot's *end* and becomes visible then (a healthy
node's ``head_block_time`` is never in the future). A node sees the network's blocks at
once, or ``lag`` seconds late; it always sees its own blocks at once and builds on them
while they are at least as high as what it has received, as nodeos does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bpleader.sim.chain import (
    GENESIS_PRODUCER,
    Block,
    BlockTree,
    Schedule,
    format_block_time,
    make_block_id,
)
from bpleader.sim.faults import DOWN_FAULTS, FAULTS, FaultError
from bpleader.sim.ledger import KEEP_SLOTS, Ledger

log = logging.getLogger("bpleader.sim.engine")

Clock = Callable[[], float]


class UnknownNode(KeyError):
    """No simulated node has this name."""


class PauseAtBlockRejected(ValueError):
    """pause_at_block asked for a block the node's head has already reached (as Spring)."""

    def __init__(self, block_num: int, head: int) -> None:
        super().__init__(f"Pause at block {block_num} <= chain head {head}")
        self.block_num, self.head = block_num, head


@dataclass(frozen=True)
class ChainView:
    """What one node knows of the chain at one moment: what get_info reports."""

    head: Block
    lib: Block
    earliest_available_block_num: int


@dataclass
class NodeState:
    """One nodeos process as the chain sees it (its HTTP server lives elsewhere)."""

    name: str
    pause_on_startup: bool
    paused: bool
    up: bool = True
    faults: dict[str, dict[str, float]] = field(default_factory=dict)
    stuck_head: Block | None = None
    own_head: Block | None = None
    pause_at: int | None = None
    down_until: float | None = None


class Engine:
    """Chain, ledger and node states of one producer; every method takes the lock."""

    def __init__(self, producer: str, pause_on_startup: Mapping[str, bool],
                 schedule: Schedule, interval_ms: int, chain_id: str,
                 clock: Clock = time.time) -> None:
        self.producer = producer
        self.schedule = schedule
        self.interval_ms = interval_ms
        self.chain_id = chain_id
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.nodes = {name: NodeState(name, p, paused=p)
                      for name, p in sorted(pause_on_startup.items())}
        first = self._ms(clock()) // interval_ms
        genesis_id = make_block_id(1, "0" * 64, first - 1, None)
        genesis = Block(1, first - 1, first * interval_ms, GENESIS_PRODUCER, None, genesis_id,
                        "0" * 64)
        self.tree = BlockTree(genesis, keep=KEEP_SLOTS)
        self.ledger = Ledger(producer, list(self.nodes), interval_ms, self.tree)
        self.next_slot = first + 1

    @staticmethod
    def _ms(seconds: float) -> int:
        return int(seconds * 1000)

    def _node(self, name: str) -> NodeState:
        try:
            return self.nodes[name]
        except KeyError:
            raise UnknownNode(name) from None

    # ------------------------------------------------------------------ slot clock

    def next_boundary(self) -> float:
        """Wall time at which the next unprocessed slot begins."""
        with self.lock:
            return self.next_slot * self.interval_ms / 1000

    def tick(self, now: float | None = None) -> int:
        """Run every slot whose start is due by ``now``; returns how many ran.

        A late call catches up slot by slot, so no slot is ever skipped; how late each
        ran is recorded.
        """
        with self.lock:
            now_ms = now * 1000 if now is not None else self.clock() * 1000
            ran = 0
            while self.next_slot * self.interval_ms <= now_ms:
                slot = self.next_slot
                self._run_slot(slot, now_ms - slot * self.interval_ms)
                self.next_slot += 1
                ran += 1
            if ran:
                self.changed.notify_all()
            return ran

    def _run_slot(self, slot: int, lateness_ms: float) -> None:
        start = slot * self.interval_ms
        end = start + self.interval_ms
        for node in self.nodes.values():
            if node.up and node.pause_at is not None \
                    and self._head(node, start).height >= node.pause_at:
                log.info("node=%s event=paused_at_block block=%d", node.name, node.pause_at)
                node.paused, node.pause_at = True, None
        producer = self.schedule.producer_at(slot)
        if producer != self.producer:
            parent = self.tree.head
            block = Block(parent.height + 1, slot, end, producer, None,
                          make_block_id(parent.height + 1, parent.block_id, slot, None),
                          parent.block_id)
            self.tree.add(block)
            self._offer(block)
            self.ledger.record_slot(slot, producer, (), lateness_ms)
            return
        blocks = [self._sign(node, slot, start, end) for node in self.nodes.values()
                  if node.up and not node.paused and "desync" not in node.faults]
        best = max(blocks, key=lambda b: b.height, default=None)  # first wins a tie
        if best is not None:
            self._offer(best)
        self.ledger.record_slot(slot, producer, blocks, lateness_ms)
        log.debug("slot=%d signers=%s", slot, ",".join(str(b.signer) for b in blocks) or "-")

    def _sign(self, node: NodeState, slot: int, start: int, end: int) -> Block:
        parent = self._head(node, start)
        height = parent.height + 1
        block = Block(height, slot, end, self.producer, node.name,
                      make_block_id(height, parent.block_id, slot, node.name), parent.block_id)
        self.tree.add(block)
        node.own_head = block
        return block

    def _offer(self, block: Block) -> None:
        reorg = self.tree.offer(block, block.timestamp_ms)
        if reorg is not None:
            self.ledger.on_reorg(reorg)

    def _head(self, node: NodeState, t_ms: float) -> Block:
        """The head ``node`` sees at ``t_ms``: what it received, or its own newer block."""
        if node.stuck_head is not None:
            return node.stuck_head
        lag_ms = node.faults.get("lag", {}).get("seconds", 0.0) * 1000
        seen = self.tree.head_as_of(int(t_ms - lag_ms))
        own = node.own_head
        if own is not None and own.timestamp_ms <= t_ms and own.height >= seen.height:
            return own
        return seen

    def wait_slots(self, n: int, timeout: float) -> None:
        """Block until ``n`` more slots have run; TimeoutError after ``timeout`` s."""
        with self.lock:
            target = self.ledger.slots + n
            if not self.changed.wait_for(lambda: self.ledger.slots >= target, timeout):
                raise TimeoutError(f"{n} slots did not run within {timeout:.1f} s")

    # ------------------------------------------------------------------ producer API

    def pause(self, name: str) -> None:
        with self.lock:
            node = self._node(name)
            if not node.paused:
                log.info("node=%s event=pause", name)
            node.paused = True

    def resume(self, name: str) -> None:
        """Resume; like Spring, this also cancels a pending pause_at_block."""
        with self.lock:
            node = self._node(name)
            if node.paused:
                log.info("node=%s event=resume", name)
            node.paused, node.pause_at = False, None

    def is_paused(self, name: str) -> bool:
        with self.lock:
            return self._node(name).paused

    def pause_at_block(self, name: str, block_num: int) -> None:
        with self.lock:
            node = self._node(name)
            head = self._head(node, self.clock() * 1000).height
            if block_num <= head:
                raise PauseAtBlockRejected(block_num, head)
            node.pause_at = block_num
            log.info("node=%s event=pause_at_block block=%d", name, block_num)

    def get_info(self, name: str) -> ChainView:
        """The node's view of the chain now (the HTTP layer adds the constant fields)."""
        with self.lock:
            head = self._head(self._node(name), self.clock() * 1000)
            lib = self.tree.ancestor(
                head, max(1, head.height - self.schedule.irreversible_depth))
            return ChainView(head, lib, self.tree.oldest_height)

    # ------------------------------------------------------------------ faults and life

    def set_fault(self, name: str, kind: str, params: Mapping[str, float]) -> None:
        """Give a running node a fault (restart and kill go through :meth:`go_down`)."""
        if kind in DOWN_FAULTS or kind not in FAULTS:
            raise FaultError(f"{kind!r} is not a fault of a running node")
        with self.lock:
            node = self._node(name)
            if kind == "desync" and node.stuck_head is None:
                node.stuck_head = self._head(node, self.clock() * 1000)
            node.faults[kind] = dict(params)
            log.info("node=%s event=fault kind=%s params=%s", name, kind, dict(params))
            self.changed.notify_all()

    def clear_faults(self, name: str, kinds: Sequence[str] = ()) -> list[str]:
        """Clear ``kinds`` (all when empty) and return which were set, down faults included.

        Clearing a down fault does not start the node: the caller does (it owns the
        HTTP server).
        """
        unknown = [k for k in kinds if k not in FAULTS]
        if unknown:
            raise FaultError(f"unknown fault kind(s) {unknown} (known: {', '.join(FAULTS)})")
        with self.lock:
            node = self._node(name)
            wanted = list(kinds) or list(node.faults)
            cleared = [k for k in wanted if node.faults.pop(k, None) is not None]
            if "desync" in cleared:
                node.stuck_head = None
            if cleared:
                log.info("node=%s event=clear kinds=%s", name, ",".join(cleared))
            self.changed.notify_all()
            return cleared

    def faults(self, name: str) -> dict[str, dict[str, float]]:
        with self.lock:
            return {k: dict(v) for k, v in self._node(name).faults.items()}

    def is_up(self, name: str) -> bool:
        with self.lock:
            return self._node(name).up

    def has_fault(self, name: str, kind: str) -> bool:
        with self.lock:
            return kind in self._node(name).faults

    def go_down(self, name: str, down_for: float | None) -> None:
        """The process stops: for ``down_for`` seconds (a restart) or until started."""
        with self.lock:
            node = self._node(name)
            node.faults.pop("restart", None)
            node.faults.pop("kill", None)
            if down_for is None:
                node.faults["kill"] = {}
                node.down_until = None
            else:
                node.faults["restart"] = {"down": down_for}
                node.down_until = self.clock() + down_for
            node.up = False
            node.pause_at = None
            log.info("node=%s event=down for=%s", name,
                     "ever" if down_for is None else f"{down_for:g}s")
            self.changed.notify_all()

    def come_up(self, name: str) -> None:
        """The process starts: paused only with pause-on-startup, head resynced."""
        with self.lock:
            node = self._node(name)
            node.faults.pop("restart", None)
            node.faults.pop("kill", None)
            if node.faults.pop("desync", None) is not None:
                node.stuck_head = None
            node.up, node.down_until = True, None
            node.paused = node.pause_on_startup
            log.info("node=%s event=up paused=%s", name, str(node.paused).lower())
            self.changed.notify_all()

    def due_restarts(self, now: float) -> list[str]:
        with self.lock:
            return [n.name for n in self.nodes.values()
                    if not n.up and n.down_until is not None and n.down_until <= now]

    def next_restart(self) -> float | None:
        with self.lock:
            due = [n.down_until for n in self.nodes.values()
                   if not n.up and n.down_until is not None]
            return min(due) if due else None

    # ------------------------------------------------------------------ reports

    def node_status(self, name: str) -> dict[str, Any]:
        with self.lock:
            node = self._node(name)
            head = self._head(node, self.clock() * 1000)
            return {
                "name": name, "up": node.up, "paused": node.paused,
                "producing": node.up and not node.paused,
                "faults": {k: dict(v) for k, v in node.faults.items()},
                "head_block_num": head.height,
                "head_block_time": format_block_time(head.timestamp_ms),
                "pause_at_block": node.pause_at,
            }

    def summary(self) -> dict[str, Any]:
        with self.lock:
            head = self.tree.head_as_of(int(self.clock() * 1000))
            return {**self.ledger.summary(head),
                    "nodes": list(self.nodes),
                    "other_producers": [p for p in self.schedule.producers
                                        if p != self.producer],
                    "slots_per_producer": self.schedule.slots_per_producer,
                    "block_interval": self.interval_ms / 1000}

    def slot_records(self, since: int, limit: int) -> list[dict[str, Any]]:
        with self.lock:
            return self.ledger.records(since, limit)
