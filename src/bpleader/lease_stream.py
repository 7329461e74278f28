"""Lease renewals as messages on one kept ``LeaseKeepAlive`` stream.

``pyetcd``'s ``refresh_lease`` opens a new gRPC stream for every renewal and closes it
after the reply: for etcd each renewal is then a whole call (stream set-up, handler,
tear-down), and at the fast profile's 0.3 s that alone was 3.3 calls per second per agent.
etcd's own Go client keeps one stream per client and sends each renewal on it; so does
:class:`RenewalStream`.

A stream answers renewals in order, one reply each. A reply that arrives after its renewal
timed out would be read as the reply to the *next* renewal, whose deadline would then be
counted from a later send time than etcd's: a lease we believe alive longer than etcd
does. So there is never more than one renewal in flight, and on any timeout or error the
stream is thrown away; the next renewal opens a new one (on the next member when pyetcd
has marked this one failed).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

_END = object()  # ends the request iterator, and so the stream


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
    """One lease's renewals on one open stream of one client."""

    def __init__(self, client: Any, lease_id: int) -> None:
        from pyetcd import etcdrpc

        self.client, self.lease_id = client, lease_id
        self._request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[object] = queue.SimpleQueue()
        # No deadline on the stream itself: it lives across renewals; each renewal has its
        # own timeout in renew().
        self._call = client.leasestub.LeaseKeepAlive(
            iter(self._requests.get, _END), credentials=client.call_credentials,
            metadata=client.metadata)
        self.member = client.endpoint_in_use  # the stream follows pyetcd's failover
        self._reader = threading.Thread(target=self._read, name="etcd-renewals", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._replies.put(reply)
            self._replies.put(ConnectionError("etcd closed the keepalive stream"))
        except Exception as exc:  # a gRPC error: handed to the renewal waiting for it
            self._replies.put(exc)

    def renew(self, timeout: float) -> int:
        """Send one renewal and return the TTL etcd granted (0: the lease is gone)."""
        self._requests.put(self._request)
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise RenewalTimeout(f"no keepalive reply within {timeout:g} s") from None
        if isinstance(reply, BaseException):
            raise reply
        return int(reply.TTL)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()
