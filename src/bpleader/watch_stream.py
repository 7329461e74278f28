"""A watch on the producer's prefix, kept as one ``Watch`` stream of one client.

It only tells the agent *that* etcd changed: the agent then reads the prefix again with a
linearizable read, so a successor learns of a handover within a round trip instead of a
check interval, and no decision rests on what a watch delivered.

``pyetcd``'s own watcher re-establishes nothing after an error and can hang on a dead
member (DESIGN.md's pitfalls). This one starts from the revision after a successful read,
so no change between that read and the watch is missed; when its stream ends it says so
(``alive``), and the store starts a new one after its next read. A stream that hangs
without ending is what the agent's resync timer is for.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

_END = object()  # ends the request iterator, and so the stream


def prefix_end(prefix: str) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's range end)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


class PrefixWatch:
    """Calls ``on_keys`` (from its reader thread) with the keys of each batch of events."""

    def __init__(self, client: Any, prefix: str, start_revision: int,
                 on_keys: Callable[[Iterable[bytes]], None]) -> None:
        from pyetcd import etcdrpc

        self.client = client
        self.member = client.endpoint_in_use  # a read served elsewhere restarts us there
        self.alive = True
        self._on_keys = on_keys
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._requests.put(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_end(prefix), start_revision=start_revision)))
        self._call = etcdrpc.WatchStub(client.channel).Watch(
            iter(self._requests.get, _END), credentials=client.call_credentials,
            metadata=client.metadata)
        self._reader = threading.Thread(target=self._read, name="etcd-watch", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                if reply.canceled or reply.compact_revision:
                    break  # compacted past our start, or refused: read again, then rewatch
                if reply.events:
                    self._on_keys([event.kv.key for event in reply.events])
        except Exception:
            pass  # any gRPC error ends the stream; the next read starts another
        finally:
            self.alive = False

    def close(self) -> None:
        self.alive = False
        self._requests.put(_END)
        self._call.cancel()
