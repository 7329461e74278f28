"""One simulated nodeos: its own HTTP server, the API faults in front of it, its call log.

The faults stand between the client and nodeos's handler, as a hung process, a slow
machine or a misbehaving proxy would: a call answered by a fault (500, garbage, 404) has
no effect, and a call held back (frozen, slow) takes effect when it is finally answered.
A call still held when the node goes down is dropped unanswered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from bpleader.sim import nodeos_api
from bpleader.sim.engine import Engine
from bpleader.sim.httpd import HTTPService, Request, Response

log = logging.getLogger("bpleader.sim.node")

KEEP_CALLS = 100_000


@dataclass(frozen=True)
class ApiCall:
    """A call as it arrived; ``status`` is None while unanswered or when dropped."""

    at: float
    method: str
    path: str
    status: int | None


class _Call:
    __slots__ = ("at", "method", "path", "status")

    def __init__(self, at: float, method: str, path: str) -> None:
        self.at, self.method, self.path = at, method, path
        self.status: int | None = None


class CallLog:
    """The most recent calls, and a count per path kept forever."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: deque[_Call] = deque(maxlen=KEEP_CALLS)
        self.counts: Counter[str] = Counter()

    def begin(self, method: str, path: str) -> _Call:
        call = _Call(time.time(), method, path)
        with self._lock:
            self._calls.append(call)
            self.counts[path] += 1
        return call

    def snapshot(self) -> list[ApiCall]:
        with self._lock:
            return [ApiCall(c.at, c.method, c.path, c.status) for c in self._calls]

    def count(self, path: str) -> int:
        with self._lock:
            return self.counts[path]

    def count_all(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class NodeServer:
    """The HTTP face of node ``name``; the chain state lives in the shared engine."""

    def __init__(self, name: str, engine: Engine, *, host: str = "127.0.0.1", port: int = 0,
                 unix_path: Path | None = None) -> None:
        self.name = name
        self.engine = engine
        self.calls = CallLog()
        self.http = HTTPService(self._handle, host=host, port=port, unix_path=unix_path,
                                on_stop=self._wake)

    @property
    def url(self) -> str:
        return self.http.url

    def start(self) -> None:
        self.http.start()

    def stop(self) -> None:
        self.http.stop()

    def _wake(self) -> None:
        with self.engine.changed:
            self.engine.changed.notify_all()

    def _handle(self, request: Request) -> Response | None:
        call = self.calls.begin(request.method, request.path)
        response = self._answer(request)
        call.status = response.status if response is not None else None
        return response

    def _answer(self, request: Request) -> Response | None:
        engine, name = self.engine, self.name
        with engine.changed:
            engine.changed.wait_for(lambda: request.cancelled.is_set()
                                    or not engine.has_fault(name, "freeze_api"))
            slow = engine.faults(name).get("slow_api")
            if slow is not None:
                engine.changed.wait_for(lambda: request.cancelled.is_set()
                                        or not engine.has_fault(name, "slow_api"),
                                        timeout=slow["seconds"])
            if request.cancelled.is_set() or not engine.is_up(name):
                return None
            faults = engine.faults(name)
            if "http_500" in faults:
                return nodeos_api.server_error("simulated fault http_500")
            if "garbage" in faults:
                return nodeos_api.garbage()
            if "no_producer_api" in faults and request.path.startswith(nodeos_api.PRODUCER_API):
                return nodeos_api.not_found()
            return engine.answer(name, request.path, request.body)
