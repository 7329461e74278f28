"""The chain model: our producer's nodes and the rest of the network, slot by slot.

One model of the chain for both simulators. The HTTP simulator (:mod:`bpleader.sim`)
drives it from a wall-clock thread behind a lock; the deterministic simulation
(:mod:`bpleader.simworld`) drives it on virtual time. It is pure logic: every method takes
the time (seconds on the chain's wall clock), and the only randomness is in the
``delay`` function the driver passes in, which says how long a message takes from one
node to another.

What it models, per node (a nodeos process as the chain sees it):

* **production**: at a slot start of our producer, every node that may produce (up,
  unpaused, caught up, not implicitly paused, not held by ``pause_at_block``) begins a
  block on its own head; the block is finished and sent ``cutoff`` before the slot ends,
  paused since or not, as in nodeos. A pause takes effect at the next slot start. A
  resume in the middle of a slot of ours starts a block for that slot at once, unless
  the node's head already has that slot's block (Spring's ``start_block``: the pending
  block's time is the next slot after the later of now and the head's time).
* **propagation**: blocks, votes and transactions travel between nodes with the driver's
  delay; a node that is down, hung, not receiving (cut from p2p) or not sending misses
  them. Each node follows its own fork choice, so an isolated node builds its own fork.
* **Savanna** (see :mod:`bpleader.sim.finality`): every node votes with its configured
  BLS key while that key is in the block's policy, paused or not; quorum certificates,
  the last irreversible block, finalizer policy changes (``eosio::actfinkey``) and
  Spring's implicit production pause follow from the votes that reach each node.
* **legacy** (pre-Savanna): no votes; the last irreversible block trails the head by two
  thirds of a round.

The rest of the network ("ext") is one node that produces every slot not ours and votes
with every other finalizer's key. The network's head defines the canonical chain, and the
:class:`~bpleader.sim.ledger.Ledger` records every block and vote of ours.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bpleader.sim.chain import Block, Canonical, Schedule, genesis_block
from bpleader.sim.finality import (
    DEFAULT_VOTE_TIMEOUT,
    RECENT_BLOCK,
    PauseTracker,
    Policy,
    PolicyState,
    simulated_bls_key,
)
from bpleader.sim.ledger import Ledger, Violation

log = logging.getLogger("bpleader.sim.model")

EXT = "ext"  # the rest of the network
# Other finalizers beyond the other producers, so that our producer's finalizer alone
# never holds a third of the policy (a chain of 21 has 20 others).
MIN_OTHER_FINALIZERS = 3
_BLOCK, _VOTE, _TX = 0, 1, 2


class Transaction(Protocol):
    """What the model needs of a transaction; the system contract executes it."""

    @property
    def id(self) -> str: ...

    @property
    def expiration_ms(self) -> int: ...


class Contract(Protocol):
    """The system contract's part in block production (see :mod:`bpleader.sim.system`)."""

    def execute(self, tx: Any, state: PolicyState, generation: int) -> Policy | None: ...


@dataclass(frozen=True)
class ChainConfig:
    producer: str
    nodes: tuple[str, ...]
    schedule: Schedule
    interval_ms: int = 500
    epoch_ms: int = 0  # slot s starts at epoch_ms + s * interval_ms
    first_slot: int = 0  # the first slot to run; genesis stands for the one before
    savanna: bool = True
    # Per node: its BLS finalizer key (None: it has none configured). Missing: a key of
    # its own, as the guide wants.
    bls_keys: Mapping[str, str | None] = field(default_factory=dict)
    active_node: str | None = None  # whose key is active at genesis (default: the first)
    vote_timeout: float = DEFAULT_VOTE_TIMEOUT  # 0 disables the implicit pause
    pause_on_startup: Mapping[str, bool] = field(default_factory=dict)
    keep: int = 100_000  # heights of blocks, records and votes kept

    def key_of(self, node: str) -> str | None:
        return self.bls_keys[node] if node in self.bls_keys else simulated_bls_key(node)

    def other_finalizers(self) -> tuple[str, ...]:
        others = [p for p in self.schedule.producers if p != self.producer]
        extra = (f"finalizer{i}" for i in range(1, 10))
        while len(others) < MIN_OTHER_FINALIZERS:
            others.append(next(extra))
        return tuple(others)


class ChainNode:
    """One nodeos process as the chain sees it (its API lives in the driver)."""

    __slots__ = (
        "forced_pause",
        "generation",
        "head",
        "held",
        "hung",
        "keys",
        "lag",
        "last_vote_ms",
        "last_votes",
        "mempool",
        "name",
        "p2p_extra",
        "pause_at",
        "pause_on_startup",
        "paused",
        "pending",
        "production_enabled",
        "qc_blocks",
        "receiving",
        "sending",
        "signer",
        "stalled",
        "tallies",
        "tracker",
        "up",
        "vote_timeout",
        "watermark",
    )

    def __init__(self, name: str, signer: str | None, keys: frozenset[str], head: Block,
                 paused: bool, vote_timeout: float) -> None:
        self.name = name
        self.signer = signer
        self.keys = keys
        self.head = head
        self.pause_on_startup = paused
        self.paused = paused
        self.vote_timeout = vote_timeout
        self.up = True
        self.hung = False  # the whole process is stuck: no intake, no production, no votes
        self.stalled = False  # stuck syncing: takes no blocks and does not produce
        self.production_enabled = True  # nodeos's stale-production rule after a start
        # An implicit pause for a reason other than votes (max-reversible-blocks, an old
        # irreversible block): ``paused`` reads true and nothing is produced.
        self.forced_pause = False
        self.receiving = True
        self.sending = True
        self.p2p_extra = 0.0  # bound of extra random delay of messages to and from it
        self.lag = 0.0  # fixed extra delay of everything it receives
        self.pending: tuple[int, Block] | None = None  # (slot, parent) being signed
        self.pause_at: int | None = None  # pause_at_block: apply no block past this one
        self.held: list[Block] = []  # blocks received while held by pause_at
        self.generation = 0  # bumped by each restart: messages to the old process are lost
        self.tracker = PauseTracker(vote_timeout)
        self.last_vote_ms = -1  # the safety file: never vote twice for one timestamp
        self.watermark = 0  # legacy nodeos: the highest block it signed (in memory)
        self.tallies: dict[Block, set[str]] = {}
        self.qc_blocks: set[Block] = set()
        self.last_votes: dict[str, Block] = {}
        self.mempool: dict[str, tuple[Transaction, float]] = {}

    @property
    def alive(self) -> bool:
        """Running and able to take blocks and votes."""
        return self.up and not self.hung

    def reset_process(self) -> None:
        """A new nodeos process: memory is gone, the safety file stays."""
        self.generation += 1
        self.pending = None
        self.pause_at = None
        self.held.clear()
        self.tracker = PauseTracker(self.vote_timeout)
        self.tallies.clear()
        self.qc_blocks.clear()
        self.mempool.clear()
        self.watermark = 0


@dataclass(frozen=True)
class ChainView:
    """What one node reports of the chain at one moment (get_info's block fields)."""

    head: Block
    lib: Block
    earliest_available_block_num: int


Delay = Callable[[ChainNode, ChainNode], float]


def no_delay(sender: ChainNode, receiver: ChainNode) -> float:
    return receiver.lag


class ChainModel:
    def __init__(self, config: ChainConfig, delay: Delay = no_delay,
                 contract: Contract | None = None,
                 on_violation: Callable[[Violation], None] | None = None) -> None:
        self.config = config
        self.producer = config.producer
        self.schedule = config.schedule
        self.interval_ms = config.interval_ms
        self.delay = delay
        self.contract = contract
        self.now = 0.0  # the time of the last advance
        genesis = genesis_block(config.first_slot - 1, self.slot_start_ms(config.first_slot))
        self.genesis = genesis
        self.others = config.other_finalizers()
        keys = {n: config.key_of(n) for n in config.nodes}
        if config.savanna:
            active = config.active_node or config.nodes[0]
            ours = keys[active] or next((k for k in keys.values() if k), None)
            fins = [(config.producer, ours or simulated_bls_key(config.producer))]
            fins += [(o, simulated_bls_key(o)) for o in self.others]
            genesis.policies = PolicyState(Policy.of(1, sorted(fins)))
        self.canonical = Canonical(genesis, config.keep)
        self.ledger = Ledger(config.producer, list(config.nodes), config.interval_ms,
                             self.canonical, config.keep, on_violation)
        self.nodes: dict[str, ChainNode] = {
            n: ChainNode(n, n, frozenset(k for k in (keys[n],) if k), genesis,
                         config.pause_on_startup.get(n, False), config.vote_timeout)
            for n in config.nodes}
        self.ext = ChainNode(EXT, None, frozenset(simulated_bls_key(o) for o in self.others),
                             genesis, False, 0.0)
        self._peers = [*self.nodes.values(), self.ext]
        self._events: list[tuple[float, int, int, ChainNode, int, Any]] = []
        self._seq = 0
        self._blocks: list[Block] = []  # created, oldest first, for trimming
        self._trimmed = 0
        self._included: dict[str, list[Block]] = {}
        self._lateness: dict[int, float] = {}
        self._open_slot: int | None = None  # begun and not yet finished
        self._finished_slot: int | None = None  # finished, the next not begun yet
        self._check_shared_keys()

    # ------------------------------------------------------------------ helpers

    def slot_start_ms(self, slot: int) -> int:
        return self.config.epoch_ms + slot * self.interval_ms

    def node(self, name: str) -> ChainNode:
        return self.nodes[name]

    def _check_shared_keys(self) -> None:
        owners: dict[str, list[str]] = {}
        for node in self.nodes.values():
            for key in node.keys:
                owners.setdefault(key, []).append(node.name)
        for key, names in owners.items():
            if len(names) > 1:
                self.ledger.record_shared_key(key, names)

    def configure_key(self, name: str, key: str | None, now: float) -> None:
        """nodeos restarted with another BLS key (keys are read at start-up only)."""
        node = self.nodes[name]
        node.keys = frozenset({key}) if key else frozenset()
        node.reset_process()
        self._check_shared_keys()

    def _push(self, at: float, target: ChainNode, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, target, target.generation,
                                      payload))

    def advance(self, now: float) -> None:
        """Deliver every message due by ``now``, in time order."""
        events = self._events
        while events and events[0][0] <= now:
            at, _, kind, target, generation, payload = heapq.heappop(events)
            if generation != target.generation or not target.alive:
                continue  # sent to a process that has died or hangs since
            if kind == _BLOCK:
                self._learn(target, payload, at)
            elif kind == _VOTE:
                self._take_vote(target, payload[0], payload[1], at)
            elif not target.stalled and payload.id not in target.mempool:
                target.mempool[payload.id] = (payload, at)
        self.now = max(self.now, now)

    def _send(self, sender: ChainNode, at: float, kind: int, payload: Any) -> None:
        if not sender.sending:
            return
        for peer in self._peers:
            if peer is not sender and peer.receiving:
                self._push(at + self.delay(sender, peer), peer, kind, payload)

    # ------------------------------------------------------------------ blocks

    def _better(self, block: Block, head: Block) -> bool:
        """Fork choice as Spring's fork database orders branches. Savanna: the newer
        quorum certificate claim first, then the newer block. Legacy: the higher block.
        A tie keeps the block seen first."""
        if self.config.savanna:
            bq = block.qc.timestamp_ms if block.qc else 0
            hq = head.qc.timestamp_ms if head.qc else 0
            if bq != hq:
                return bq > hq
            return block.timestamp_ms > head.timestamp_ms
        return block.height > head.height

    def _learn(self, node: ChainNode, block: Block, at: float, own: bool = False) -> None:
        """``node`` receives ``block`` (or signed it: ``own``, applied even while it is
        stuck syncing, as nodeos builds its block on its own state): fork choice,
        implicit-pause tracking, and its vote."""
        if node.stalled and not own:
            return
        head = node.head
        if head is block or (head.height >= block.height and head.extends(block)):
            return  # known already
        if node.pause_at is not None and block.height > node.pause_at:
            node.held.append(block)  # pause_at_block: not applied until resumed
            if head.height >= node.pause_at:
                return
            # Catching up from below: blocks are applied one by one up to the pause
            # block, so the head stops there however far ahead this block is.
            block = block.ancestor(node.pause_at)
            if head is block or (head.height >= block.height and head.extends(block)):
                return
        if self._better(block, head):
            node.head = block
            if node is self.ext:
                reorg = self.canonical.adopt(block)
                if reorg is not None:
                    self.ledger.on_reorg(reorg)
        if self.config.savanna:
            node.tracker.on_block(at, block.timestamp_ms / 1000)
            self._vote(node, block, at)

    def _vote(self, node: ChainNode, block: Block, at: float) -> None:
        state = block.policies
        if not node.keys or state is None or block.timestamp_ms <= node.last_vote_ms \
                or block.timestamp_ms / 1000 < at - RECENT_BLOCK:
            return
        keys = frozenset(k for k in node.keys if state.may_vote(k))
        if not keys:
            return
        node.last_vote_ms = block.timestamp_ms
        if node.signer is not None:
            for key in keys:
                self.ledger.record_vote(key, node.signer, block)
        self._take_vote(node, block, keys, at)
        self._send(node, at, _VOTE, (block, keys))

    def _take_vote(self, node: ChainNode, block: Block, keys: frozenset[str],
                   at: float) -> None:
        state = block.policies
        if state is None:
            return
        ours = any(p.key_of(self.producer) in keys for p in state.voting())
        node.tracker.on_vote(at, ours)
        for key in keys:
            node.last_votes[key] = block
        if block in node.qc_blocks:
            return
        tally = node.tallies.setdefault(block, set())
        tally |= keys
        if state.quorum(tally):
            node.qc_blocks.add(block)

    def _best_qc(self, node: ChainNode, parent: Block) -> Block | None:
        """The highest block on ``parent``'s branch this node holds a QC on."""
        floor = parent.qc.height if parent.qc else 0
        cursor: Block | None = parent
        while cursor is not None and cursor.height > floor:
            if cursor in node.qc_blocks:
                return cursor
            cursor = cursor.parent
        return parent.qc

    def _sign(self, node: ChainNode, slot: int, parent: Block, at: float) -> Block:
        producer = self.schedule.producer_at(slot)
        block = Block(parent.height + 1, slot, self.slot_start_ms(slot + 1), producer,
                      node.signer, parent)
        if self.config.savanna and parent.policies is not None:
            qc = self._best_qc(node, parent)
            block.qc = qc
            final = qc.qc if qc is not None and qc.qc is not None else parent.final
            block.final = final if final.height > parent.final.height else parent.final
            proposals = self._include(node, block, parent)
            block.policies = parent.policies.next(block.height, block.final.height,
                                                  proposals)
        self._blocks.append(block)
        return block

    def _include(self, node: ChainNode, block: Block, parent: Block) -> tuple[Policy, ...]:
        """Transactions of ``node``'s mempool go into its block; actfinkey proposes."""
        if not node.mempool or self.contract is None or parent.policies is None:
            return ()
        proposals: list[Policy] = []
        included: list[str] = []
        state = parent.policies
        for tx_id, (tx, _) in list(node.mempool.items()):
            if tx.expiration_ms < block.timestamp_ms:
                del node.mempool[tx_id]
                continue
            if any(parent.extends(b) for b in self._included.get(tx_id, ())):
                del node.mempool[tx_id]
                continue
            policy = self.contract.execute(tx, state, state.latest.generation + 1)
            included.append(tx_id)
            self._included.setdefault(tx_id, []).append(block)
            del node.mempool[tx_id]
            if policy is not None:
                proposals.append(policy)
                state = PolicyState(state.active, state.pending,
                                    (*state.proposed, (policy, block.height)))
        block.txs = tuple(included)
        return tuple(proposals)

    # ------------------------------------------------------------------ slots

    def producing(self, node: ChainNode, now: float) -> bool:
        """Would sign a block if a slot of ours began now."""
        if not node.alive or node.paused or node.stalled:
            return False
        if node.pause_at is not None and node.head.height >= node.pause_at:
            return False
        if not node.production_enabled:
            if node.head.timestamp_ms + self.interval_ms < now * 1000:
                return False
            node.production_enabled = True
        return not (node.forced_pause or (self.config.savanna and node.tracker.paused(now)))

    def begin_slot(self, slot: int, now: float, lateness_ms: float = 0.0) -> None:
        """The slot starts: whoever may produce begins a block on its own head."""
        self.advance(now)
        self._lateness[slot] = lateness_ms
        self._open_slot, self._finished_slot = slot, None
        if self.schedule.producer_at(slot) == self.producer:
            for node in self.nodes.values():
                self._maybe_begin(node, slot, now)
        else:
            self.ext.pending = (slot, self.ext.head)

    def _maybe_begin(self, node: ChainNode, slot: int, now: float) -> None:
        # Legacy nodeos never signs below its own watermark (another fork's block);
        # Spring dropped that rule for Savanna, where votes decide finality.
        if self.producing(node, now) and (self.config.savanna
                                          or node.watermark <= node.head.height):
            node.pending = (slot, node.head)

    def finish_slot(self, slot: int, now: float) -> list[Block]:
        """Blocks begun at the slot start are signed and sent, paused since or not."""
        self.advance(now)
        if self._open_slot == slot:
            self._open_slot, self._finished_slot = None, slot
        ours: list[Block] = []
        for node in self._peers:
            if node.pending is None or node.pending[0] != slot:
                continue
            parent = node.pending[1]
            node.pending = None
            if not node.alive:
                continue
            block = self._sign(node, slot, parent, now)
            if node.signer is not None:
                ours.append(block)
                node.watermark = max(node.watermark, block.height)
            self._learn(node, block, now, own=True)
            self._send(node, now, _BLOCK, block)
        producer = self.schedule.producer_at(slot)
        self.ledger.record_slot(slot, self.slot_start_ms(slot), producer,
                                ours if producer == self.producer else (),
                                self._lateness.pop(slot, 0.0))
        self._trim()
        return ours

    def _trim(self) -> None:
        """Forget blocks ``keep`` heights below the network's head (bounded memory)."""
        cutoff = self.canonical.head.height - self.config.keep
        blocks = self._blocks
        i = self._trimmed
        while i < len(blocks) and blocks[i].height < cutoff:
            blocks[i].parent = None
            i += 1
        if i > 1000 and i > len(blocks) // 2:
            del blocks[:i]
            i = 0
            floor = cutoff
            for node in self._peers:
                node.tallies = {b: k for b, k in node.tallies.items() if b.height >= floor}
                node.qc_blocks = {b for b in node.qc_blocks if b.height >= floor}
            self._included = {t: bs for t, bs in self._included.items()
                              if bs[-1].height >= floor}
        self._trimmed = i

    # ------------------------------------------------------------------ views

    def view(self, name: str, now: float) -> ChainView:
        node = self.nodes[name]
        self.advance(now)
        head = node.head
        if self.config.savanna:
            lib = head.final
        else:
            lib = head.ancestor(max(1, head.height - self.schedule.irreversible_depth))
        return ChainView(head, lib, max(self.canonical.oldest_height, 1))

    def is_paused(self, name: str, now: float) -> bool:
        """``/v1/producer/paused``: explicit or implicit (pause_at_block is not reported)."""
        node = self.nodes[name]
        self.advance(now)
        return node.paused or self.implicitly_paused(name, now)

    def implicitly_paused(self, name: str, now: float) -> bool:
        node = self.nodes[name]
        self.advance(now)
        return node.forced_pause or (self.config.savanna and node.tracker.paused(now))

    def policy_state(self, name: str, now: float) -> PolicyState | None:
        self.advance(now)
        return self.nodes[name].head.policies

    def best_head(self, exclude: ChainNode) -> Block:
        """The best head among connected, live peers (what a syncing node catches up to)."""
        best = self.genesis
        for peer in self._peers:
            if peer is exclude or not peer.sending or not peer.alive:
                continue
            if best is self.genesis or self._better(peer.head, best):
                best = peer.head
        return best

    # ------------------------------------------------------------------ producer API

    def pause(self, name: str) -> None:
        self.nodes[name].paused = True

    def resume(self, name: str, now: float) -> None:
        """Resume: clears pause_at_block and resets the implicit-pause tracking, as Spring."""
        node = self.nodes[name]
        self.advance(now)
        node.paused = False
        node.tracker.reset()
        if node.pause_at is not None:
            self.release_hold(node, now)
        self._join_open_slot(node, now)

    def _join_open_slot(self, node: ChainNode, now: float) -> None:
        """A resumed producer does not wait for the next slot: Spring aborts its
        speculative block and starts one for the slot in progress, whose block it signs
        with the others at the slot's end. A new leader that resumes while the old one's
        block of this slot is still being signed produces this slot a second time."""
        slot = self._open_slot if self._open_slot is not None else self._finished_slot
        if slot is None or node.pending is not None \
                or self.schedule.producer_at(slot) != self.producer \
                or node.head.timestamp_ms >= self.slot_start_ms(slot + 1):
            return
        self._maybe_begin(node, slot, now)
        if slot == self._finished_slot and node.pending is not None:
            # Past the block's deadline: Spring signs it at once.
            node.pending = None
            block = self._sign(node, slot, node.head, now)
            node.watermark = max(node.watermark, block.height)
            self._learn(node, block, now)
            self._send(node, now, _BLOCK, block)
            self.ledger.record_late(block)

    def pause_at_block(self, name: str, block_num: int, now: float) -> int:
        """Hold block application at ``block_num``; returns the head (refused at or below)."""
        node = self.nodes[name]
        self.advance(now)
        if block_num <= node.head.height:
            raise ValueError(f"Pause at block {block_num} <= chain head {node.head.height}")
        node.pause_at = block_num
        return node.head.height

    def release_hold(self, node: ChainNode, now: float) -> None:
        node.pause_at = None
        held, node.held = node.held, []
        for block in held:
            self._learn(node, block, now)

    # ------------------------------------------------------------------ transactions

    def submit(self, name: str, tx: Transaction, now: float) -> None:
        """A transaction accepted by ``name``'s API: into its mempool and relayed."""
        node = self.nodes[name]
        self.advance(now)
        node.mempool[tx.id] = (tx, now)
        self._send(node, now, _TX, tx)

    def seen_transaction(self, name: str, tx_id: str) -> bool:
        node = self.nodes[name]
        if tx_id in node.mempool:
            return True
        return any(node.head.extends(b) for b in self._included.get(tx_id, ()))

    # ------------------------------------------------------------------ life and p2p

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.up = False
        node.receiving = node.sending = False
        node.reset_process()

    def start(self, name: str, now: float, catch_up: float = 0.0,
              paused: bool | None = None) -> None:
        """The process starts: paused only with pause-on-startup; it produces only once
        it has caught up with the chain (``catch_up`` seconds from now)."""
        node = self.nodes[name]
        self.advance(now)
        node.up, node.hung, node.stalled, node.forced_pause = True, False, False, False
        node.paused = node.pause_on_startup if paused is None else paused
        node.production_enabled = False
        self.rejoin(name, now, catch_up)

    def rejoin(self, name: str, now: float, catch_up: float) -> None:
        """``name`` is back on the p2p network: it catches up, and the others get its head."""
        node = self.nodes[name]
        self.advance(now)
        node.receiving = node.sending = True
        self._push(now + catch_up, node, _BLOCK, self.best_head(node))
        for peer in self._peers:
            if peer is not node and peer.receiving:
                self._push(now + self.delay(node, peer), peer, _BLOCK, node.head)

    def set_stalled(self, name: str, stalled: bool, now: float) -> None:
        """Stuck syncing (the HTTP simulator's ``desync``): no blocks in, none out."""
        node = self.nodes[name]
        self.advance(now)
        node.stalled = stalled
        if not stalled:
            self.rejoin(name, now, 0.0)

    def set_isolated(self, name: str, isolated: bool, now: float) -> None:
        """Cut from the p2p network both ways (the HTTP simulator's ``isolate``): nothing in,
        nothing out, so a producing node builds a fork of its own and its LIB stops."""
        node = self.nodes[name]
        self.advance(now)
        if isolated:
            node.receiving = node.sending = False
        else:
            self.rejoin(name, now, 0.0)

    def set_hung(self, name: str, hung: bool, now: float) -> None:
        node = self.nodes[name]
        self.advance(now)
        node.hung = hung
        if hung:
            node.pending = None

    def next_event(self) -> float:
        return self._events[0][0] if self._events else math.inf

    def finalizer_keys(self) -> Iterable[tuple[str, frozenset[str]]]:
        return ((n.name, n.keys) for n in self.nodes.values())
