"""nodeos's HTTP API over the chain model: routes, bodies, status codes and error shapes.

The shapes follow Spring 1.x (Leap 5 for a legacy chain): routing is by path only (any
method), a parameterless call takes an empty body or ``{}``, the producer API answers 201,
and every error has the body ``{"code", "message", "error": {"code", "name", "what",
"details": [...]}}``. :class:`NodeosApi` is pure (no lock, no clock): the HTTP simulator
calls it under its engine's lock, the deterministic simulation directly, so both speak
the same API. The Savanna calls: ``get_finalizer_info``, ``get_table_rows`` of ``eosio``'s
``finkeys`` and ``finalizers``, ``get_account`` (with ``linked_actions``) and
``send_transaction2`` / ``send_transaction`` / ``push_transaction`` of ``actfinkey``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from bpleader.antelope import SignedTransaction, TransactionError, decode_transaction
from bpleader.sim.chain import format_block_time
from bpleader.sim.httpd import Response
from bpleader.sim.model import ChainModel
from bpleader.sim.system import ChainError, SystemContract

GET_INFO = "/v1/chain/get_info"
GET_FINALIZER_INFO = "/v1/chain/get_finalizer_info"
GET_TABLE_ROWS = "/v1/chain/get_table_rows"
GET_ACCOUNT = "/v1/chain/get_account"
GET_PRODUCER_SCHEDULE = "/v1/chain/get_producer_schedule"
PUSH_TRANSACTION = "/v1/chain/push_transaction"
SEND_TRANSACTION = "/v1/chain/send_transaction"
SEND_TRANSACTION2 = "/v1/chain/send_transaction2"
PAUSE = "/v1/producer/pause"
RESUME = "/v1/producer/resume"
PAUSED = "/v1/producer/paused"
PAUSE_AT_BLOCK = "/v1/producer/pause_at_block"
PRODUCER_API = "/v1/producer/"
TRANSACTIONS = (PUSH_TRANSACTION, SEND_TRANSACTION, SEND_TRANSACTION2)
NO_PARAMS = (GET_INFO, GET_FINALIZER_INFO, GET_PRODUCER_SCHEDULE, PAUSE, RESUME, PAUSED)

# A proxy in front of a dead nodeos answers like this: 200 would be odd but happens.
GARBAGE_PAGE = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
                b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
                b"</body>\r\n</html>\r\n")


@dataclass(frozen=True)
class Identity:
    """What get_info says about the software and the chain, beyond the blocks."""

    chain_id: str
    version: str = "v1.2.2"

    @property
    def full_version(self) -> str:
        return f"{self.version}-{hashlib.sha1(self.version.encode()).hexdigest()}"

    @property
    def server_version(self) -> str:
        return self.full_version.rsplit("-", 1)[1][:8]


def _json(status: int, value: Any) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode())


def _detail(message: str, file: str, line: int, method: str) -> dict[str, Any]:
    return {"message": message, "file": file, "line_number": line, "method": method}


def nodeos_error(status: int, message: str, code: int, name: str, what: str,
                 details: list[dict[str, Any]]) -> Response:
    return _json(status, {"code": status, "message": message,
                          "error": {"code": code, "name": name, "what": what,
                                    "details": details}})


def not_found() -> Response:
    return nodeos_error(404, "Not Found", 0, "exception", "unspecified",
                        [_detail("Unknown Endpoint", "beast_http_session.hpp", 186,
                                 "handle_request")])


def _invalid_request(*details: dict[str, Any]) -> Response:
    return nodeos_error(400, "Invalid Request", 3200006, "invalid_http_request",
                        "invalid http request", list(details))


_UNPARSABLE = _detail("Unable to parse valid input from POST body", "http_plugin.hpp", 270,
                      "parse_params")


def server_error(message: str) -> Response:
    """A 500 as nodeos sends when a call fails inside the chain."""
    return nodeos_error(500, "Internal Service Error", 3000000, "chain_exception",
                        "blockchain exception", [_detail(message, "controller.cpp", 0, "")])


def chain_error(err: ChainError) -> Response:
    return nodeos_error(500, "Internal Service Error", err.code, err.name, err.what,
                        [_detail(err.message, err.file, 0, "")])


def garbage() -> Response:
    return Response(200, GARBAGE_PAGE, "text/html")


def _no_params(body: bytes) -> Response | None:
    """None when the body is empty or ``{}``; nodeos's 400 otherwise."""
    text = body.strip()
    if not text:
        return None
    try:
        if json.loads(text) == {}:
            return None
    except ValueError:
        pass
    return _invalid_request(_UNPARSABLE, _detail("no parameter should be given",
                                                 "http_plugin.hpp", 263, "parse_params"))


def _params(body: bytes) -> dict[str, Any] | Response:
    text = body.strip()
    try:
        value = json.loads(text) if text else {}
    except ValueError as exc:
        return _invalid_request(_UNPARSABLE, _detail(str(exc), "json.cpp", 0, "from_string"))
    if not isinstance(value, dict):
        kind = type(value).__name__
        return _invalid_request(_UNPARSABLE, _detail(
            f"Invalid cast from type '{kind}' to Object", "variant.cpp", 630, "get_object"))
    if not value:
        return _invalid_request(_detail("A Request body is required", "http_plugin.hpp", 249,
                                        "parse_params"))
    return value


def _block_num(params: dict[str, Any]) -> int | Response:
    """fc reads a missing field as 0 and a numeric string as a number."""
    raw = params.get("block_num", 0)
    if isinstance(raw, str) and raw.isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 2**32:
        return _invalid_request(_UNPARSABLE, _detail(
            f"Invalid block_num {raw!r}: expected an unsigned 32-bit integer", "variant.cpp",
            0, "as_uint64"))
    return raw


class NodeosApi:
    """The answers of a healthy nodeos of the model; faults stand in front of it."""

    def __init__(self, model: ChainModel, contract: SystemContract | None,
                 identity: Identity) -> None:
        self.model = model
        self.contract = contract
        self.identity = identity

    def answer(self, node: str, path: str, body: bytes, now: float) -> Response:
        if path == PAUSE_AT_BLOCK:
            return self._pause_at_block(node, body, now)
        if path in TRANSACTIONS:
            return self._transaction(node, path, body, now)
        if path in (GET_TABLE_ROWS, GET_ACCOUNT):
            params = _params(body)
            if isinstance(params, Response):
                return params
            return self._table_rows(params) if path == GET_TABLE_ROWS else \
                self._account(params)
        if path not in NO_PARAMS:
            return not_found()
        refused = _no_params(body)
        if refused is not None:
            return refused
        if path == GET_INFO:
            return _json(200, self.get_info(node, now))
        if path == GET_FINALIZER_INFO:
            return _json(200, self.finalizer_info(node, now))
        if path == GET_PRODUCER_SCHEDULE:
            return _json(200, self.producer_schedule())
        if path == PAUSE:
            self.model.pause(node)
            return _json(201, {"result": "ok"})
        if path == RESUME:
            self.model.resume(node, now)
            return _json(201, {"result": "ok"})
        return _json(201, self.model.is_paused(node, now))

    # ------------------------------------------------------------------ chain reads

    def get_info(self, node: str, now: float) -> dict[str, Any]:
        view = self.model.view(node, now)
        head, lib = view.head, view.lib
        return {
            "server_version": self.identity.server_version,
            "chain_id": self.identity.chain_id,
            "head_block_num": head.height,
            "last_irreversible_block_num": lib.height,
            "last_irreversible_block_id": lib.block_id,
            "head_block_id": head.block_id,
            "head_block_time": format_block_time(head.timestamp_ms),
            "head_block_producer": head.producer,
            "virtual_block_cpu_limit": 200000000,
            "virtual_block_net_limit": 1048576000,
            "block_cpu_limit": 200000,
            "block_net_limit": 1048576,
            "server_version_string": self.identity.version,
            "fork_db_head_block_num": head.height,
            "fork_db_head_block_id": head.block_id,
            "server_full_version_string": self.identity.full_version,
            # int64 values above 2^32 come as strings from nodeos.
            "total_cpu_weight": "382307936245",
            "total_net_weight": "95569735985",
            "earliest_available_block_num": view.earliest_available_block_num,
            "last_irreversible_block_time": format_block_time(lib.timestamp_ms),
        }

    def finalizer_info(self, node: str, now: float) -> dict[str, Any]:
        """Spring's get_finalizer_info: the node's head's policies and the last vote of
        each finalizer it has seen (a legacy chain has none)."""
        state = self.model.policy_state(node, now)
        if state is None:
            return {"active_finalizer_policy": None, "pending_finalizer_policy": None,
                    "last_tracked_votes": []}
        seen = self.model.node(node).last_votes
        votes = []
        policies = state.voting()
        for fin in sorted({f for p in policies for f in p.finalizers},
                          key=lambda f: (f.description, f.key)):
            block = seen.get(fin.key)
            if block is None:
                continue
            generation = next(p.generation for p in policies if p.has_key(fin.key))
            votes.append({"description": fin.description, "public_key": fin.key,
                          "is_vote_strong": True, "finalizer_policy_generation": generation,
                          "voted_for_block_id": block.block_id,
                          "voted_for_block_num": block.height,
                          "voted_for_block_timestamp": format_block_time(block.timestamp_ms)})
        return {"active_finalizer_policy": state.active.to_json(),
                "pending_finalizer_policy": state.pending[0].to_json() if state.pending
                else None,
                "last_tracked_votes": votes}

    def producer_schedule(self) -> dict[str, Any]:
        producers = [{"producer_name": p, "authority": [0, {"threshold": 1, "keys": [
            {"key": "PUB_K1_6MRyAjQq8ud7hVNYcfnVPJqcVpscN5So8BhtHuGYqET5BoDq63",
             "weight": 1}]}]} for p in self.model.schedule.producers]
        return {"active": {"version": 1, "producers": producers}, "pending": None,
                "proposed": None}

    def _table_rows(self, params: dict[str, Any]) -> Response:
        code, table = params.get("code"), params.get("table")
        if self.contract is None or code != "eosio" or table not in ("finkeys", "finalizers"):
            return nodeos_error(500, "Internal Service Error", 3060003,
                                "contract_table_query_exception",
                                "Contract Table Query Exception",
                                [_detail(f"Table {table} is not specified in the ABI",
                                         "chain_plugin.cpp", 0, "get_table_rows")])
        rows = self.contract.table_rows(str(table))
        lower = params.get("lower_bound")
        if table == "finalizers" and lower:
            rows = [r for r in rows if r["finalizer_name"] >= str(lower)]
        limit = params.get("limit", 10)
        limit = limit if isinstance(limit, int) and limit > 0 else 10
        return _json(200, {"rows": rows[:limit], "more": len(rows) > limit,
                           "next_key": ""})

    def _account(self, params: dict[str, Any]) -> Response:
        name = params.get("account_name")
        data = self.contract.account_json(str(name)) if self.contract else None
        if data is None:
            return nodeos_error(500, "Internal Service Error", 3060002,
                                "account_query_exception", "Account Query Exception",
                                [_detail(f"unknown key (eosio::chain::name): {name}",
                                         "chain_plugin.cpp", 0, "get_account")])
        return _json(200, data)

    # ------------------------------------------------------------------ producer API

    def _pause_at_block(self, node: str, body: bytes, now: float) -> Response:
        params = _params(body)
        if isinstance(params, Response):
            return params
        block_num = _block_num(params)
        if isinstance(block_num, Response):
            return block_num
        try:
            self.model.pause_at_block(node, block_num, now)
        except ValueError as exc:
            return nodeos_error(500, "Internal Service Error", 3170017,
                                "invalid_pause_at_block_request",
                                "Invalid pause at block request",
                                [_detail(str(exc), "producer_plugin.cpp", 0, "pause_at_block")])
        return _json(201, {"result": "ok"})

    # ------------------------------------------------------------------ transactions

    def _transaction(self, node: str, path: str, body: bytes, now: float) -> Response:
        params = _params(body)
        if isinstance(params, Response):
            return params
        failure_trace = False
        if path == SEND_TRANSACTION2:
            failure_trace = params.get("return_failure_trace", True) is not False
            inner = params.get("transaction")
            if not isinstance(inner, dict):
                return _invalid_request(_UNPARSABLE, _detail("Missing transaction",
                                                             "chain_plugin.cpp", 0, ""))
            params = inner
        for name in ("signatures", "compression"):
            if name not in params:
                return _invalid_request(_UNPARSABLE, _detail(f"Missing {name}",
                                                             "abi_serializer.hpp", 0, ""))
        if self.contract is None:
            return server_error("the simulated legacy chain has no system contract")
        try:
            tx = decode_transaction(params, self.identity.chain_id)
        except TransactionError as exc:
            return nodeos_error(500, "Internal Service Error", 3010010,
                                "packed_transaction_type_exception",
                                "Invalid packed transaction",
                                [_detail(f"Invalid packed transaction: {exc}",
                                         "transaction.cpp", 0, "")])
        try:
            self.submit(node, tx, now)
        except ChainError as err:
            if not failure_trace or err.early:
                return chain_error(err)
            return _json(202, {"transaction_id": tx.id,
                               "processed": self._trace(node, tx, now, err)})
        return _json(202, {"transaction_id": tx.id, "processed": self._trace(node, tx, now)})

    def submit(self, node: str, tx: SignedTransaction, now: float) -> None:
        """nodeos's checks on arrival, then into the node's mempool; ChainError if refused."""
        assert self.contract is not None
        head = self.model.view(node, now).head
        self.contract.check(tx, head, self.model.seen_transaction(node, tx.id))
        self.model.submit(node, tx, now)

    def _trace(self, node: str, tx: SignedTransaction, now: float,
               err: ChainError | None = None) -> dict[str, Any]:
        head = self.model.view(node, now).head
        actions = [{"action_ordinal": i + 1, "creator_action_ordinal": 0,
                    "receiver": a.account, "act": {
                        "account": a.account, "name": a.name,
                        "authorization": [{"actor": x, "permission": p}
                                          for x, p in a.authorization],
                        "data": a.data or {}}} for i, a in enumerate(tx.actions)]
        return {"id": tx.id, "block_num": head.height + 1,
                "block_time": format_block_time(head.timestamp_ms + self.model.interval_ms),
                "producer_block_id": None,
                "receipt": None if err else {"status": "executed", "cpu_usage_us": 180,
                                             "net_usage_words": 16},
                "elapsed": 180, "net_usage": 128, "scheduled": False,
                "action_traces": [] if err else actions, "account_ram_delta": None,
                "except": err.as_except() if err else None,
                "error_code": str(err.code) if err else None}
