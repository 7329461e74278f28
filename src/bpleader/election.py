"""The lease session: one etcd lease kept alive, and the local deadline it guarantees.

Modelled on etcd's ``concurrency.Session``: the agent holds one lease at a time; its
election key and node record hang on it. What the agent may believe about the lease is
derived from the *send* time of the last keepalive that etcd answered, never from the
time the answer came back: etcd cannot expire the lease sooner than ``granted_ttl``
after it received that keepalive, and it received it after we sent it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from bpleader.clock import Clock
from bpleader.store import Lease, Store, StoreError

log = logging.getLogger(__name__)


@dataclass
class SessionStats:
    grants: int = 0
    renewals: int = 0
    renewal_failures: int = 0
    losses: int = 0


#: A failed grant or renewal is tried again after this share of the renewal interval.
#: An etcd raft leader change makes requests fail until a new leader is elected (up to
#: twice etcd's ``--election-timeout``); waiting a whole interval after each failure
#: added up to an interval to every such outage and fenced the fast profile's leader on
#: every raft leader loss. Failures are bounded by the request timeout, and a streak is
#: logged at tries 1, 2, 4, 8, ..., so the faster pace floods neither etcd nor the log.
RETRY_SHARE = 1 / 6


class Session:
    """Keeps one lease alive; replaces it with a fresh one when it is lost.

    A lease is lost when a keepalive answers TTL 0 (etcd's way of saying it expired or was
    revoked: it is not an error) or when the local deadline passes without a successful
    renewal. A lost lease is abandoned, not revoked: if etcd still has it (an etcd leader
    change extends leases), its keys keep blocking other candidates until etcd expires it,
    which is the safe direction.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        ttl: int,
        interval: float,
        on_renew: Callable[[float], None],
        describe: Callable[[], str] = lambda: "",
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._interval = interval
        self._on_renew = on_renew
        self._describe = describe
        self._retry = interval * RETRY_SHARE
        self.lease: Lease | None = None
        self.deadline: float | None = None
        self.stats = SessionStats()
        self._streak = 0  # failed tries in a row
        self._next_log = float("-inf")

    def remaining(self, now: float) -> float:
        """Seconds of lease we can count on; negative or -inf when there is none."""
        if self.lease is None or self.deadline is None:
            return float("-inf")
        return self.deadline - now

    def holds(self, lease_id: int, now: float, margin: float) -> bool:
        """True while ``lease_id`` is our current lease with more than ``margin`` left."""
        return self.lease is not None and self.lease.id == lease_id and \
            self.remaining(now) > margin

    async def run(self) -> None:
        """Grant, then renew every ``interval`` (sooner after a failure); runs until
        cancelled."""
        while True:
            await self.step()
            await self._clock.sleep(self._retry if self._streak else self._interval)

    async def step(self) -> None:
        """One grant or renewal attempt."""
        if self.lease is not None and self.remaining(self._clock.now()) <= 0:
            self._lose("local deadline passed without a renewal")
        if self.lease is None:
            await self._grant()
        else:
            await self._renew(self.lease)

    def _failed(self, event: str, reason: str) -> None:
        self.stats.renewal_failures += 1
        self._streak += 1
        now = self._clock.now()
        # Tries 1, 2, 4, 8, ... of a streak, and at least every 10 s: an outage shows at
        # once and stays visible, a long one does not flood the log at the retry pace.
        if self._streak & (self._streak - 1) == 0 or now >= self._next_log:
            self._next_log = now + 10.0
            log.warning("%s event=%s tries=%d left=%.2fs reason=%r", self._describe(), event,
                        self._streak, self.remaining(now), reason)

    def _succeeded(self) -> None:
        if self._streak > 1:
            log.info("%s event=lease_reachable_again tries=%d", self._describe(), self._streak)
        self._streak = 0

    async def _grant(self) -> None:
        sent = self._clock.now()
        try:
            lease = await self._store.grant(self._ttl)
        except StoreError as exc:
            self._failed("lease_grant_failed", exc.reason)
            return
        if lease.ttl <= 0:
            self._failed("lease_grant_failed", f"granted TTL {lease.ttl}")
            return
        self._succeeded()
        self.lease, self.deadline = lease, sent + lease.ttl
        self.stats.grants += 1
        if lease.ttl != self._ttl:
            log.info("%s event=lease_ttl_adjusted asked=%d granted=%d",
                     self._describe(), self._ttl, lease.ttl)
        log.info("%s event=lease_granted ttl=%d", self._describe(), lease.ttl)

    async def _renew(self, lease: Lease) -> None:
        sent = self._clock.now()
        try:
            ttl = await self._store.keepalive(lease.id)
        except StoreError as exc:
            self._failed("keepalive_failed", exc.reason)
            return
        self._succeeded()
        if self.lease is not lease:
            return  # lost while the call was in flight
        if ttl <= 0:
            self._lose("keepalive answered TTL=0: lease expired or revoked")
            return
        self.deadline = sent + ttl
        self.stats.renewals += 1
        self._on_renew(self.deadline)

    def _lose(self, reason: str) -> None:
        log.warning("%s event=lease_lost reason=%r", self._describe(), reason)
        self.lease, self.deadline = None, None
        self.stats.losses += 1

    def abandon(self) -> Lease | None:
        """Forget the lease without revoking it (shutdown revokes it itself)."""
        lease, self.lease, self.deadline = self.lease, None, None
        return lease
