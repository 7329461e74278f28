"""nodeos's HTTP API as bpleader uses it: routes, bodies, status codes and error shapes.

The shapes follow Leap 5 (``server_version_string`` ``v5.0.3``) as captured from real
nodeos: routing is by path only (any method), a parameterless call takes an empty body
or ``{}``, the producer API answers 201, and every error has the body
``{"code", "message", "error": {"code", "name", "what", "details": [...]}}``.
``pause_at_block`` comes from Spring, which refuses a block the head has already reached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from bpleader.sim.chain import format_block_time
from bpleader.sim.engine import Engine, PauseAtBlockRejected
from bpleader.sim.httpd import Response

GET_INFO = "/v1/chain/get_info"
PAUSE = "/v1/producer/pause"
RESUME = "/v1/producer/resume"
PAUSED = "/v1/producer/paused"
PAUSE_AT_BLOCK = "/v1/producer/pause_at_block"
PRODUCER_API = "/v1/producer/"

# A proxy in front of a dead nodeos answers like this: 200 would be odd but happens.
GARBAGE_PAGE = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
                b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
                b"</body>\r\n</html>\r\n")


@dataclass(frozen=True)
class Identity:
    """What get_info says about the software and the chain, beyond the blocks."""

    chain_id: str
    version: str = "v5.0.3"

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


def get_info_body(engine: Engine, node: str, identity: Identity) -> dict[str, Any]:
    view = engine.get_info(node)
    head, lib = view.head, view.lib
    return {
        "server_version": identity.server_version,
        "chain_id": identity.chain_id,
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
        "server_version_string": identity.version,
        "fork_db_head_block_num": head.height,
        "fork_db_head_block_id": head.block_id,
        "server_full_version_string": identity.full_version,
        # int64 values above 2^32 come as strings from nodeos.
        "total_cpu_weight": "382307936245",
        "total_net_weight": "95569735985",
        "earliest_available_block_num": view.earliest_available_block_num,
        "last_irreversible_block_time": format_block_time(lib.timestamp_ms),
    }


def answer(engine: Engine, node: str, identity: Identity, path: str, body: bytes) -> Response:
    """The answer of a healthy nodeos ``node`` to a call on ``path``."""
    if path == PAUSE_AT_BLOCK:
        params = _params(body)
        if isinstance(params, Response):
            return params
        block_num = _block_num(params)
        if isinstance(block_num, Response):
            return block_num
        try:
            engine.pause_at_block(node, block_num)
        except PauseAtBlockRejected as exc:
            # Spring's invalid_pause_at_block_request, a producer_exception (317xxxx).
            return nodeos_error(500, "Internal Service Error", 3170000,
                                "invalid_pause_at_block_request",
                                "Invalid pause at block request",
                                [_detail(str(exc), "producer_plugin.cpp", 0, "pause_at_block")])
        return _json(201, {"result": "ok"})
    if path not in (GET_INFO, PAUSE, RESUME, PAUSED):
        return not_found()
    refused = _no_params(body)
    if refused is not None:
        return refused
    if path == GET_INFO:
        return _json(200, get_info_body(engine, node, identity))
    if path == PAUSE:
        engine.pause(node)
        return _json(201, {"result": "ok"})
    if path == RESUME:
        engine.resume(node)
        return _json(201, {"result": "ok"})
    return _json(201, engine.is_paused(node))
