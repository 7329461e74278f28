"""Lease renewals as messages on kept ``LeaseKeepAlive`` streams, hedged across members.

``pyetcd``'s ``refresh_lease`` opens a new gRPC stream for every renewal and closes it
after the reply: for etcd each renewal is then a whole call (stream set-up, handler,
tear-down), and at the fast profile's 0.3 s that alone was 3.3 calls per second per agent.
etcd's own Go client keeps one stream per client and sends each renewal on it; so does
:class:`RenewalStream`.

A stream answers renewals in order, one reply each (etcd's handler reads a request,
renews, sends the reply, then reads the next). A reply that arrives after its renewal
ended, read as the reply to the *next* renewal, would count that renewal's deadline from
a later send time than etcd's: a lease we believe alive longer than etcd does. So each
stream counts the renewals it has sent and not yet seen answered, and a reply answers a
renewal only when it is the reply to the stream's newest send, made by that renewal;
earlier replies are skipped. A stream with MAX_PENDING renewals unanswered is thrown
away. Keeping a stream whose copy was still unanswered when a renewal ended (instead of
throwing it away, as this module first did) matters when copies go out: each renewal
sent to every member used to close two streams and open two more, a gRPC call and two
threads each, and under load (one host process running 200 agents in the scale run)
that churn fed the very slowness that sends the copies.

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
# A stream holding this many unanswered renewals is closed and replaced by a fresh one.
MAX_PENDING = 2


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
    the stream, to a queue shared by the streams of one :class:`Renewals`.

    ``pending`` and ``renewal`` belong to the thread that renews (sends and reads replies
    off the queue); the reader thread only queues what the stream delivers.
    """

    def __init__(self, client: Any, endpoint: Any, lease_id: int,
                 replies: queue.SimpleQueue[tuple[RenewalStream, object]]) -> None:
        from pyetcd import etcdrpc

        self.endpoint = endpoint
        self.pending = 0  # renewals sent on this stream whose reply has not been read
        self.renewal = 0  # the renewal (Renewals' count) that sent the newest request
        self.closed = False
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

    def send(self, renewal: int) -> None:
        self.pending += 1
        self.renewal = renewal
        self._requests.put(self._request)

    def answers(self, renewal: int) -> bool:
        """Count one reply read off this stream; True when it answers ``renewal``'s own
        send (the stream's newest), False for the reply to an earlier one."""
        self.pending -= 1
        return self.pending == 0 and self.renewal == renewal

    def waits_for(self, renewal: int) -> bool:
        return not self.closed and self.pending > 0 and self.renewal == renewal

    def close(self) -> None:
        self.closed = True
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
        self._renewal = 0  # renewals begun
        self.hedges = 0  # renewals that went to more than one member
        self.late = 0  # replies skipped: each answered a renewal that had already ended

    def renew(self, timeout: float) -> int:
        """Send one renewal and return the TTL etcd granted (0: the lease is gone)."""
        self._renewal += 1
        renewal = self._renewal
        started = time.monotonic()
        deadline = started + timeout
        usual = min(self._answers, default=0.0)
        patience = min(max(HEDGE_FLOOR, HEDGE_USUALS * usual), timeout * HEDGE_LATEST)
        hedge_at = started if self._eager else started + patience
        first = self._first_member()
        waiting = [self._send(first, renewal)]
        others = [e for e in self.client.endpoints.values() if e is not first]
        failure: BaseException | None = None
        try:
            while True:
                now = time.monotonic()
                in_flight = any(s.waits_for(renewal) for s in waiting)
                if others and (now >= hedge_at or not in_flight):
                    self.hedges += 1
                    waiting += [self._send(e, renewal) for e in others]
                    others = []
                    in_flight = True
                if not in_flight:
                    raise failure or RenewalTimeout("every member failed")
                until = hedge_at if others else deadline
                try:
                    stream, reply = self._replies.get(timeout=max(0.0, until - now))
                except queue.Empty:
                    if not others:
                        raise RenewalTimeout(
                            f"no keepalive reply within {timeout:g} s") from None
                    continue
                if stream.closed:
                    continue  # from a stream closed earlier
                if isinstance(reply, BaseException):  # the stream has ended
                    if stream.waits_for(renewal):
                        if stream.endpoint is first:
                            first.fail()  # pyetcd's next calls go to another member
                        failure = reply if stream.endpoint is first else failure or reply
                    self._drop(stream)
                    continue
                if not stream.answers(renewal):
                    self.late += 1
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

    def _first_member(self) -> Any:
        """pyetcd's member for its next call (reading ``channel`` makes it pick: the one in
        use, or the next it has not set aside). When it has set every member aside, the
        one it used last: the renewal goes to the others too if that one is slow."""
        try:
            _ = self.client.channel
        except Exception:  # pyetcd's NoServerAvailableError
            pass
        return self.client.endpoint_in_use

    def _send(self, endpoint: Any, renewal: int) -> RenewalStream:
        with self._lock:
            stream = self._streams.get(id(endpoint))
        if stream is not None and stream.pending >= MAX_PENDING:
            self._drop(stream)  # its member has let renewals go unanswered: start afresh
            stream = None
        if stream is None:
            with self._lock:
                stream = self._streams[id(endpoint)] = RenewalStream(
                    self.client, endpoint, self.lease_id, self._replies)
        stream.send(renewal)
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
