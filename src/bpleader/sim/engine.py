"""The HTTP simulator's driver of the chain model: one lock, a wall clock, and faults.

The HTTP servers call it from their threads and the slot clock thread calls
:meth:`Engine.tick`, while unit tests call everything directly on a fake clock, without
sleeping. The chain itself (blocks, votes, finality, pauses) is
:class:`bpleader.sim.model.ChainModel`, which the deterministic simulation drives too.

How a slot runs (``tick`` at each slot boundary): the previous slot's blocks are finished,
signed and sent (the simulator's blocks carry the slot's end as timestamp and show at
once, so a healthy node's ``head_block_time`` is never in the future), then the new slot
begins: every node that may produce begins a block on *its own* view of the head.
Deciding signers at the slot start is what makes a pause that arrives mid-slot too late
for that slot, as in nodeos. Messages between nodes take no time, except to a node with
a ``lag`` fault.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from bpleader.sim.chain import format_block_time
from bpleader.sim.faults import DOWN_FAULTS, FAULTS, FaultError
from bpleader.sim.httpd import Response
from bpleader.sim.model import ChainConfig, ChainModel, ChainView
from bpleader.sim.nodeos_api import Identity, NodeosApi
from bpleader.sim.system import SystemContract

log = logging.getLogger("bpleader.sim.engine")

Clock = Callable[[], float]


class UnknownNode(KeyError):
    """No simulated node has this name."""


class Engine:
    """Chain model, system contract and fault state of one producer; every method locks."""

    def __init__(self, config: ChainConfig, identity: Identity,
                 contract: SystemContract | None = None, clock: Clock = time.time) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.interval_ms = config.interval_ms
        first = int(clock() * 1000) // config.interval_ms
        self.config = replace(config, epoch_ms=0, first_slot=first)
        self.model = ChainModel(self.config, contract=contract)
        self.api = NodeosApi(self.model, contract, identity)
        self.producer = config.producer
        self.schedule = config.schedule
        self.next_slot = first
        self._faults: dict[str, dict[str, dict[str, float]]] = {n: {} for n in config.nodes}
        self._down_until: dict[str, float | None] = {n: None for n in config.nodes}

    def _node(self, name: str) -> str:
        if name not in self._faults:
            raise UnknownNode(name)
        return name

    def _now(self) -> float:
        return max(self.clock(), self.model.now)

    # ------------------------------------------------------------------ slot clock

    def next_boundary(self) -> float:
        """Wall time at which the next unprocessed slot begins."""
        with self.lock:
            return self.next_slot * self.interval_ms / 1000

    def tick(self, now: float | None = None) -> int:
        """Run every slot boundary due by ``now``; returns how many ran.

        A late call catches up slot by slot, so no slot is ever skipped; how late each
        ran is recorded.
        """
        with self.lock:
            now_ms = (now if now is not None else self.clock()) * 1000
            ran = 0
            while self.next_slot * self.interval_ms <= now_ms:
                slot = self.next_slot
                at = slot * self.interval_ms / 1000
                if slot > self.config.first_slot:
                    self.model.finish_slot(slot - 1, at)
                self.model.begin_slot(slot, at, now_ms - slot * self.interval_ms)
                self.next_slot += 1
                ran += 1
            if ran:
                self.changed.notify_all()
            return ran

    def wait_slots(self, n: int, timeout: float) -> None:
        """Block until ``n`` more slots have run; TimeoutError after ``timeout`` s."""
        with self.lock:
            target = self.model.ledger.slots + n
            if not self.changed.wait_for(lambda: self.model.ledger.slots >= target, timeout):
                raise TimeoutError(f"{n} slots did not run within {timeout:.1f} s")

    # ------------------------------------------------------------------ API

    def answer(self, name: str, path: str, body: bytes) -> Response:
        """A healthy nodeos's answer (the HTTP layer applies the API faults first)."""
        with self.lock:
            return self.api.answer(self._node(name), path, body, self._now())

    def pause(self, name: str) -> None:
        with self.lock:
            self.model.pause(self._node(name))

    def resume(self, name: str) -> None:
        with self.lock:
            self.model.resume(self._node(name), self._now())

    def is_paused(self, name: str) -> bool:
        with self.lock:
            return self.model.is_paused(self._node(name), self._now())

    def pause_at_block(self, name: str, block_num: int) -> None:
        with self.lock:
            self.model.pause_at_block(self._node(name), block_num, self._now())

    def get_info(self, name: str) -> ChainView:
        with self.lock:
            return self.model.view(self._node(name), self._now())

    # ------------------------------------------------------------------ faults and life

    def set_fault(self, name: str, kind: str, params: Mapping[str, float]) -> None:
        """Give a running node a fault (restart and kill go through :meth:`go_down`)."""
        if kind in DOWN_FAULTS or kind not in FAULTS:
            raise FaultError(f"{kind!r} is not a fault of a running node")
        with self.lock:
            node = self.model.node(self._node(name))
            if kind == "desync":
                self.model.set_stalled(name, True, self._now())
            elif kind == "isolate":
                self.model.set_isolated(name, True, self._now())
            elif kind == "lag":
                node.lag = float(params["seconds"])
            self._faults[name][kind] = dict(params)
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
            faults = self._faults[self._node(name)]
            wanted = list(kinds) or list(faults)
            cleared = [k for k in wanted if faults.pop(k, None) is not None]
            node = self.model.node(name)
            if "desync" in cleared and node.up:
                self.model.set_stalled(name, False, self._now())
            if "isolate" in cleared and node.up:
                self.model.set_isolated(name, False, self._now())
            if "lag" in cleared:
                node.lag = 0.0
            if cleared:
                log.info("node=%s event=clear kinds=%s", name, ",".join(cleared))
            self.changed.notify_all()
            return cleared

    def faults(self, name: str) -> dict[str, dict[str, float]]:
        with self.lock:
            return {k: dict(v) for k, v in self._faults[self._node(name)].items()}

    def is_up(self, name: str) -> bool:
        with self.lock:
            return self.model.node(self._node(name)).up

    def has_fault(self, name: str, kind: str) -> bool:
        with self.lock:
            return kind in self._faults[self._node(name)]

    def go_down(self, name: str, down_for: float | None) -> None:
        """The process stops: for ``down_for`` seconds (a restart) or until started."""
        with self.lock:
            faults = self._faults[self._node(name)]
            faults.pop("restart", None)
            faults.pop("kill", None)
            if down_for is None:
                faults["kill"] = {}
                self._down_until[name] = None
            else:
                faults["restart"] = {"down": down_for}
                self._down_until[name] = self.clock() + down_for
            self.model.crash(name)
            log.info("node=%s event=down for=%s", name,
                     "ever" if down_for is None else f"{down_for:g}s")
            self.changed.notify_all()

    def come_up(self, name: str) -> None:
        """The process starts: paused only with pause-on-startup, head resynced."""
        with self.lock:
            faults = self._faults[self._node(name)]
            faults.pop("restart", None)
            faults.pop("kill", None)
            faults.pop("desync", None)
            faults.pop("isolate", None)  # a started process connects to its peers again
            self._down_until[name] = None
            self.model.start(name, self._now())
            node = self.model.node(name)
            node.lag = faults.get("lag", {}).get("seconds", 0.0)
            log.info("node=%s event=up paused=%s", name, str(node.paused).lower())
            self.changed.notify_all()

    def due_restarts(self, now: float) -> list[str]:
        with self.lock:
            return [n for n, until in self._down_until.items()
                    if until is not None and until <= now and not self.model.node(n).up]

    def next_restart(self) -> float | None:
        with self.lock:
            due = [until for n, until in self._down_until.items()
                   if until is not None and not self.model.node(n).up]
            return min(due) if due else None

    # ------------------------------------------------------------------ reports

    def node_status(self, name: str) -> dict[str, Any]:
        with self.lock:
            now = self._now()
            view = self.model.view(self._node(name), now)
            node = self.model.node(name)
            paused = self.model.is_paused(name, now)
            return {
                "name": name, "up": node.up, "paused": paused,
                "producing": node.up and not paused,
                "implicitly_paused": self.model.implicitly_paused(name, now),
                "faults": {k: dict(v) for k, v in self._faults[name].items()},
                "head_block_num": view.head.height,
                "head_block_time": format_block_time(view.head.timestamp_ms),
                "last_irreversible_block_num": view.lib.height,
                "pause_at_block": node.pause_at,
                "finalizer_key": next(iter(node.keys), None),
            }

    def summary(self) -> dict[str, Any]:
        with self.lock:
            head = self.model.canonical.head
            state = head.policies
            active = state.active.key_of(self.producer) if state else None
            owner = next((n.name for n in self.model.nodes.values() if active in n.keys),
                         None)
            return {**self.model.ledger.summary(head),
                    "nodes": list(self.model.nodes),
                    "other_producers": [p for p in self.schedule.producers
                                        if p != self.producer],
                    "round_slots": self.schedule.round_slots,
                    "block_interval": self.interval_ms / 1000,
                    "savanna": self.config.savanna,
                    "last_irreversible_block_num": head.final.height if state else None,
                    "active_finalizer_key": active,
                    "active_finalizer_node": owner,
                    "finalizer_policy_generation": state.active.generation if state else None}

    def finalizer_keys(self) -> dict[str, str | None]:
        """Each node's configured BLS finalizer key (none on a legacy chain)."""
        with self.lock:
            if not self.config.savanna:
                return {}
            return {n.name: next(iter(sorted(n.keys)), None)
                    for n in self.model.nodes.values()}

    def finalizers(self) -> dict[str, Any]:
        """Our producer's finalizer as the network's head has it (the active key, the
        node configured with it, the policy generation, a key switch in progress), and
        each node's key and implicit production pause."""
        with self.lock:
            now = self._now()
            self.model.advance(now)
            head = self.model.canonical.head
            state = head.policies
            active = state.active.key_of(self.producer) if state else None
            pending = state.pending[0].key_of(self.producer) if state and state.pending \
                else None
            proposed = state.proposed[-1][0].key_of(self.producer) \
                if state and state.proposed else None
            nodes: dict[str, dict[str, Any]] = {}
            for name, node in self.model.nodes.items():
                key = next(iter(sorted(node.keys)), None) if state else None
                implicit = self.model.implicitly_paused(name, now)
                reason = ""
                if implicit:
                    reason = node.tracker.reason(now) or "forced"
                nodes[name] = {"up": node.up, "finalizer_key": key,
                               "active": key is not None and key == active,
                               "implicitly_paused": implicit, "pause_reason": reason}
            return {"savanna": self.config.savanna,
                    "vote_timeout": self.config.vote_timeout if state else None,
                    "active_finalizer_key": active,
                    "active_finalizer_node": next(
                        (n for n, v in nodes.items() if v["active"]), None),
                    "finalizer_policy_generation": state.active.generation if state else None,
                    "pending_finalizer_key": pending,
                    "proposed_finalizer_key": proposed,
                    "last_irreversible_block_num": head.final.height if state else None,
                    "nodes": nodes}

    def slot_records(self, since: int, limit: int) -> list[dict[str, Any]]:
        with self.lock:
            return self.model.ledger.records(since, limit)
