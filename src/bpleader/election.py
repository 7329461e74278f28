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
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._interval = interval
        self._on_renew = on_renew
        self._describe = describe
        self._on_lost = on_lost
        self.lease: Lease | None = None
        self.deadline: float | None = None
        self.stats = SessionStats()

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
        """Grant, then renew every ``interval``, counted from each attempt's *send*;
        runs until cancelled.

        Counting from the answer instead let a slow answer or a timed-out renewal push
        the next try a whole interval later: at 30 % loss (fast profile: interval 0.3 s,
        call timeout 0.3 s, fence 1.1 s after the last answered send) only two tries fit
        before the fence, and a late answer then a lost renewal paused production with
        etcd still reachable. From the send, a try that took its whole timeout is
        followed by the next at once, and one that failed at once still waits.
        """
        while True:
            sent = self._clock.now()
            await self.step()
            await self._clock.sleep(max(0.0, sent + self._interval - self._clock.now()))

    async def step(self) -> None:
        """One grant or renewal attempt."""
        if self.lease is not None and self.remaining(self._clock.now()) <= 0:
            self._lose("local deadline passed without a renewal")
        if self.lease is None:
            await self._grant()
        else:
            await self._renew(self.lease)

    async def _grant(self) -> None:
        sent = self._clock.now()
        try:
            lease = await self._store.grant(self._ttl)
        except StoreError as exc:
            self.stats.renewal_failures += 1
            log.warning("%s event=lease_grant_failed reason=%r", self._describe(), exc.reason)
            return
        if lease.ttl <= 0:
            self.stats.renewal_failures += 1
            log.warning("%s event=lease_grant_failed reason='granted TTL %d'",
                        self._describe(), lease.ttl)
            return
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
            self.stats.renewal_failures += 1
            log.warning("%s event=keepalive_failed left=%.2fs reason=%r", self._describe(),
                        self.remaining(self._clock.now()), exc.reason)
            return
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
        self._on_lost()  # a leader fences at once, not at its next tick

    def abandon(self) -> Lease | None:
        """Forget the lease without revoking it (shutdown revokes it itself)."""
        lease, self.lease, self.deadline = self.lease, None, None
        return lease
