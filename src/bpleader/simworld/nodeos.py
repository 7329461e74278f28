"""A simulated nodeos per node, and the :class:`bpleader.agent.Nodeos` client for it.

The chain (blocks, votes, finality, the pause flag, the implicit pause) is the shared
:class:`bpleader.sim.model.ChainModel`; :class:`SimNodeos` adds what only the API of one
process shows on virtual time:

* a hung nodeos (main thread stuck: no API, no production, no block intake) and a hung API
  alone (production goes on): requests that arrive meanwhile are queued and applied, in
  order, when it recovers, even if the caller gave up on them;
* latency, a slow API, and requests dying with a restart;
* who unpaused it last (the world's lock check asks).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any, TypeVar

from bpleader.nodeos import (
    ChainInfo,
    FinalizerInfo,
    NodeosError,
    NodeosTimeout,
    NodeosUnavailable,
    parse_finalizer_info,
    parse_response,
    parse_transaction_reply,
)
from bpleader.sim.model import ChainModel
from bpleader.sim.nodeos_api import GET_ACCOUNT, GET_TABLE_ROWS, SEND_TRANSACTION2, NodeosApi
from bpleader.simworld.clocks import EPOCH
from bpleader.simworld.etcd import CallHooks
from bpleader.simworld.process import Process
from bpleader.simworld.trace import Trace

T = TypeVar("T")

CHAIN_ID = "aca376f206b8fc25a6ed44dbdc66547c36c6c33e3a119ffbeaef943642f0e906"
VERSION = "v1.2.2-sim"


class SimNodeos:
    def __init__(self, name: str, model: ChainModel, api: NodeosApi,
                 loop: asyncio.AbstractEventLoop, rng: random.Random, trace: Trace) -> None:
        self.name = name
        self.model = model
        self.api = api
        self.node = model.node(name)
        self.loop = loop
        self.rng = rng
        self.trace = trace
        self.unpaused_by = "" if self.node.paused else "startup"
        self.api_hung = False  # only the HTTP API is stuck; production goes on
        self.api_extra = 0.0  # extra API latency bound (a slow nodeos)
        self._queued: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._last_arrival = 0.0
        self.resumed_at = -1e9  # virtual time of the last resume that reached it

    # ----------------------------------------------------------------- chain

    def now(self) -> float:
        """The chain's wall clock (true time)."""
        return EPOCH + self.loop.time()

    @property
    def up(self) -> bool:
        return self.node.up

    @property
    def hung(self) -> bool:
        return self.node.hung

    @hung.setter
    def hung(self, value: bool) -> None:
        self.model.set_hung(self.name, value, self.now())

    @property
    def pause_flag(self) -> bool:
        return self.node.paused

    @property
    def implicit(self) -> bool:
        return self.node.forced_pause

    @implicit.setter
    def implicit(self, value: bool) -> None:
        self.node.forced_pause = value

    def producing(self) -> bool:
        """Would sign a block if the current slot were ours."""
        return self.model.producing(self.node, self.now())

    def head_time(self) -> float:
        self.model.advance(self.now())
        return self.node.head.timestamp_ms / 1000

    def info(self) -> ChainInfo:
        view = self.model.view(self.name, self.now())
        head, lib = view.head, view.lib
        return ChainInfo(head.height, head.timestamp_ms / 1000, head.producer, lib.height,
                         CHAIN_ID, VERSION, lib.timestamp_ms / 1000, head.block_id,
                         lib.block_id)

    # ------------------------------------------------------------- API calls

    def do_pause(self, who: str) -> None:
        if not self.node.paused:
            self.trace.add(self.name, f"nodeos paused by {who}")
        self.model.pause(self.name)
        self.unpaused_by = ""

    def do_resume(self, who: str) -> None:
        if self.node.paused:
            self.trace.add(self.name, f"nodeos resumed by {who}")
        self.model.resume(self.name, self.now())
        self.unpaused_by = who
        self.resumed_at = self.loop.time()

    def do_paused(self) -> bool:
        return self.model.is_paused(self.name, self.now())

    def do_finalizer_info(self) -> FinalizerInfo:
        return parse_finalizer_info(self.api.finalizer_info(self.name, self.now()))

    def do_json(self, call: str, path: str, body: dict[str, Any]) -> Any:
        """A rare call answered as nodeos would over HTTP, through production's parser."""
        reply = self.api.answer(self.name, path, json.dumps(body).encode(), self.now())
        return parse_response(call, reply.status, reply.body)

    def do_transaction(self, packed: dict[str, Any]) -> str:
        body = {"return_failure_trace": True, "retry_trx": False, "transaction": packed}
        reply = self.api.answer(self.name, SEND_TRANSACTION2, json.dumps(body).encode(),
                                self.now())
        tx_id = parse_transaction_reply(reply.status, reply.body)
        self.trace.add(self.name, f"nodeos accepted transaction {tx_id[:12]}")
        return tx_id

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
            loop.call_at(arrival, self._arrive, answer, apply, latency / 2,
                         self.node.generation, call, now + timeout)
        return answer

    def _arrive(self, answer: asyncio.Future[T], apply: Callable[[], T], back: float,
                generation: int, call: str, give_up: float) -> None:
        if generation != self.node.generation:
            _reset(answer)  # nodeos restarted meanwhile: the request died with it
        elif self.hung or self.api_hung:
            self._queued.append((apply, answer))
            if give_up > self.loop.time():  # else the timeout is already scheduled
                self.loop.call_at(give_up, _time_out, answer, call, 0.0)
        else:
            self._answer(answer, apply, back)

    def _answer(self, answer: asyncio.Future[T], apply: Callable[[], T], back: float) -> None:
        try:
            value: Any = apply()
        except NodeosError as exc:
            value = exc
        self.loop.call_at(self.loop.time() + back, self._resolve, answer, value,
                          self.node.generation)

    def _resolve(self, answer: asyncio.Future[T], value: Any, generation: int) -> None:
        if generation != self.node.generation:
            _reset(answer)
        elif not answer.done():
            if isinstance(value, NodeosError):
                answer.set_exception(value)
            else:
                answer.set_result(value)

    def recover(self) -> None:
        """The hang ends: queued requests are served in their order."""
        queued, self._queued = self._queued, []
        for apply, answer in queued:
            self._answer(answer, apply, self.rng.uniform(0.0002, 0.002))

    def crash(self) -> None:
        self.model.crash(self.name)
        for _apply, answer in self._queued:
            _reset(answer)
        self._queued.clear()
        self.api_hung = False
        self.trace.add(self.name, "nodeos down")

    def start(self, pause_on_startup: bool, catch_up: float) -> None:
        self.model.start(self.name, self.now(), catch_up, paused=pause_on_startup)
        self.api_hung = False
        self.unpaused_by = "" if pause_on_startup else "startup"
        self.trace.add(self.name, f"nodeos up ({'paused' if pause_on_startup else 'UNPAUSED'}"
                       f" on startup), head #{self.node.head.height}")


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

    async def finalizer_info(self, budget: float | None = None) -> FinalizerInfo:
        return await self._call("get_finalizer_info", self.nodeos.do_finalizer_info, budget)

    async def table_rows(self, table: str, budget: float | None = None) -> list[Any]:
        body = {"code": "eosio", "scope": "eosio", "table": table, "json": True,
                "limit": 1000}
        data = await self._call("get_table_rows", lambda: self.nodeos.do_json(
            "get_table_rows", GET_TABLE_ROWS, body), budget)
        return list(data["rows"])

    async def account(self, name: str, budget: float | None = None) -> dict[str, Any]:
        data = await self._call("get_account", lambda: self.nodeos.do_json(
            "get_account", GET_ACCOUNT, {"account_name": name}), budget)
        return dict(data)

    async def send_transaction(self, packed: dict[str, Any], timeout: float) -> str:
        return await self._call("send_transaction2",
                                lambda: self.nodeos.do_transaction(packed), None)
