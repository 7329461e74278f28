"""The nodeos client (chain and producer API) and the sync evaluator.

Every failure leaves the client as a :class:`NodeosError` with a one-line reason an
operator can read; nothing else escapes. Calls are bounded: each request has a timeout,
and a ``budget`` bounds a call with its retries, so a caller's deadline is never outlived.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx

EXCERPT = 80


class NodeosError(Exception):
    def __init__(self, call: str, reason: str) -> None:
        super().__init__(f"{call}: {reason}")
        self.call = call
        self.reason = reason


class NodeosTimeout(NodeosError):
    pass


class NodeosUnavailable(NodeosError):
    pass


class NodeosHTTPError(NodeosError):
    def __init__(self, call: str, reason: str, status: int, code: int | None = None,
                 what: str = "") -> None:
        super().__init__(call, reason)
        self.status, self.code, self.what = status, code, what


class NodeosApiMissing(NodeosHTTPError):
    pass


class NodeosBadResponse(NodeosError):
    pass


@dataclass(frozen=True)
class ChainInfo:
    head_block_num: int
    head_block_time: float
    head_block_producer: str
    last_irreversible_block_num: int
    chain_id: str
    server_version_string: str


def parse_block_time(text: str) -> float:
    """nodeos writes UTC without a zone suffix, with or without milliseconds."""
    value = datetime.fromisoformat(text.removesuffix("Z"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _excerpt(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return repr(text[:EXCERPT] + ("…" if len(text) > EXCERPT else ""))


def _json(call: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise NodeosBadResponse(call, f"expected JSON, got {_excerpt(body)}") from None


def parse_response(call: str, status: int, body: bytes) -> Any:
    """Check status and body of one reply; return the decoded JSON or raise NodeosError."""
    if status == 404 and call != "get_info":
        raise NodeosApiMissing(call, "producer API missing (404): is producer_api_plugin "
                               "loaded?", status)
    if not 200 <= status < 300:
        code: int | None = None
        what = ""
        try:
            data = json.loads(body)
            if isinstance(data, dict):
                err = data.get("error")
                what = str(err.get("what", "")) if isinstance(err, dict) else ""
                code = data.get("code") if isinstance(data.get("code"), int) else None
                what = what or str(data.get("message", ""))
        except (ValueError, RecursionError):
            what = _excerpt(body)
        raise NodeosHTTPError(call, f"HTTP {status} from nodeos: {what[:200] or 'no detail'}",
                              status, code, what)
    return _json(call, body)


def parse_info(body: Any) -> ChainInfo:
    call = "get_info"
    if not isinstance(body, dict):
        raise NodeosBadResponse(call, f"expected an object, got {type(body).__name__}")
    try:
        num, lib = body["head_block_num"], body["last_irreversible_block_num"]
        producer, chain_id = body["head_block_producer"], body["chain_id"]
        when = body["head_block_time"]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (num, lib)):
            raise TypeError("block numbers must be integers")
        if not all(isinstance(x, str) for x in (producer, chain_id, when)):
            raise TypeError("producer, chain_id and head_block_time must be strings")
        version = body.get("server_version_string", "")
        return ChainInfo(num, parse_block_time(when), producer, lib, chain_id,
                         version if isinstance(version, str) else "")
    except KeyError as exc:
        raise NodeosBadResponse(call, f"missing field {exc.args[0]}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise NodeosBadResponse(call, f"bad field: {exc}") from None


class NodeosClient:
    """Async client for one nodeos (``http://host:port`` or ``unix:///path``)."""

    def __init__(self, url: str, timeout: float, *,
                 on_request: Callable[[str, float, str | None], None] | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._on_request = on_request
        if url.startswith("unix://"):
            transport = httpx.AsyncHTTPTransport(uds=url[len("unix://"):])
            self._http = httpx.AsyncClient(transport=transport, base_url="http://localhost")
        else:
            self._http = httpx.AsyncClient(base_url=url.rstrip("/"))

    async def __aenter__(self) -> NodeosClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _once(self, call: str, path: str, body: dict[str, Any] | None,
                    timeout: float) -> Any:
        started = time.monotonic()
        kind: str | None = None
        try:
            try:
                resp = await self._http.post(path, json=body, timeout=timeout) if body else \
                    await self._http.post(path, content=b"", timeout=timeout)
            except httpx.TimeoutException:
                raise NodeosTimeout(call, f"timed out after {timeout:.2f} s") from None
            except (httpx.TransportError, OSError) as exc:
                raise NodeosUnavailable(call, f"unreachable: {type(exc).__name__} "
                                        f"{str(exc)[:120]}") from None
            return parse_response(call, resp.status_code, resp.content)
        except NodeosError as exc:
            kind = type(exc).__name__
            raise
        except Exception as exc:
            kind = "NodeosBadResponse"
            raise NodeosBadResponse(call, f"{type(exc).__name__}: {str(exc)[:120]}") from None
        finally:
            if self._on_request is not None:
                self._on_request(call, time.monotonic() - started, kind)

    async def _call(self, call: str, path: str, budget: float | None,
                    body: dict[str, Any] | None = None) -> Any:
        """One attempt, or retries of transient failures that fit inside ``budget``."""
        if budget is None:
            return await self._once(call, path, body, self.timeout)
        deadline = time.monotonic() + budget
        backoff = 0.05
        while True:
            left = deadline - time.monotonic()
            if left <= 0.01:
                raise NodeosTimeout(call, f"budget of {budget:.2f} s exhausted")
            try:
                return await self._once(call, path, body, min(self.timeout, left))
            except (NodeosTimeout, NodeosUnavailable) as exc:
                last: NodeosError = exc
            except NodeosHTTPError as exc:
                if exc.status < 500:
                    raise
                last = exc
            if deadline - time.monotonic() <= backoff + 0.01:
                raise last
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.2)

    async def get_info(self, budget: float | None = None) -> ChainInfo:
        return parse_info(await self._call("get_info", "/v1/chain/get_info", budget))

    async def _ok(self, call: str, path: str, budget: float | None,
                  body: dict[str, Any] | None = None) -> None:
        data = await self._call(call, path, budget, body)
        if not (isinstance(data, dict) and data.get("result") == "ok"):
            raise NodeosBadResponse(call, f"expected {{\"result\":\"ok\"}}, got "
                                    f"{_excerpt(json.dumps(data).encode())}")

    async def pause(self, budget: float | None = None) -> None:
        await self._ok("pause", "/v1/producer/pause", budget)

    async def resume(self, budget: float | None = None) -> None:
        await self._ok("resume", "/v1/producer/resume", budget)

    async def pause_at_block(self, block_num: int, budget: float | None = None) -> None:
        await self._ok("pause_at_block", "/v1/producer/pause_at_block", budget,
                       {"block_num": block_num})

    async def paused(self, budget: float | None = None) -> bool:
        data = await self._call("paused", "/v1/producer/paused", budget)
        if not isinstance(data, bool):
            raise NodeosBadResponse("paused", f"expected true/false, got "
                                    f"{_excerpt(json.dumps(data).encode())}")
        return data


@dataclass(frozen=True)
class SyncState:
    in_sync: bool
    reason: str
    lag: float | None
    head_block_num: int | None
    head_block_producer: str | None


class SyncEvaluator:
    """In sync: get_info answers, right chain, fresh head, and the head advances."""

    def __init__(self, max_head_lag: float, expected_chain_id: str | None = None) -> None:
        self.max_head_lag = max_head_lag
        self.expected_chain_id = expected_chain_id
        self._head: int | None = None
        self._advanced_at = 0.0

    def observe(self, now_wall: float, now_mono: float, info: ChainInfo | None,
                error: NodeosError | None = None) -> SyncState:
        if info is None:
            reason = error.reason if error is not None else "no answer"
            return SyncState(False, f"get_info failing: {reason}", None, None, None)
        lag = now_wall - info.head_block_time
        if self._head is None or info.head_block_num > self._head:
            self._head, self._advanced_at = info.head_block_num, now_mono
        state = (info.head_block_num, info.head_block_producer)
        if self.expected_chain_id and info.chain_id != self.expected_chain_id:
            return SyncState(False, f"chain_id mismatch: expected "
                             f"{self.expected_chain_id[:8]}…, got {info.chain_id[:8]}…",
                             lag, *state)
        if lag > self.max_head_lag:
            return SyncState(False, f"head {lag:.1f} s old (max {self.max_head_lag:.1f} s)",
                             lag, *state)
        stuck = now_mono - self._advanced_at
        if stuck > self.max_head_lag:
            return SyncState(False, f"head stuck at {info.head_block_num} for {stuck:.1f} s",
                             lag, *state)
        return SyncState(True, "", lag, *state)
