"""The coordination store: the etcd key layout and the few operations the agent needs.

The agent core talks to a :class:`Store`, never to etcd directly, so that the
deterministic simulation can hand it a model of etcd instead (as Patroni splits its HA
loop from its DCS classes). :class:`EtcdStore` is the production implementation on
``pyetcd`` (etcd-sdk-python).

Every read that decides leadership or a resume is linearizable: ``pyetcd`` range requests
are linearizable unless ``serializable=True`` is asked for, and this module never asks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from bpleader.etcd_errors import AUTH, PERMISSION, TLS, Backoff, cert_hint, explain, grpc_status
from bpleader.lease_stream import Renewals
from bpleader.watch_stream import PrefixWatch, prefix_end

log = logging.getLogger(__name__)

T = TypeVar("T")

# A value written by someone else under our prefix is never trusted to be small.
MAX_RECORD_BYTES = 4096


class StoreError(Exception):
    """Any failure to talk to the store; ``reason`` is one readable line without secrets."""

    def __init__(self, op: str, reason: str) -> None:
        super().__init__(f"etcd {op}: {reason}")
        self.op = op
        self.reason = reason


@dataclass(frozen=True)
class Keys:
    """The key layout under ``{prefix}/{producer}/`` (see DESIGN.md), in one place.

    The fixed keys are computed once per instance: every snapshot matches each key it
    reads against them."""

    prefix: str
    producer: str

    @cached_property
    def root(self) -> str:
        return f"{self.prefix}/{self.producer}/"

    @cached_property
    def election(self) -> str:
        return f"{self.root}election/"

    def candidate(self, lease_id: int) -> str:
        # Same naming as etcd's concurrency.Election, so `etcdctl elect -l` understands it.
        return f"{self.election}{lease_id:x}"

    @cached_property
    def nodes(self) -> str:
        return f"{self.root}nodes/"

    def node(self, name: str) -> str:
        return f"{self.nodes}{name}"

    @cached_property
    def switchover(self) -> str:
        return f"{self.root}switchover"

    @cached_property
    def maintenance(self) -> str:
        return f"{self.root}maintenance"

    @cached_property
    def handovers(self) -> str:
        return f"{self.root}handover/"

    def handover(self, node: str) -> str:
        return f"{self.handovers}{node}"

    @cached_property
    def lasts(self) -> str:
        return f"{self.root}last/"

    def last(self, node: str) -> str:
        """A leader's last record, kept without a lease: it outlives a frozen or killed
        agent, so the next leader knows how far that one may have signed."""
        return f"{self.lasts}{node}"

    @cached_property
    def unfenced(self) -> str:
        return f"{self.root}unfenced/"

    def unfenced_node(self, name: str) -> str:
        return f"{self.unfenced}{name}"

    def urgent(self, key: str) -> bool:
        """Whether a change of ``key`` calls for the agent to read etcd at once: any but
        the node records and last records, which change all the time and are read on the
        resync timer (and on every tick of a node taking over)."""
        return not key.startswith(self.nodes) and not key.startswith(self.lasts)


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int


@dataclass(frozen=True)
class Candidate:
    """One key in the election prefix; the lowest create revision leads."""

    key: str
    node: str
    lease_id: int
    create_revision: int


@dataclass(frozen=True)
class NodeRecord:
    """The status an agent publishes under ``nodes/{node}``; parsed defensively."""

    node: str
    role: str = "unknown"
    in_sync: bool = False
    head_block_num: int = 0
    lag: float | None = None
    paused: bool | None = None
    version: str = ""
    updated: float = 0.0
    # Savanna, with a [finalizer] section: this node's BLS key, the key our producer has
    # active on-chain as this node sees it, and the last block that key was seen voting on.
    finalizer_key: str | None = None
    finalizer_active: str | None = None
    last_vote: int | None = None
    # Seconds from the LIB's timestamp to the head's (Savanna: about 1 s while votes flow).
    lib_lag: float | None = None
    # While it may produce: the wall time its fence pauses nodeos unless the lease is
    # renewed (its lease deadline - fence_guard).
    fence_at: float | None = None
    lease_id: int = 0
    valid: bool = True

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "role": self.role,
            "in_sync": self.in_sync,
            "head_block_num": self.head_block_num,
            "lag": self.lag,
            "paused": self.paused,
            "version": self.version,
            "updated": self.updated,
        }
        if self.lib_lag is not None:
            data["lib_lag"] = self.lib_lag
        if self.fence_at is not None:
            data["fence_at"] = self.fence_at
        if self.finalizer_key is not None:
            data.update(finalizer_key=self.finalizer_key,
                        finalizer_active=self.finalizer_active, last_vote=self.last_vote)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def parse(cls, node: str, raw: bytes, lease_id: int = 0) -> NodeRecord:
        """Never raises: a garbage record is kept, marked invalid, and trusted for nothing."""
        try:
            if len(raw) > MAX_RECORD_BYTES:
                raise ValueError("record too large")
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            lag = data.get("lag")
            paused = data.get("paused")
            return cls(
                node=node,
                role=_typed(data, "role", str, "unknown"),
                in_sync=_typed(data, "in_sync", bool, False),
                head_block_num=max(0, _typed(data, "head_block_num", int, 0)),
                lag=float(lag) if isinstance(lag, int | float) and not isinstance(lag, bool)
                else None,
                paused=paused if isinstance(paused, bool) else None,
                version=_typed(data, "version", str, "")[:64],
                updated=float(_typed(data, "updated", float, 0.0)),
                finalizer_key=_text(data, "finalizer_key"),
                finalizer_active=_text(data, "finalizer_active"),
                last_vote=_typed(data, "last_vote", int, None),
                lib_lag=_typed(data, "lib_lag", float, None),
                fence_at=_typed(data, "fence_at", float, None),
                lease_id=lease_id,
            )
        except (ValueError, TypeError, RecursionError, UnicodeDecodeError):
            return cls(node=node, lease_id=lease_id, valid=False)


def _text(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    return value[:200] if isinstance(value, str) else None


def _typed(data: Mapping[str, Any], name: str, kind: type[T], default: T) -> T:
    value = data.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    if isinstance(value, bool) and kind is not bool:
        return default
    return value if isinstance(value, kind) else default


@dataclass(frozen=True)
class Snapshot:
    """Everything under the producer's prefix, read at one revision."""

    revision: int
    candidates: tuple[Candidate, ...]  # sorted by create revision: [0] leads
    records: Mapping[str, NodeRecord] = field(default_factory=dict)
    switchover: str | None = None  # None: no switchover asked; "": to any node
    maintenance: str | None = None
    # Nodes that gave up their lease without a confirmed pause: they may still produce.
    unfenced: Mapping[str, str] = field(default_factory=dict)
    # Per node, the head it left when it last resigned with nodeos paused: one key per
    # node, so a later resign by another node never hides a higher head.
    handovers: Mapping[str, int] = field(default_factory=dict)
    # Per node, for a handover written by its resign: the create revision of the election
    # key it resigned (its term) and the wall time its last block was out by. A winner
    # whose predecessors all left one for their term needs no blind takeover wait.
    handover_terms: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    # Nodes whose handover head another node left: a bound from that node's view of the
    # chain when the first had vanished, not the head the first read with nodeos paused.
    bounded: frozenset[str] = frozenset()
    # Per node, its record as last published while it could produce (no lease).
    lasts: Mapping[str, NodeRecord] = field(default_factory=dict)
    # Values under the prefix that were ignored, truncated or distrusted, each "key: why";
    # written by someone else (or garbage), counted so that it is seen, never trusted.
    rejected: tuple[str, ...] = ()

    @property
    def leader(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def candidate(self, key: str) -> Candidate | None:
        return next((c for c in self.candidates if c.key == key), None)


@lru_cache(maxsize=256)
def _record(node: str, raw: bytes, lease_id: int = 0) -> NodeRecord:
    """:meth:`NodeRecord.parse`, remembered: most records are read again unchanged (the
    last records, a stopped node's, every record once per agent in the simulation)."""
    return NodeRecord.parse(node, raw, lease_id)


def _shown(keys: Keys, key: str) -> str:
    return key[len(keys.root):][:80]


def parse_snapshot(keys: Keys, revision: int, kvs: list[tuple[str, bytes, int, int]]) -> Snapshot:
    """Build a :class:`Snapshot` from raw (key, value, create_revision, lease) tuples.

    Pure, so the simulated store and fuzz tests share it with production.
    """
    candidates: list[Candidate] = []
    records: dict[str, NodeRecord] = {}
    switchover: str | None = None
    maintenance: str | None = None
    unfenced: dict[str, str] = {}
    handovers: dict[str, int] = {}
    terms: dict[str, tuple[int, float]] = {}
    bounded: set[str] = set()
    lasts: dict[str, NodeRecord] = {}
    rejected: list[str] = []
    for key, value, create_revision, lease_id in kvs:
        text = value[:MAX_RECORD_BYTES].decode("utf-8", "replace")
        if len(value) > MAX_RECORD_BYTES:
            rejected.append(f"{_shown(keys, key)}: value of {len(value)} bytes, "
                            f"over {MAX_RECORD_BYTES}")
        if key.startswith(keys.election):
            # Any key here is a candidate, as for etcd's own Election: a foreign key
            # with the lowest revision blocks everyone, which is the safe outcome.
            candidates.append(Candidate(key, text[:128], lease_id, create_revision))
            if not _NODE_NAME.fullmatch(text):
                rejected.append(f"{_shown(keys, key)}: election key whose value is not a node name")
        elif key.startswith(keys.nodes):
            name = key[len(keys.nodes):]
            records[name] = _record(name, value, lease_id)
            if not records[name].valid:
                rejected.append(f"{_shown(keys, key)}: unreadable node record")
        elif key == keys.switchover:
            switchover = text.strip()[:128]
        elif key == keys.maintenance:
            maintenance = text.strip()[:512] or "on"
        elif key.startswith(keys.lasts):
            name = key[len(keys.lasts):]
            lasts[name] = _record(name, value)
            if not lasts[name].valid:
                rejected.append(f"{_shown(keys, key)}: unreadable last record")
        elif key.startswith(keys.handovers):
            handover = parse_handover(text)
            if handover is None or handover.node != key[len(keys.handovers):]:
                rejected.append(f"{_shown(keys, key)}: unreadable handover record")
            else:
                handovers[handover.node] = handover.head
                if handover.term:
                    terms[handover.node] = (handover.term, handover.stopped)
                if handover.by and handover.by != handover.node:
                    bounded.add(handover.node)
        elif key.startswith(keys.unfenced):
            # Whatever its value, the mark counts: it can only make nodes more careful.
            unfenced[key[len(keys.unfenced):][:128]] = text.strip()[:512] or "unconfirmed"
        else:
            rejected.append(f"{_shown(keys, key)}: unknown key, ignored")
    candidates.sort(key=lambda c: c.create_revision)
    return Snapshot(revision, tuple(candidates), records, switchover, maintenance, unfenced,
                    handovers, terms, frozenset(bounded), lasts, tuple(rejected))


@dataclass(frozen=True)
class Handover:
    """The head a node left with nodeos paused; from a resign, also the term it
    resigned (its key's create revision) and when its last block was out (wall time)."""

    node: str
    head: int
    term: int = 0
    stopped: float = 0.0
    by: str = ""  # the node that wrote it, when another than ``node``


def handover_value(node: str, head: int, term: int = 0, stopped: float = 0.0,
                   by: str = "") -> str:
    data: dict[str, Any] = {"node": node, "head": head}
    if term:
        data.update(term=term, stopped=round(stopped, 3))
    if by and by != node:
        data["by"] = by
    return json.dumps(data)


def parse_handover(text: str) -> Handover | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    node, head = data.get("node"), data.get("head")
    if not isinstance(node, str) or not isinstance(head, int) or isinstance(head, bool) \
            or not 0 < head < 2**32:
        return None
    term, stopped = _typed(data, "term", int, 0), _typed(data, "stopped", float, 0.0)
    if term <= 0 or not math.isfinite(stopped) or stopped <= 0:
        term, stopped = 0, 0.0  # a term without a stop time proves nothing
    return Handover(node[:128], head, term, stopped, (_text(data, "by") or "")[:128])


_NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Store(Protocol):
    """The operations the agent core needs from etcd."""

    keys: Keys

    async def grant(self, ttl: int) -> Lease: ...

    async def keepalive(self, lease_id: int) -> int:
        """Renew; returns the granted TTL, 0 when the lease no longer exists."""
        ...

    async def revoke(self, lease_id: int) -> None: ...

    async def snapshot(self) -> Snapshot:
        """A linearizable read of the whole producer prefix."""
        ...

    def watch(self, on_change: Callable[[], None]) -> None:
        """From now on call ``on_change`` (in the event loop) soon after an urgent key
        under the prefix changes (:meth:`Keys.urgent`). Best effort: a watch can die or
        hang, so the agent also reads on a timer; it is (re)started from the revision of
        the last successful :meth:`snapshot`, so nothing after that read is missed."""
        ...

    async def campaign(self, lease_id: int, node: str) -> Candidate:
        """Create our election key on the lease (or find the one we made before)."""
        ...

    async def confirm_leader(self, me: Candidate, last: NodeRecord | None = None) -> bool:
        """One transaction: our key still exists with its create revision and is the lowest.
        With ``last`` (right before a resume), the same transaction keeps it as our
        ``last`` record without a lease and drops our handover head: from here on we may
        sign, so no node may learn that we did only from a record we failed to write."""
        ...

    async def resign(self, me: Candidate, last_head: int = 0, stopped: float = 0.0) -> None:
        """Delete our election key, only if it is still ours; in the same transaction,
        when ``last_head`` is given, record it as our handover head for the next leader
        (whether or not the key was still there), with our term and ``stopped``, the wall
        time by which our last block was out."""
        ...

    async def publish(self, record: NodeRecord, lease_id: int, keep: bool = False) -> None:
        """Our record, on our lease; with ``keep``, also as our ``last`` record without
        one (in the same transaction)."""
        ...

    async def clear_switchover(self, target: str) -> None:
        """Delete the switchover request, only if it still names ``target``."""
        ...

    async def mark_unfenced(self, node: str, reason: str) -> None:
        """Record, without a lease, that ``node``'s nodeos may still be producing."""
        ...

    async def clear_unfenced(self, node: str) -> None: ...

    async def leave_handover(self, node: str, head: int, by: str = "") -> None:
        """Record, without a lease, the head ``node`` left with nodeos paused, or (``by``
        another node) a bound on the heights it may have signed before it vanished."""
        ...


def endpoint_parts(url: str) -> tuple[str, int, bool]:
    """Split ``https://host:2379`` into host, port and whether it is TLS."""
    parts = urlsplit(url)
    if parts.hostname is None:
        raise ValueError(f"bad etcd endpoint {url!r}")
    return parts.hostname, parts.port or 2379, parts.scheme == "https"


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    timeout: float
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


class EtcdStore:
    """:class:`Store` on etcd v3 through ``pyetcd``, with failover between members.

    ``pyetcd`` is synchronous and marks a member failed only after a call to it failed,
    without retrying that call; so each operation runs in a worker thread with a gRPC
    timeout, and the callers retry on the next tick or keepalive. A failed member is
    tried again after ``retry_member_after`` seconds (pyetcd's own default is 300 s).
    """

    def __init__(self, settings: EtcdSettings, keys: Keys, retry_member_after: float = 2.0):
        self.keys = keys
        self._settings = settings
        self._retry_member_after = retry_member_after
        self._client: Any = None
        # Paced retries after TLS/auth failures (whole client) or a denied op (that op).
        self._backoff = Backoff()
        self._denied: dict[str, Backoff] = {}
        self._last_reason = ""
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="etcd")
        self._renewals: Renewals | None = None
        self._renewals_lock = threading.Lock()
        self._on_change: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: PrefixWatch | None = None

    def _connect(self) -> Any:
        # gRPC's C core prints multi-line TLS diagnostics on stderr; the cause is in our
        # one-line reason instead. GRPC_VERBOSITY=ERROR in the environment brings them back.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        import grpc
        import pyetcd

        s = self._settings
        creds = None
        if s.ca_cert:
            with open(s.ca_cert, "rb") as f:
                ca = f.read()
            key = cert = None
            if s.cert and s.key:
                with open(s.key, "rb") as f:
                    key = f.read()
                with open(s.cert, "rb") as f:
                    cert = f.read()
            creds = grpc.ssl_channel_credentials(ca, key, cert)
        endpoints = []
        for url in s.endpoints:
            host, port, secure = endpoint_parts(url)
            endpoints.append(
                pyetcd.Endpoint(
                    host, port, secure=secure, creds=creds if secure else None,
                    time_retry=self._retry_member_after, opts=_CHANNEL_OPTIONS,
                )
            )
        client = pyetcd.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=s.timeout,
                                                 failover=True)
        for endpoint in endpoints:
            # Connect to every member now, in parallel and without a call's deadline: on
            # a far etcd a first call that must also open its connection takes two round
            # trips and can outlast the timeout, while a warm channel answers in one.
            _Warmup(endpoint.channel)
        if s.username is not None and s.password is not None:
            _log_in(client, s.username, s.password, s.timeout)
        return client

    def _call(self, op: str, fn: Callable[[Any], T], tries: int = 0) -> T:
        """Run ``fn(client)`` on up to ``tries`` members (0: each in turn) and turn every
        failure into a :class:`StoreError`.

        After a TLS, authentication or permission failure the next attempts wait for a
        growing backoff (failing at once with the same reason meanwhile), so a refused
        agent neither floods etcd nor logs more than the cause and the next try.
        """
        now = time.monotonic()
        denied = self._denied.setdefault(op, Backoff())
        for backoff in (self._backoff, denied):
            wait = backoff.held(now)
            if wait > 0:
                raise StoreError(op, f"{backoff.reason} (next try in {wait:.1f} s)")
        try:
            result = self._on_some_member(fn, tries)
        except Exception as exc:
            explained = explain(exc)
            reason = explained.reason
            no_member = "no endpoint available" in reason.lower()  # all failed lately
            if explained.kind is None and no_member and self._last_reason:
                reason = f"no etcd member usable; last error: {self._last_reason}"
            elif "client certificate" in reason:
                s = self._settings
                reason = f"{reason}; {cert_hint(s.cert, s.ca_cert)}"
            if not no_member:
                self._last_reason = reason
            if explained.kind in (TLS, AUTH):
                # A fresh client re-reads the certificate files and logs in again.
                self._drop_client()
                self._backoff.failed(time.monotonic(), reason)
            elif explained.kind == PERMISSION:
                reason = f"{reason}; the agent needs readwrite on prefix {self.keys.root}"
                denied.failed(time.monotonic(), reason)
            elif _needs_reconnect(reason):
                self._drop_client()
            elif no_member:
                self._retry_members()
            raise StoreError(op, reason) from None
        self._backoff.succeeded()
        denied.succeeded()
        self._last_reason = ""
        return result

    def _on_some_member(self, fn: Callable[[Any], T], tries: int = 0) -> T:
        """``fn(client)``, tried on the next member when a member is unreachable or too
        slow (pyetcd marks it failed but does not retry), up to ``tries`` times (0: once per
        member): a one-shot command must not fail because the member it drew is down.
        Every operation of this store is safe to repeat (a create-if-absent, a
        compare-and-put, a keepalive, a read); a grant repeated after a timeout may leave
        an unused lease, which expires after its TTL. Renewals make one try: each is sent
        to every member already when the first is slow (:class:`Renewals`)."""
        tries = tries or len(self._settings.endpoints)
        for attempt in range(tries):
            if self._client is None:
                self._client = self._connect()  # tries each member itself (_log_in)
            try:
                return fn(self._client)
            except Exception as exc:
                status = grpc_status(exc)
                if attempt + 1 >= tries or status is None or status[0] not in _MEMBER_DOWN:
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises

    def _retry_members(self) -> None:
        """Every member failed lately: make them all eligible for the next call again.

        The channels are kept. A new client would throw away connections that may be
        established by now (on a far etcd, opening one is slower than the call timeout,
        so a fresh client each time never gets a call through), and the channels' short
        reconnect backoff (``_CHANNEL_OPTIONS``) already retries a member that went down.
        """
        client = self._client
        if client is not None:
            for endpoint in client.endpoints.values():
                endpoint.last_failed = 0

    def _drop_client(self) -> None:
        self._close_renewals()
        self._close_watch()
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    async def _run(self, op: str, fn: Callable[[Any], T], tries: int = 0) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._call, op, fn, tries)
        try:
            # gRPC enforces the timeout of each try; the outer bound only guards against a
            # stuck thread.
            bound = self._settings.timeout * (len(self._settings.endpoints) + 1) + 1.0
            return await asyncio.wait_for(future, bound)
        except TimeoutError:
            raise StoreError(op, f"no answer within {bound:.2f} s") from None

    async def grant(self, ttl: int) -> Lease:
        lease = await self._run("grant", lambda c: c.lease(ttl))
        return Lease(int(lease.id), int(lease.ttl))

    async def keepalive(self, lease_id: int) -> int:
        def renew(c: Any) -> int:
            try:
                return self._renewals_on(c, lease_id).renew(self._settings.timeout)
            except Exception as exc:
                if callable(getattr(exc, "code", None)):
                    c._manage_grpc_errors(exc)  # marks a member down failed, as for a call
                raise

        # One try: a renewal that got no reply has been sent to every member already.
        return await self._run("keepalive", renew, tries=1)

    def _renewals_on(self, client: Any, lease_id: int) -> Renewals:
        with self._renewals_lock:
            old = self._renewals
            if old is not None and old.client is client and old.lease_id == lease_id:
                return old
            if old is not None:
                old.close()
            self._renewals = Renewals(client, lease_id)
            return self._renewals

    def _close_renewals(self) -> None:
        with self._renewals_lock:
            renewals, self._renewals = self._renewals, None
        if renewals is not None:
            renewals.close()

    async def revoke(self, lease_id: int) -> None:
        self._close_renewals()
        try:
            await self._run("revoke", lambda c: c.revoke_lease(lease_id))
        except StoreError as exc:
            if "lease not found" not in exc.reason:
                raise  # an expired lease is as revoked as it gets

    async def snapshot(self) -> Snapshot:
        def read(c: Any) -> Snapshot:
            resp = c.get_prefix_response(self.keys.root)
            kvs = [(kv.key.decode("utf-8", "replace"), bytes(kv.value), kv.create_revision,
                    kv.lease) for kv in resp.kvs]
            self._rewatch(c, resp.header.revision)
            return parse_snapshot(self.keys, resp.header.revision, kvs)

        return await self._run("snapshot", read)

    def watch(self, on_change: Callable[[], None]) -> None:
        self._on_change, self._loop = on_change, asyncio.get_running_loop()

    def _rewatch(self, client: Any, revision: int) -> None:
        """After a read: a watch from the next revision on, unless a live one already
        runs on the member that served the read (a watch elsewhere may hang unseen)."""
        if self._on_change is None:
            return
        old = self._watch
        if old is not None and old.alive and old.client is client \
                and old.member == client.endpoint_in_use:
            return
        if old is not None:
            old.close()
        try:
            self._watch = PrefixWatch(client, self.keys.root, revision + 1, self._changed)
        except Exception as exc:  # the read worked: the timer covers a missing watch
            self._watch = None
            log.debug("event=watch_failed reason=%r", describe_error(exc))

    def _changed(self, keys: Iterable[bytes]) -> None:
        """In the watch's thread: wake the agent for an urgent change."""
        loop, on_change = self._loop, self._on_change
        if loop is not None and on_change is not None and any(
                self.keys.urgent(k.decode("utf-8", "replace")) for k in keys):
            loop.call_soon_threadsafe(on_change)

    def _close_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    async def campaign(self, lease_id: int, node: str) -> Candidate:
        key = self.keys.candidate(lease_id)

        def create(c: Any) -> Candidate:
            t = c.transactions
            ok, responses = c.transaction(
                compare=[t.create(key) == 0],
                success=[t.put(key, node, lease_id)],
                failure=[t.get(key)],
            )
            if ok:
                revision = responses[0].response_put.header.revision
            else:
                kvs = responses[0]
                if not kvs:
                    raise RuntimeError("election key vanished while campaigning")
                revision = kvs[0][1].create_revision
            return Candidate(key, node, lease_id, int(revision))

        return await self._run("campaign", create)

    async def confirm_leader(self, me: Candidate, last: NodeRecord | None = None) -> bool:
        election = self.keys.election

        def check(c: Any) -> bool:
            t = c.transactions
            keep = [] if last is None else [t.put(self.keys.last(me.node), last.to_json()),
                                            t.delete(self.keys.handover(me.node))]
            ok, responses = c.transaction(
                compare=[t.create(me.key) == me.create_revision],
                success=[t.get(election, prefix_end(election)), *keep],
                failure=[],
            )
            if not ok:
                return False
            revisions = [meta.create_revision for _value, meta in responses[0]]
            return bool(revisions) and min(revisions) == me.create_revision

        return await self._run("confirm_leader", check)

    async def resign(self, me: Candidate, last_head: int = 0, stopped: float = 0.0) -> None:
        value = handover_value(me.node, last_head, me.create_revision, stopped)

        def delete(c: Any) -> None:
            t = c.transactions
            # The head is left even when our key is gone already (expired, revoked).
            handover = [t.put(self.keys.handover(me.node), value)] if last_head > 0 else []
            c.transaction(compare=[t.create(me.key) == me.create_revision],
                          success=[t.delete(me.key), *handover], failure=handover)

        await self._run("resign", delete)

    async def publish(self, record: NodeRecord, lease_id: int, keep: bool = False) -> None:
        value = record.to_json()

        def put(c: Any) -> None:
            if not keep:
                c.put(self.keys.node(record.node), value, lease_id)
                return
            t = c.transactions
            c.transaction(compare=[], success=[t.put(self.keys.node(record.node), value,
                                                     lease_id),
                                               t.put(self.keys.last(record.node), value)],
                          failure=[])

        await self._run("publish", put)

    async def clear_switchover(self, target: str) -> None:
        key = self.keys.switchover

        def delete(c: Any) -> None:
            t = c.transactions
            c.transaction(compare=[t.value(key) == target], success=[t.delete(key)], failure=[])

        await self._run("clear_switchover", delete)

    async def mark_unfenced(self, node: str, reason: str) -> None:
        await self._run("mark_unfenced", lambda c: c.put(self.keys.unfenced_node(node), reason))

    async def clear_unfenced(self, node: str) -> None:
        await self._run("clear_unfenced", lambda c: c.delete(self.keys.unfenced_node(node)))

    async def leave_handover(self, node: str, head: int, by: str = "") -> None:
        value = handover_value(node, head, by=by)
        await self._run("handover", lambda c: c.put(self.keys.handover(node), value))

    # Operator commands (status, switchover, maintenance) share the connection code.

    async def request_switchover(self, target: str, ttl: int) -> None:
        def put(c: Any) -> None:
            lease = c.lease(ttl)
            c.put(self.keys.switchover, target, lease.id)

        await self._run("switchover", put)

    async def set_maintenance(self, reason: str | None) -> None:
        if reason is None:
            await self._run("maintenance", lambda c: c.delete(self.keys.maintenance))
        else:
            await self._run("maintenance", lambda c: c.put(self.keys.maintenance, reason))

    async def lease_remaining(self, lease_id: int) -> int:
        """Seconds etcd still gives a lease (-1 when it is gone); for ``bpleader status``."""
        return await self._run("lease_ttl", lambda c: int(c.get_lease_info(lease_id).TTL))

    def close(self) -> None:
        self._drop_client()
        self._pool.shutdown(wait=False, cancel_futures=True)


def describe_error(exc: BaseException) -> str:
    """One readable line for an etcd failure naming its cause, never a trace.

    See :mod:`bpleader.etcd_errors`: pyetcd hides gRPC's status behind its own
    exceptions, which says nothing about a refused certificate or password.
    """
    return explain(exc).reason


def _log_in(client: Any, user: str, password: str, timeout: float) -> None:
    """Authenticate as pyetcd's client does when given a password, but on each member in
    turn: pyetcd logs in on one member drawn at random and gives up when that one is
    down. The token is the cluster's (etcd replicates it), so any member may issue it."""
    import grpc
    from pyetcd import etcdrpc
    from pyetcd.client import EtcdTokenCallCredentials

    labels = list(client.endpoints)
    first = labels.index(client._current_endpoint_label)
    error: Exception | None = None
    for label in labels[first:] + labels[:first]:
        client._current_endpoint_label = label
        try:
            resp = client.authstub.Authenticate(
                etcdrpc.AuthenticateRequest(name=user, password=password), timeout)
        except grpc.RpcError as exc:
            # Only an unreachable member: a slow answer is etcd checking the password
            # (bcrypt), and asking the next member would only double that work.
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            error = exc
            continue
        client.metadata = (("token", resp.token),)
        client.call_credentials = grpc.metadata_call_credentials(
            EtcdTokenCallCredentials(resp.token))
        return
    assert error is not None
    raise error


#: gRPC codes on which pyetcd marks the member failed: the next try goes to another one.
_MEMBER_DOWN = ("unavailable", "deadline_exceeded")


#: gRPC's reconnect backoff grows to 120 s by default: a member back after a long outage
#: would wait that long to be used again. Capped at a second, a channel comes back within
#: a lease TTL of the member.
#: (Not ``grpc.min_reconnect_backoff_ms``: gRPC takes that as the shortest time a
#: connection attempt may take, and an attempt to a far member would be cut short.)
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)]


class _Warmup:
    """Makes a channel connect now, and stops watching it once it is up or has failed.

    gRPC polls a watched channel's state from a thread of its own, every 0.2 s, for as
    long as anyone is subscribed: kept for good, those pollers cost CPU at rest (the
    chaos benchmark's run with them, on df28d10, read 86 CPU-s/h per host, against 62
    in the run before). A member that fails later is reconnected by gRPC itself when
    the next call needs it.
    """

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        channel.subscribe(self, try_to_connect=True)

    def __call__(self, state: Any) -> None:
        import grpc

        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            self._channel.unsubscribe(self)


def _needs_reconnect(reason: str) -> bool:
    # An auth token dies with an etcd restart: a fresh client logs in again.
    lowered = reason.lower()
    return any(s in lowered for s in ("auth token", "unauthenticated"))
