"""A simulated nodeos per node, and the :class:`bpleader.agent.Nodeos` client for it.

:class:`SimNodeos` models what the agent's safety depends on:

* the pause flag, which takes effect at the next slot start (a block being signed when a
  pause arrives is still finished and broadcast);
* restarts: a restarted nodeos is unpaused unless it runs with ``pause-on-startup``, and
  it produces only once it has caught up (nodeos's stale-production rule);
* a hung nodeos (main thread stuck: no API, no production, no block intake) and a hung API
  alone (production goes on): requests that arrive meanwhile are queued and applied, in
  order, when it recovers, even if the caller gave up on them;
* Spring's implicit pause: ``paused`` reads true and nothing is produced;
* sync: the node's head follows the blocks it receives over p2p; a cut node's head stalls.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, TypeVar

from bpleader.nodeos import ChainInfo, NodeosError, NodeosTimeout, NodeosUnavailable
from bpleader.simworld.chain import SLOT, Block, Peer
from bpleader.simworld.clocks import EPOCH
from bpleader.simworld.etcd import CallHooks
from bpleader.simworld.process import Process
from bpleader.simworld.trace import Trace

T = TypeVar("T")

CHAIN_ID = "aca376f206b8fc25a6ed44dbdc66547c36c6c33e3a119ffbeaef943642f0e906"
VERSION = "v5.0.3-sim"


class SimNodeos(Peer):
    def __init__(self, name: str, producer: str, genesis: Block,
                 loop: asyncio.AbstractEventLoop, rng: random.Random, trace: Trace,
                 paused: bool) -> None:
        super().__init__(name, genesis)
        self.producer = producer
        self.loop = loop
        self.rng = rng
        self.trace = trace
        self.up = True
        self.pause_flag = paused
        self.unpaused_by = "" if paused else "startup"
        self.hung = False  # the whole process is stuck
        self.api_hung = False  # only the HTTP API is stuck; production goes on
        self.implicit = False  # Spring's implicit pause
        self.api_extra = 0.0  # extra API latency bound (a slow nodeos)
        self.production_enabled = True
        self.pending: tuple[int, Block] | None = None  # (slot, parent) being signed
        self._queued: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._last_arrival = 0.0
        self.generation = 0  # bumped by each restart; stale callbacks check it

    # ----------------------------------------------------------------- chain

    def sync_head(self) -> Block:
        if self.up and not self.hung:
            self.take_arrivals(self.loop.time())
            if not self.production_enabled and \
                    self.head.time + SLOT >= EPOCH + self.loop.time():
                self.production_enabled = True
        return self.head

    def producing(self) -> bool:
        """Would sign a block if the current slot were ours."""
        return (self.up and not self.hung and not self.pause_flag and not self.implicit
                and self.production_enabled)

    def info(self) -> ChainInfo:
        head = self.sync_head()
        return ChainInfo(head.num, head.time, head.producer, max(1, head.num - 12),
                         CHAIN_ID, VERSION)

    # ------------------------------------------------------------- API calls

    def do_pause(self, who: str) -> None:
        if not self.pause_flag:
            self.trace.add(self.name, f"nodeos paused by {who}")
        self.pause_flag = True
        self.unpaused_by = ""

    def do_resume(self, who: str) -> None:
        if self.pause_flag:
            self.trace.add(self.name, f"nodeos resumed by {who}")
        self.pause_flag = False
        self.unpaused_by = who

    def do_paused(self) -> bool:
        return self.pause_flag or self.implicit

    def request(self, call: str, apply: Callable[[], T], timeout: float,
                delay: float = 0.0) -> asyncio.Future[T]:
        """One HTTP request; the future fails with a NodeosError as httpx would.

        ``delay`` holds the request back before nodeos serves it (a busy main thread).
        """
        loop = self.loop
        answer: asyncio.Future[T] = loop.create_future()
        now = loop.time()
        if not self.up:
            answer.set_exception(NodeosUnavailable(call, "unreachable: ConnectError "
                                                   "[Errno 111] Connection refused"))
            return answer
        if self.hung or self.api_hung:
            loop.call_at(now + timeout, _time_out, answer, call, timeout)
            self._queued.append((apply, answer))
            return answer
        latency = self.rng.uniform(0.0003, 0.003) + 2 * delay
        if self.api_extra:
            latency += self.rng.uniform(0.0, self.api_extra)
        # Requests are served in order: a pause sent after a resume lands after it.
        arrival = max(now + latency / 2, self._last_arrival)
        self._last_arrival = arrival
        if arrival - now + latency / 2 >= timeout:
            # Slow itself or queued behind a slow one: the client gives up either way.
            loop.call_at(now + timeout, _time_out, answer, call, timeout)
        if arrival - now <= 0.002:
            self._answer(answer, apply, latency / 2)
        else:
            loop.call_at(arrival, self._arrive, answer, apply, latency / 2, self.generation,
                         call, now + timeout)
        return answer

    def _arrive(self, answer: asyncio.Future[T], apply: Callable[[], T], back: float,
                generation: int, call: str, give_up: float) -> None:
        if generation != self.generation:
            _reset(answer)  # nodeos restarted meanwhile: the request died with it
        elif self.hung or self.api_hung:
            self._queued.append((apply, answer))
            if give_up > self.loop.time():  # else the timeout is already scheduled
                self.loop.call_at(give_up, _time_out, answer, call, 0.0)
        else:
            self._answer(answer, apply, back)

    def _answer(self, answer: asyncio.Future[T], apply: Callable[[], T], back: float) -> None:
        value = apply()
        self.loop.call_at(self.loop.time() + back, self._resolve, answer, value,
                          self.generation)

    def _resolve(self, answer: asyncio.Future[T], value: T, generation: int) -> None:
        if generation != self.generation:
            _reset(answer)
        elif not answer.done():
            answer.set_result(value)

    def recover(self) -> None:
        """The hang ends: queued requests are served in their order."""
        queued, self._queued = self._queued, []
        for apply, answer in queued:
            self._answer(answer, apply, self.rng.uniform(0.0002, 0.002))

    def crash(self) -> None:
        self.up = False
        self.generation += 1
        self.pending = None
        self.receiving = self.sending = False
        self.drop_inbox()
        for _apply, answer in self._queued:
            _reset(answer)
        self._queued.clear()
        self.trace.add(self.name, "nodeos down")

    def start(self, pause_on_startup: bool) -> None:
        self.up = True
        self.hung = self.api_hung = self.implicit = False
        self.pause_flag = pause_on_startup
        self.unpaused_by = "" if pause_on_startup else "startup"
        self.production_enabled = False
        self.trace.add(self.name, f"nodeos up ({'paused' if pause_on_startup else 'UNPAUSED'}"
                       f" on startup), head #{self.head.num}")


def _time_out(answer: asyncio.Future[Any], call: str, timeout: float) -> None:
    if not answer.done():
        answer.set_exception(NodeosTimeout(call, "timed out" if not timeout else
                                           f"timed out after {timeout:.2f} s"))


def _reset(answer: asyncio.Future[Any]) -> None:
    if not answer.done():
        answer.set_exception(NodeosUnavailable("request", "connection reset by peer"))


class NodeosClient:
    """The agent's or the guard's client: production's retry rules on virtual time.

    As :class:`bpleader.nodeos.NodeosClient`: a ``budget`` bounds one call with its
    retries of timeouts and refused connections; without a budget, one attempt.
    """

    def __init__(self, nodeos: SimNodeos, timeout: float, process: Process | None,
                 who: str, hooks: CallHooks | None = None) -> None:
        self.nodeos = nodeos
        self.timeout = timeout
        self.process = process
        self.who = who
        self.hooks = hooks

    async def _gate(self) -> None:
        if self.process is not None:
            await self.process.gate()

    async def _call(self, call: str, apply: Callable[[], T], budget: float | None) -> T:
        await self._gate()
        loop = self.nodeos.loop
        delay = 0.0
        if self.hooks is not None and self.process is not None:
            delay = self.hooks.nodeos_delay(self.process, call)
        try:
            if budget is None:
                return await self.nodeos.request(call, apply, self.timeout, delay)
            deadline = loop.time() + budget
            backoff = 0.05
            while True:
                left = deadline - loop.time()
                if left <= 0.01:
                    raise NodeosTimeout(call, f"budget of {budget:.2f} s exhausted")
                try:
                    return await self.nodeos.request(call, apply, min(self.timeout, left),
                                                     delay)
                except (NodeosTimeout, NodeosUnavailable) as exc:
                    last: NodeosError = exc
                delay = 0.0
                if deadline - loop.time() <= backoff + 0.01:
                    raise last
                await asyncio.sleep(backoff)
                await self._gate()
                backoff = min(backoff * 2, 0.2)
        finally:
            await self._gate()

    async def get_info(self, budget: float | None = None) -> ChainInfo:
        return await self._call("get_info", self.nodeos.info, budget)

    async def pause(self, budget: float | None = None) -> None:
        await self._call("pause", lambda: self.nodeos.do_pause(self.who), budget)

    async def resume(self, budget: float | None = None) -> None:
        await self._call("resume", lambda: self.nodeos.do_resume(self.who), budget)

    async def paused(self, budget: float | None = None) -> bool:
        return await self._call("paused", self.nodeos.do_paused, budget)
