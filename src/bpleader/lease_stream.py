"""Lease renewals as messages on kept ``LeaseKeepAlive`` streams, hedged across members.

``pyetcd``'s ``refresh_lease`` opens a new gRPC stream for every renewal and closes it
after the reply: for etcd each renewal is then a whole call (stream set-up, handler,
tear-down), and at the fast profile's 0.3 s that alone was 3.3 calls per second per agent.
etcd's own Go client keeps one stream per client and sends each renewal on it; so does
:class:`RenewalStream`.

A stream answers renewals in order, one reply each. A reply that arrives after its renewal
timed out would be read as the reply to the *next* renewal, whose deadline would then be
counted from a later send time than etcd's: a lease we believe alive longer than etcd
does. So there is never more than one renewal in flight on a stream, and a stream whose
renewal went unanswered when the renewal ended is thrown away.

:class:`Renewals` sends each renewal to the member pyetcd uses, and, when no reply has
come soon (see HEDGE_FLOOR), to every other member too; the first reply wins. After a
renewal that needed them, the next ones go to every member at once until the member in
use answers quickly again. On a lossy link a lost TCP segment costs a retransmission
timeout (200 ms at least on Linux), close to the fast profile's whole call timeout:
renewals on one member failed one after another, pyetcd then set each member aside for
two seconds, and at 30 % loss the lease's fences fired though etcd was there all along.
Every member renews the same lease (etcd forwards the renewal to its raft leader), so a
reply from any of them is as good, and a renewal is safe to repeat. At rest the member in
use answers long before the hedge is due, and no extra request is sent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any

_END = object()  # ends a request iterator, and so its stream
# The hedge goes out when the member in use has not answered within HEDGE_USUALS times
# its usual answer time, and no sooner than HEDGE_FLOOR (a far etcd answers slowly every
# time: hedging each renewal would only triple the load), at the latest after
# HEDGE_LATEST of the timeout. Its usual answer time is the quickest of its last USUAL_OF:
# one answer held up by a retransmission must not delay the next hedges. After a renewal
# that needed the other members (or failed), the next EAGER_FOR go to every member at
# once, until the member in use answers quickly again: on a lossy link each copy has the
# whole timeout for a retransmission.
HEDGE_FLOOR = 0.05
HEDGE_USUALS = 4
HEDGE_LATEST = 2 / 3
USUAL_OF = 8
EAGER_FOR = 8


class RenewalTimeout(Exception):
    """No reply within the timeout. Shaped like a gRPC error (``code()``, ``details()``) so
    that pyetcd marks the member failed and our error handling names it as it would a
    unary call's DEADLINE_EXCEEDED."""

    def code(self) -> Any:
        import grpc

        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return str(self)


class RenewalStream:
    """One lease's renewals on one open stream to one member; replies go, tagged with
    the stream, to a queue shared by the streams of one :class:`Renewals`."""

    def __init__(self, client: Any, endpoint: Any, lease_id: int,
                 replies: queue.SimpleQueue[tuple[RenewalStream, object]]) -> None:
        from pyetcd import etcdrpc

        self.endpoint = endpoint
        self.in_flight = False
        self._request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._replies = replies
        # No deadline on the stream itself: it lives across renewals; each renewal has its
        # own timeout in Renewals.renew().
        self._call = etcdrpc.LeaseStub(endpoint.channel).LeaseKeepAlive(
            iter(self._requests.get, _END), credentials=client.call_credentials,
            metadata=client.metadata)
        self._reader = threading.Thread(target=self._read, name="etcd-renewals", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._replies.put((self, reply))
            self._replies.put((self, ConnectionError("etcd closed the keepalive stream")))
        except Exception as exc:  # a gRPC error: handed to the renewal waiting for it
            self._replies.put((self, exc))

    def send(self) -> None:
        self.in_flight = True
        self._requests.put(self._request)

    def close(self) -> None:
        self.in_flight = False
        self._requests.put(_END)
        self._call.cancel()


class Renewals:
    """Renewals of one lease through one pyetcd client, hedged across its members."""

    def __init__(self, client: Any, lease_id: int) -> None:
        self.client, self.lease_id = client, lease_id
        self._streams: dict[int, RenewalStream] = {}  # by id() of the pyetcd endpoint
        self._replies: queue.SimpleQueue[tuple[RenewalStream, object]] = queue.SimpleQueue()
        # How long the member in use took to answer, for its last USUAL_OF renewals.
        self._answers: deque[float] = deque(maxlen=USUAL_OF)
        self._eager = 0  # renewals left to send to every member at once
        self._lock = threading.Lock()
        self.hedges = 0  # renewals that went to more than one member

    def renew(self, timeout: float) -> int:
        """Send one renewal and return the TTL etcd granted (0: the lease is gone)."""
        started = time.monotonic()
        deadline = started + timeout
        usual = min(self._answers, default=0.0)
        patience = min(max(HEDGE_FLOOR, HEDGE_USUALS * usual), timeout * HEDGE_LATEST)
        hedge_at = started if self._eager else started + patience
        first = self._first_member()
        waiting = [self._send(first)]
        others = [e for e in self.client.endpoints.values() if e is not first]
        failure: BaseException | None = None
        try:
            while True:
                now = time.monotonic()
                if others and (now >= hedge_at or not any(s.in_flight for s in waiting)):
                    self.hedges += 1
                    waiting += [self._send(e) for e in others]
                    others = []
                if not any(s.in_flight for s in waiting):
                    raise failure or RenewalTimeout("every member failed")
                until = hedge_at if others else deadline
                try:
                    stream, reply = self._replies.get(timeout=max(0.0, until - now))
                except queue.Empty:
                    if not others:
                        raise RenewalTimeout(
                            f"no keepalive reply within {timeout:g} s") from None
                    continue
                if not stream.in_flight:
                    continue  # from a stream closed earlier
                stream.in_flight = False
                if isinstance(reply, BaseException):
                    if stream.endpoint is first:
                        first.fail()  # pyetcd's next calls go to another member
                    failure = reply if stream.endpoint is first else failure or reply
                    self._drop(stream)
                    continue
                took = time.monotonic() - started
                if stream.endpoint is first:
                    self._answers.append(took)
                quick = stream.endpoint is first and took < patience
                self._eager = max(0, self._eager - 1) if quick else EAGER_FOR
                return int(reply.TTL)  # type: ignore[attr-defined]
        except BaseException:
            self._eager = EAGER_FOR
            raise
        finally:
            for stream in waiting:
                if stream.in_flight:  # its late reply must never answer the next renewal
                    self._drop(stream)

    def _first_member(self) -> Any:
        """pyetcd's member for its next call (reading ``channel`` makes it pick: the one in
        use, or the next it has not set aside). When it has set every member aside, the
        one it used last: the renewal goes to the others too if that one is slow."""
        try:
            _ = self.client.channel
        except Exception:  # pyetcd's NoServerAvailableError
            pass
        return self.client.endpoint_in_use

    def _send(self, endpoint: Any) -> RenewalStream:
        with self._lock:
            stream = self._streams.get(id(endpoint))
            if stream is None:
                stream = self._streams[id(endpoint)] = RenewalStream(
                    self.client, endpoint, self.lease_id, self._replies)
        stream.send()
        return stream

    def _drop(self, stream: RenewalStream) -> None:
        with self._lock:
            if self._streams.get(id(stream.endpoint)) is stream:
                del self._streams[id(stream.endpoint)]
        stream.close()

    def close(self) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.close()
