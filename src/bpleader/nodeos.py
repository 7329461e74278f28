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

from bpleader.http1 import Endpoint, HttpError, Reply

EXCERPT = 80
MAX_REPLY = 8 << 20  # a get_table_rows of finalizer keys is the largest we ask for
IDLE_CONNECTIONS = 4  # kept open for reuse: the tick asks two things at once
PRODUCER_CALLS = frozenset({"pause", "resume", "paused", "pause_at_block"})


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


BLOCK_INTERVAL = 0.5  # seconds per slot on every Antelope chain


@dataclass(frozen=True)
class ChainInfo:
    head_block_num: int
    head_block_time: float
    head_block_producer: str
    last_irreversible_block_num: int
    chain_id: str
    server_version_string: str
    last_irreversible_block_time: float | None = None  # None: not reported (old nodeos)
    head_block_id: str = ""
    last_irreversible_block_id: str = ""


@dataclass(frozen=True)
class TrackedVote:
    """The last vote of one finalizer that nodeos saw in a block's QC."""

    description: str
    public_key: str
    block_num: int
    block_time: str


@dataclass(frozen=True)
class FinalizerInfo:
    """``get_finalizer_info``: the finalizer policies at the node's head, as (description,
    key) pairs; ``active`` is None on a chain that has not moved to Savanna."""

    active: tuple[tuple[str, str], ...] | None
    pending: tuple[tuple[str, str], ...] | None
    votes: tuple[TrackedVote, ...] = ()
    generation: int = 0

    @property
    def savanna(self) -> bool:
        return bool(self.active)

    def active_key(self, producer: str) -> str | None:
        return next((k for d, k in self.active or () if d == producer), None)

    def pending_key(self, producer: str) -> str | None:
        return next((k for d, k in self.pending or () if d == producer), None)

    def last_vote(self, key: str) -> TrackedVote | None:
        return next((v for v in self.votes if v.public_key == key), None)


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
        plugin = "producer_api_plugin" if call in PRODUCER_CALLS else "chain_api_plugin " \
            "(Spring 1.0 or newer)"
        raise NodeosApiMissing(call, f"API missing (404): is {plugin} loaded?", status)
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
        lib_when = body.get("last_irreversible_block_time")
        head_id, lib_id = body.get("head_block_id", ""), body.get("last_irreversible_block_id", "")
        return ChainInfo(num, parse_block_time(when), producer, lib, chain_id,
                         version if isinstance(version, str) else "",
                         parse_block_time(lib_when) if isinstance(lib_when, str) else None,
                         head_id if isinstance(head_id, str) else "",
                         lib_id if isinstance(lib_id, str) else "")
    except KeyError as exc:
        raise NodeosBadResponse(call, f"missing field {exc.args[0]}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise NodeosBadResponse(call, f"bad field: {exc}") from None


def _policy(call: str, value: Any) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("finalizers"), list):
        raise NodeosBadResponse(call, "a finalizer policy must be an object with finalizers")
    out = []
    for f in value["finalizers"]:
        if not isinstance(f, dict) or not isinstance(f.get("description"), str) \
                or not isinstance(f.get("public_key"), str):
            raise NodeosBadResponse(call, "a finalizer needs a description and a public_key")
        out.append((f["description"], f["public_key"]))
    return tuple(out)


def parse_finalizer_info(body: Any) -> FinalizerInfo:
    call = "get_finalizer_info"
    if not isinstance(body, dict):
        raise NodeosBadResponse(call, f"expected an object, got {type(body).__name__}")
    active = body.get("active_finalizer_policy")
    votes = []
    for v in body.get("last_tracked_votes") or ():
        if isinstance(v, dict) and isinstance(v.get("public_key"), str):
            num = v.get("voted_for_block_num")
            votes.append(TrackedVote(str(v.get("description", "")), v["public_key"],
                                     num if isinstance(num, int) else 0,
                                     str(v.get("voted_for_block_timestamp", ""))))
    generation = active.get("generation", 0) if isinstance(active, dict) else 0
    return FinalizerInfo(_policy(call, active), _policy(call, body.get(
        "pending_finalizer_policy")), tuple(votes),
        generation if isinstance(generation, int) else 0)


class TransactionRefused(NodeosError):
    """nodeos refused a transaction; ``name`` and ``code`` as in Spring's exceptions."""

    def __init__(self, reason: str, name: str = "", code: int | None = None) -> None:
        super().__init__("send_transaction2", reason)
        self.name, self.code = name, code


def parse_transaction_reply(status: int, body: bytes) -> str:
    """The transaction id of an accepted ``send_transaction2``; TransactionRefused with
    the chain's own words otherwise (a 202 may still carry a failure trace)."""
    call = "send_transaction2"
    try:
        data = parse_response(call, status, body)
    except NodeosHTTPError as exc:
        detail = _first_detail(body)
        raise TransactionRefused(f"{exc.what or exc.reason}{': ' + detail if detail else ''}",
                                 _error_name(body), exc.code) from None
    if not isinstance(data, dict) or not isinstance(data.get("transaction_id"), str):
        raise NodeosBadResponse(call, f"expected a transaction id, got {_excerpt(body)}")
    processed = data.get("processed")
    failure = processed.get("except") if isinstance(processed, dict) else None
    if isinstance(failure, dict):
        stack = failure.get("stack")
        detail = stack[0].get("format", "") if isinstance(stack, list) and stack and \
            isinstance(stack[0], dict) else ""
        code = failure.get("code")
        raise TransactionRefused(f"{failure.get('message', 'failed')}: {detail}"[:300],
                                 str(failure.get("name", "")),
                                 code if isinstance(code, int) else None)
    return str(data["transaction_id"])


def _error_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    err = data.get("error") if isinstance(data, dict) else None
    return err if isinstance(err, dict) else {}


def _error_name(body: bytes) -> str:
    return str(_error_json(body).get("name", ""))


def _first_detail(body: bytes) -> str:
    details = _error_json(body).get("details")
    if isinstance(details, list) and details and isinstance(details[0], dict):
        return str(details[0].get("message", ""))[:240]
    return ""


class Connections:
    """Keep-alive HTTP/1.1 connections to one nodeos, on asyncio streams.

    A connection is used by one request at a time and kept for the next one; any failure
    closes it. A kept connection the server has closed since fails at once with nothing
    read: that request is sent again on a new connection, within the same timeout.
    """

    def __init__(self, url: str) -> None:
        self.endpoint = Endpoint.from_url(url)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            while self._idle:
                try:
                    return await self._exchange(self._idle.pop(), path, body)
                except _Stale:
                    continue
            return await self._exchange(await self._open(), path, body)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        end = self.endpoint
        if end.unix_path is not None:
            return await asyncio.open_unix_connection(end.unix_path)
        if end.https:
            import ssl

            return await asyncio.open_connection(end.host, end.port,
                                                 ssl=ssl.create_default_context())
        return await asyncio.open_connection(end.host, end.port)

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        path: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = conn
        reply = Reply(MAX_REPLY)
        got = False
        try:
            writer.write(self.endpoint.request(path, body))
            while not reply.done:
                data = await reader.read(65536)
                if not data:
                    if not got:
                        raise _Stale
                    reply.eof()
                else:
                    got = True
                    reply.feed(data)
        except BaseException:
            writer.close()
            raise
        if reply.keep_alive and len(self._idle) < IDLE_CONNECTIONS:
            self._idle.append(conn)
        else:
            writer.close()
        return reply.status, reply.body

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _reader, writer in idle:
            writer.close()


class _Stale(ConnectionError):
    """A kept connection was closed by nodeos before our request."""


class NodeosClient:
    """Async client for one nodeos (``http://host:port`` or ``unix:///path``)."""

    def __init__(self, url: str, timeout: float, *,
                 on_request: Callable[[str, float, str | None], None] | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._on_request = on_request
        self._http = Connections(url)

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
            status, content = await self._post(call, path, body, timeout)
            return parse_response(call, status, content)
        except NodeosError as exc:
            kind = type(exc).__name__
            raise
        except Exception as exc:
            kind = "NodeosBadResponse"
            raise NodeosBadResponse(call, f"{type(exc).__name__}: {str(exc)[:120]}") from None
        finally:
            if self._on_request is not None:
                self._on_request(call, time.monotonic() - started, kind)

    async def _post(self, call: str, path: str, body: dict[str, Any] | None,
                    timeout: float) -> tuple[int, bytes]:
        try:
            return await self._http.post(path, json.dumps(body).encode() if body else b"",
                                         timeout)
        except TimeoutError:
            raise NodeosTimeout(call, f"timed out after {timeout:.2f} s") from None
        except OSError as exc:
            raise NodeosUnavailable(call, f"unreachable: {type(exc).__name__} "
                                    f"{str(exc)[:120]}") from None
        except HttpError as exc:
            raise NodeosBadResponse(call, str(exc)) from None

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

    async def finalizer_info(self, budget: float | None = None) -> FinalizerInfo:
        return parse_finalizer_info(await self._call(
            "get_finalizer_info", "/v1/chain/get_finalizer_info", budget))

    async def producer_schedule(self, budget: float | None = None) -> list[str]:
        """The active schedule's producer names, in the order they take their rounds."""
        data = await self._call("get_producer_schedule", "/v1/chain/get_producer_schedule",
                                budget)
        active = data.get("active") if isinstance(data, dict) else None
        producers = active.get("producers") if isinstance(active, dict) else None
        if not isinstance(producers, list) or not producers:
            raise NodeosBadResponse("get_producer_schedule", "expected active.producers")
        names = [p.get("producer_name") if isinstance(p, dict) else None for p in producers]
        if not all(isinstance(n, str) and n for n in names):
            raise NodeosBadResponse("get_producer_schedule", "a producer without a name")
        return [str(n) for n in names]

    async def table_rows(self, table: str, budget: float | None = None) -> list[Any]:
        """Rows of an ``eosio`` table (scope ``eosio``): finkeys, finalizers."""
        data = await self._call("get_table_rows", "/v1/chain/get_table_rows", budget,
                                {"code": "eosio", "scope": "eosio", "table": table,
                                 "json": True, "limit": 1000})
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise NodeosBadResponse("get_table_rows", "expected rows")
        return rows

    async def account(self, name: str, budget: float | None = None) -> dict[str, Any]:
        data = await self._call("get_account", "/v1/chain/get_account", budget,
                                {"account_name": name})
        if not isinstance(data, dict):
            raise NodeosBadResponse("get_account", "expected an object")
        return data

    async def send_transaction(self, packed: dict[str, Any], timeout: float) -> str:
        """``send_transaction2`` once (never retried here: a resend is the caller's call)."""
        status, content = await self._post(
            "send_transaction2", "/v1/chain/send_transaction2",
            {"return_failure_trace": True, "retry_trx": False, "transaction": packed}, timeout)
        return parse_transaction_reply(status, content)

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


@dataclass(frozen=True)
class FinalityRule:
    """Savanna's evidence of sync: the last irreversible block follows the head closely
    while votes flow, and stops at once on a node cut from the network (its own blocks
    keep its head fresh, but no votes reach it). Both bounds are measured from the head,
    whose own freshness ``max_head_lag`` checks: when no one produces, the head and the
    LIB stop together, and that is a stale head, not missing votes."""

    max_lib_lag: int  # blocks between head and LIB
    max_lib_age: float  # seconds between the head's and the LIB's timestamps


class SyncEvaluator:
    """In sync: get_info answers, right chain, fresh head, the head advances and, on a
    Savanna chain (``savanna`` set), a close and fresh last irreversible block."""

    def __init__(self, max_head_lag: float, expected_chain_id: str | None = None,
                 finality: FinalityRule | None = None) -> None:
        self.max_head_lag = max_head_lag
        self.expected_chain_id = expected_chain_id
        self.finality = finality
        self.savanna = False
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
        why = self.finality_problem(now_wall, info)
        if why:
            return SyncState(False, why, lag, *state)
        return SyncState(True, "", lag, *state)

    def finality_problem(self, now_wall: float, info: ChainInfo) -> str:
        """Why the chain's finality says this node is not in sync (empty: it is fine)."""
        rule = self.finality
        if rule is None or not self.savanna:
            return ""
        behind = info.head_block_num - info.last_irreversible_block_num
        if behind > rule.max_lib_lag:
            return (f"last irreversible block {behind} blocks behind head (max "
                    f"{rule.max_lib_lag}): votes do not reach this node")
        lib_time = info.last_irreversible_block_time
        if lib_time is not None and info.head_block_time - lib_time > rule.max_lib_age:
            return (f"last irreversible block {info.head_block_time - lib_time:.1f} s older "
                    f"than the head (max {rule.max_lib_age:g} s): blocks are not being "
                    "finalized")
        return ""
