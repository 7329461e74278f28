"""A model of etcd for one producer prefix, and the per-node client with network faults.

:class:`SimEtcd` keeps what the agent relies on: a revision counter, keys with create
revisions and leases, leases that expire on the store's own (undrifted) clock, the
transactions of :class:`bpleader.store.EtcdStore`, and etcd's habit of renewing every
lease to its full TTL when its raft leader changes. Snapshots go through
:func:`bpleader.store.parse_snapshot`, so parsing is the production code.

:class:`StoreClient` is the :class:`bpleader.store.Store` one agent process holds. Its
requests cross a simulated network: they can be lost (partition, loss), slow, or applied
by etcd while the answer never arrives; every failure surfaces as a
:class:`~bpleader.store.StoreError` after the client's timeout, as a gRPC deadline would.
Its watch, as :class:`bpleader.watch_stream.PrefixWatch`, only says that an urgent key
changed: it breaks on a lost message and stays dead until the next successful read starts
it again, and it can hang (deliver nothing, unnoticed) for a while.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bpleader.simworld.process import Process
from bpleader.simworld.trace import Trace
from bpleader.store import (
    Candidate,
    Keys,
    Lease,
    NodeRecord,
    Snapshot,
    StoreError,
    handover_value,
    parse_snapshot,
)

T = TypeVar("T")

LEASE_NOT_FOUND = "etcdserver: requested lease not found"


@dataclass
class KeyValue:
    value: bytes
    create_revision: int
    lease: int


@dataclass
class LeaseState:
    id: int
    ttl: int
    expiry: float
    keys: list[str] = field(default_factory=list)


class SimEtcd:
    """The store's state machine; every method is one atomic request applied at ``now``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keys: Keys, rng: random.Random,
                 trace: Trace, min_ttl: int = 1) -> None:
        self.loop = loop
        self.keys = keys
        self.rng = rng
        self.trace = trace
        self.min_ttl = min_ttl
        self.revision = 1
        self.kvs: dict[str, KeyValue] = {}
        self.leases: dict[int, LeaseState] = {}
        self.unavailable_until = 0.0
        self._leader_at: tuple[int, KeyValue | None] = (0, None)  # (revision, lowest key)
        self.urgent_revision = 0  # the last revision that changed an urgent key
        self.on_urgent: Callable[[], None] = lambda: None  # the network's watches

    # ---------------------------------------------------------------- housekeeping

    def now(self) -> float:
        return self.loop.time()

    def available(self) -> bool:
        return self.now() >= self.unavailable_until

    def expire(self) -> None:
        """Revoke every lease whose time is up (lazily: each reader calls this first)."""
        now = self.now()
        if now < self.unavailable_until:
            return  # no raft leader, nobody expires anything
        for lease in [x for x in self.leases.values() if x.expiry <= now]:
            self._drop_lease(lease, "expired")

    def _drop_lease(self, lease: LeaseState, why: str) -> None:
        del self.leases[lease.id]
        if lease.keys:
            self.revision += 1
            for key in lease.keys:
                del self.kvs[key]
            self._touched(lease.keys)
        names = ",".join(k[len(self.keys.root):] for k in lease.keys)
        self.trace.add("etcd", f"lease {lease.id:x} {why}; deleted [{names}]")

    def leader_change(self, outage: float) -> None:
        """A raft election: no answers for ``outage``, then every lease gets its full TTL."""
        self.expire()
        self.unavailable_until = max(self.unavailable_until, self.now() + outage)
        for lease in self.leases.values():
            lease.expiry = max(lease.expiry, self.unavailable_until + lease.ttl)
        self.trace.add("etcd", f"leader change: unavailable {outage:.2f}s, leases renewed")

    def _alive_lease(self, lease_id: int, op: str) -> LeaseState:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise StoreError(op, LEASE_NOT_FOUND)
        return lease

    def _put(self, key: str, value: bytes, lease_id: int) -> int:
        old = self.kvs.get(key)
        if old is not None and old.lease and old.lease in self.leases:
            self.leases[old.lease].keys.remove(key)
        self.revision += 1
        create = old.create_revision if old is not None else self.revision
        self.kvs[key] = KeyValue(value, create, lease_id)
        if lease_id:
            self.leases[lease_id].keys.append(key)
        self._touched((key,))
        return create

    def _delete(self, key: str) -> None:
        old = self.kvs.pop(key)
        if old.lease and old.lease in self.leases:
            self.leases[old.lease].keys.remove(key)
        self.revision += 1
        self._touched((key,))

    def _touched(self, keys: list[str] | tuple[str, ...]) -> None:
        if any(self.keys.urgent(k) for k in keys):
            self.urgent_revision = self.revision
            self.on_urgent()

    # ------------------------------------------------------------- the Store API

    def grant(self, ttl: int) -> Lease:
        self.expire()
        lease_id = 0
        while lease_id == 0 or lease_id in self.leases:
            # Unordered ids, as etcd's: leadership must never depend on them.
            lease_id = self.rng.getrandbits(62) + 1
        granted = max(ttl, self.min_ttl)
        self.leases[lease_id] = LeaseState(lease_id, granted, self.now() + granted)
        return Lease(lease_id, granted)

    def keepalive(self, lease_id: int) -> int:
        self.expire()
        lease = self.leases.get(lease_id)
        if lease is None:
            return 0
        lease.expiry = self.now() + lease.ttl
        return lease.ttl

    def revoke(self, lease_id: int) -> None:
        self.expire()
        lease = self._alive_lease(lease_id, "revoke")
        self._drop_lease(lease, "revoked")

    def revoke_by_hand(self, lease_id: int) -> bool:
        """``etcdctl lease revoke`` from outside the agents; False if no such lease."""
        self.expire()
        lease = self.leases.get(lease_id)
        if lease is None:
            return False
        self._drop_lease(lease, "revoked by hand")
        return True

    def snapshot(self) -> Snapshot:
        self.expire()
        root = self.keys.root
        kvs = [(k, kv.value, kv.create_revision, kv.lease)
               for k, kv in sorted(self.kvs.items()) if k.startswith(root)]
        return parse_snapshot(self.keys, self.revision, kvs)

    def campaign(self, lease_id: int, node: str) -> Candidate:
        self.expire()
        key = self.keys.candidate(lease_id)
        existing = self.kvs.get(key)
        if existing is not None:
            return Candidate(key, node, lease_id, existing.create_revision)
        self._alive_lease(lease_id, "campaign")
        revision = self._put(key, node.encode(), lease_id)
        self.trace.add("etcd", f"campaign {node} key {lease_id:x} rev {revision}")
        return Candidate(key, node, lease_id, revision)

    def confirm_leader(self, me: Candidate, last: NodeRecord | None = None) -> bool:
        self.expire()
        own = self.kvs.get(me.key)
        if own is None or own.create_revision != me.create_revision:
            return False
        if last is not None:
            self._put(self.keys.last(me.node), last.to_json().encode(), 0)
            if self.keys.handover(me.node) in self.kvs:
                self._delete(self.keys.handover(me.node))
        election = self.keys.election
        revisions = [kv.create_revision for k, kv in self.kvs.items() if k.startswith(election)]
        return min(revisions) == me.create_revision

    def resign(self, me: Candidate, last_head: int = 0, stopped: float = 0.0) -> None:
        self.expire()
        own = self.kvs.get(me.key)
        if own is not None and own.create_revision == me.create_revision:
            self._delete(me.key)
        if last_head > 0:
            value = handover_value(me.node, last_head, me.create_revision, stopped)
            self._put(self.keys.handover(me.node), value.encode(), 0)
        self.trace.add("etcd", f"resign {me.node} key {me.lease_id:x} rev "
                       f"{me.create_revision}"
                       f"{f', handover head #{last_head}' if last_head else ''}")

    def publish(self, record: NodeRecord, lease_id: int, keep: bool = False) -> None:
        self.expire()
        self._alive_lease(lease_id, "publish")
        self._put(self.keys.node(record.node), record.to_json().encode(), lease_id)
        if keep:
            self._put(self.keys.last(record.node), record.to_json().encode(), 0)

    def clear_switchover(self, target: str) -> None:
        self.expire()
        key = self.keys.switchover
        kv = self.kvs.get(key)
        if kv is not None and kv.value == target.encode():
            self._delete(key)
            self.trace.add("etcd", f"switchover to {target or 'any'} cleared")

    def mark_unfenced(self, node: str, reason: str) -> None:
        self.expire()
        self._put(self.keys.unfenced_node(node), reason.encode(), 0)
        self.trace.add("etcd", f"{node} marked unfenced")

    def clear_unfenced(self, node: str) -> None:
        self.expire()
        if self.keys.unfenced_node(node) in self.kvs:
            self._delete(self.keys.unfenced_node(node))
            self.trace.add("etcd", f"{node} unfenced mark cleared")

    def leave_handover(self, node: str, head: int, by: str = "") -> None:
        self.expire()
        self._put(self.keys.handover(node), handover_value(node, head, by=by).encode(), 0)
        self.trace.add("etcd", f"{node} left handover head #{head}")

    # ------------------------------------------------------- operator commands

    def request_switchover(self, target: str, ttl: int) -> None:
        lease = self.grant(ttl)
        self._put(self.keys.switchover, target.encode(), lease.id)

    def set_maintenance(self, reason: str | None) -> None:
        self.expire()
        if reason is None:
            if self.keys.maintenance in self.kvs:
                self._delete(self.keys.maintenance)
        else:
            self._put(self.keys.maintenance, reason.encode(), 0)

    # ---------------------------------------------------------- for the checks

    def leader(self) -> tuple[str, float] | None:
        """Node name and lease expiry of the lowest election key, as etcd sees it now."""
        self.expire()
        if self._leader_at[0] != self.revision:  # the lowest key only moves with a write
            best: KeyValue | None = None
            for key, kv in self.kvs.items():
                if key.startswith(self.keys.election) and (
                        best is None or kv.create_revision < best.create_revision):
                    best = kv
            self._leader_at = (self.revision, best)
        lowest = self._leader_at[1]
        if lowest is None:
            return None
        lease = self.leases.get(lowest.lease)  # a keepalive moves the expiry, not the revision
        return lowest.value.decode(), lease.expiry if lease else float("inf")


@dataclass
class Link:
    """The network between one node and etcd; the fault scheduler changes it."""

    partitioned: bool = False
    loss: float = 0.0  # probability that a request or an answer is lost
    extra_delay: float = 0.0  # added to requests and answers, uniformly in [0, extra]
    min_latency: float = 0.0005
    max_latency: float = 0.004


@dataclass
class Watch:
    """One client's watch stream: dead until a read starts it; hung until ``hung_until``."""

    on_change: Callable[[], None]
    alive: bool = False
    hung_until: float = 0.0


class Network:
    """Carries requests from store clients to :class:`SimEtcd` and answers back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, etcd: SimEtcd,
                 rng: random.Random, late_requests: bool = False) -> None:
        self.loop = loop
        self.etcd = etcd
        self.rng = rng
        self.links: dict[str, Link] = {}
        self.late_requests = late_requests
        self.watches: dict[str, Watch] = {}
        etcd.on_urgent = self._notify

    def _notify(self) -> None:
        """An urgent key changed: each live watch hears of it one link delay later,
        unless the message is lost, which breaks the stream until the next read."""
        for node, watch in self.watches.items():
            if not watch.alive or self.loop.time() < watch.hung_until:
                continue
            link = self.links[node]
            if self._lost(link):
                watch.alive = False
            else:
                self.loop.call_at(self.loop.time() + self._delay(link), self._fire, watch)

    def _fire(self, watch: Watch) -> None:
        if watch.alive and self.loop.time() >= watch.hung_until:
            watch.on_change()

    def rewatch(self, node: str, revision: int) -> None:
        """A read at ``revision`` succeeded: a dead watch starts again from the next
        revision on, so it reports at once a change made since the read."""
        watch = self.watches.get(node)
        if watch is None or watch.alive:
            return
        watch.alive = True
        if self.etcd.urgent_revision > revision:
            self.loop.call_at(self.loop.time() + self._delay(self.links[node]), self._fire,
                              watch)

    def _delay(self, link: Link) -> float:
        d = self.rng.uniform(link.min_latency, link.max_latency)
        if link.extra_delay:
            d += self.rng.uniform(0.0, link.extra_delay)
        return d

    def _lost(self, link: Link) -> bool:
        return link.partitioned or (link.loss > 0 and self.rng.random() < link.loss)

    def send(self, node: str, op: str, apply: Callable[[], Any], timeout: float,
             request_delay: float = 0.0) -> asyncio.Future[Any]:
        """A future for the answer; a StoreError when no answer arrives within timeout."""
        loop = self.loop
        answer: asyncio.Future[Any] = loop.create_future()
        link = self.links[node]
        give_up = loop.time() + timeout

        def fail() -> None:
            if not answer.done():
                answer.set_exception(StoreError(op, f"context deadline exceeded "
                                                f"({timeout:.2f} s)"))

        def reply(ok: bool, value: Any) -> None:
            if answer.done():
                return
            if link.partitioned:
                loop.call_at(give_up, fail)  # the answer died on the wire
            elif ok:
                answer.set_result(value)
            else:
                answer.set_exception(value)

        def arrive() -> None:
            if not self.etcd.available():
                # Dropped by a member without a raft leader; the client times out.
                loop.call_at(max(give_up, loop.time()), fail)
                return
            try:
                result: tuple[bool, Any] = (True, apply())
            except StoreError as exc:
                result = (False, exc)
            back = self._delay(link)
            if self._lost(link) or loop.time() + back > give_up:
                loop.call_at(max(give_up, loop.time()), fail)
            else:
                loop.call_at(loop.time() + back, reply, *result)

        if self._lost(link):
            loop.call_at(give_up, fail)
        else:
            delay = self._delay(link) + request_delay
            if not self.late_requests:
                delay = min(delay, timeout * 0.95)
            if delay <= link.max_latency:
                arrive()  # on a quiet LAN the request lands at once; saves a timer
            else:
                # A slow request is applied late, even after the client gave up on it.
                loop.call_at(loop.time() + delay, arrive)
                if delay > timeout:
                    loop.call_at(give_up, fail)
        return answer


class StoreClient:
    """The :class:`bpleader.store.Store` of one agent process."""

    def __init__(self, network: Network, node: str, process: Process, timeout: float,
                 hooks: CallHooks) -> None:
        self.keys = network.etcd.keys
        self._net = network
        self._etcd = network.etcd
        self._node = node
        self._process = process
        self._timeout = timeout
        self._hooks = hooks

    async def _call(self, op: str, apply: Callable[[], T]) -> T:
        await self._process.gate()
        delay = self._hooks.request_delay(self._process, op)
        answer = self._net.send(self._node, op, apply, self._timeout, delay)
        try:
            value: T = await answer
        except StoreError:
            self._hooks.after_call(self._process, op)
            await self._process.gate()
            raise
        self._hooks.after_call(self._process, op)
        await self._process.gate()
        return value

    async def grant(self, ttl: int) -> Lease:
        return await self._call("grant", lambda: self._etcd.grant(ttl))

    async def keepalive(self, lease_id: int) -> int:
        return await self._call("keepalive", lambda: self._etcd.keepalive(lease_id))

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._call("revoke", lambda: self._etcd.revoke(lease_id))
        except StoreError as exc:
            if "lease not found" not in exc.reason:
                raise  # as EtcdStore: an expired lease is as revoked as it gets

    async def snapshot(self) -> Snapshot:
        snap: Snapshot = await self._call("snapshot", self._etcd.snapshot)
        self._net.rewatch(self._node, snap.revision)
        return snap

    def watch(self, on_change: Callable[[], None]) -> None:
        self._net.watches[self._node] = Watch(on_change)

    async def campaign(self, lease_id: int, node: str) -> Candidate:
        return await self._call("campaign", lambda: self._etcd.campaign(lease_id, node))

    async def confirm_leader(self, me: Candidate, last: NodeRecord | None = None) -> bool:
        return await self._call("confirm_leader", lambda: self._etcd.confirm_leader(me, last))

    async def resign(self, me: Candidate, last_head: int = 0, stopped: float = 0.0) -> None:
        await self._call("resign", lambda: self._etcd.resign(me, last_head, stopped))

    async def publish(self, record: NodeRecord, lease_id: int, keep: bool = False) -> None:
        await self._call("publish", lambda: self._etcd.publish(record, lease_id, keep))

    async def clear_switchover(self, target: str) -> None:
        await self._call("clear_switchover", lambda: self._etcd.clear_switchover(target))

    async def mark_unfenced(self, node: str, reason: str) -> None:
        await self._call("mark_unfenced", lambda: self._etcd.mark_unfenced(node, reason))

    async def clear_unfenced(self, node: str) -> None:
        await self._call("clear_unfenced", lambda: self._etcd.clear_unfenced(node))

    async def leave_handover(self, node: str, head: int, by: str = "") -> None:
        await self._call("handover", lambda: self._etcd.leave_handover(node, head, by))


class CallHooks:
    """Targeted faults at the agent's I/O points (FoundationDB's "buggify").

    The default does nothing; the fault scheduler overrides it to freeze a process right
    after a given answer, or to hold a request back on the wire or in nodeos's queue.
    """

    def request_delay(self, process: Process, op: str) -> float:
        """Extra seconds before an etcd request reaches etcd."""
        return 0.0

    def nodeos_delay(self, process: Process, call: str) -> float:
        """Extra seconds before a nodeos request is served."""
        return 0.0

    def after_call(self, process: Process, op: str) -> None:
        return None
