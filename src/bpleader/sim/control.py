"""The control API: the simulator's ledger and fault injection over HTTP, as JSON.

Agents run as separate processes, and so do the tests that drive them; this is how such
a process reads the ledger and breaks a node. Routes:

* ``GET /ledger``: the summary; ``GET /ledger/slots?since=K&limit=N``: per-slot records
* ``GET /nodes``: every node (name, url, up, paused, faults, head, call counts)
* ``GET /finalizers``: our producer's active finalizer key and the node holding it, the
  policy generation, a key switch in progress, and each node's key and implicit pause
* ``POST /nodes/{name}/fault`` ``{"kind": ..., **params}``; ``POST /nodes/{name}/clear``
  (optionally ``{"kinds": [...]}``); ``POST /nodes/{name}/restart`` ``{"down": s}``;
  ``POST /nodes/{name}/kill``; ``POST /nodes/{name}/start``

Errors answer 4xx with ``{"error": "<what is wrong>"}``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from bpleader.sim.faults import FaultError
from bpleader.sim.httpd import HTTPService, Request, Response

if TYPE_CHECKING:
    from bpleader.sim.cluster import SimCluster, SimNode

log = logging.getLogger("bpleader.sim.control")

MAX_SLOTS = 100_000


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json(status: int, value: Any) -> Response:
    return Response(status, json.dumps(value).encode())


def _body(request: Request) -> dict[str, Any]:
    if not request.body.strip():
        return {}
    try:
        value = json.loads(request.body)
    except ValueError as exc:
        raise ControlError(400, f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ControlError(400, "body must be a JSON object")
    return value


def _int_arg(query: dict[str, list[str]], name: str, default: int) -> int:
    raw = query.get(name, [str(default)])[-1]
    try:
        return int(raw)
    except ValueError:
        raise ControlError(400, f"{name} must be an integer, not {raw!r}") from None


class ControlServer:
    """Serves the control routes for one cluster."""

    def __init__(self, cluster: SimCluster, *, host: str, port: int) -> None:
        self.cluster = cluster
        self.http = HTTPService(self._handle, host=host, port=port)

    @property
    def url(self) -> str:
        return self.http.url

    def start(self) -> None:
        self.http.start()

    def stop(self) -> None:
        self.http.stop()

    def _handle(self, request: Request) -> Response:
        try:
            return _json(200, self._route(request))
        except ControlError as exc:
            return _json(exc.status, {"error": str(exc)})
        except (FaultError, ValueError) as exc:
            return _json(400, {"error": str(exc)})

    def _route(self, request: Request) -> Any:
        url = urlsplit(request.path)
        parts = [p for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        if parts == ["ledger"]:
            self._method(request, "GET")
            return self.cluster.ledger_summary()
        if parts == ["ledger", "slots"]:
            self._method(request, "GET")
            limit = _int_arg(query, "limit", 10_000)
            if not 1 <= limit <= MAX_SLOTS:
                raise ControlError(400, f"limit must be 1..{MAX_SLOTS}")
            return {"slots": self.cluster.slot_records(_int_arg(query, "since", 0), limit)}
        if parts == ["finalizers"]:
            self._method(request, "GET")
            return self.cluster.finalizers()
        if parts == ["nodes"]:
            self._method(request, "GET")
            return {"nodes": [self.cluster.node(n).status() for n in self.cluster.node_names]}
        if len(parts) == 3 and parts[0] == "nodes":
            self._method(request, "POST")
            return self._act(self._node(parts[1]), parts[2], _body(request))
        raise ControlError(404, f"no route {request.method} {url.path} (see the control "
                                "API in bpleader.sim.control)")

    @staticmethod
    def _method(request: Request, wanted: str) -> None:
        if request.method != wanted:
            raise ControlError(405, f"{request.path} takes {wanted}, not {request.method}")

    def _node(self, name: str) -> SimNode:
        if name not in self.cluster.node_names:
            raise ControlError(404, f"unknown node {name!r} (have {self.cluster.node_names})")
        return self.cluster.node(name)

    def _act(self, node: SimNode, action: str, body: dict[str, Any]) -> dict[str, Any]:
        if action == "fault":
            kind = body.pop("kind", None)
            if not isinstance(kind, str):
                raise ControlError(400, 'fault needs {"kind": "<fault>", ...parameters}')
            node.set_fault(kind, **body)
        elif action == "clear":
            kinds = body.get("kinds", [])
            if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
                raise ControlError(400, 'clear takes {"kinds": ["<fault>", ...]} or nothing')
            node.clear_faults(*kinds)
        elif action == "restart":
            if "down" not in body:
                raise ControlError(400, 'restart needs {"down": seconds}')
            node.set_fault("restart", **body)
        elif action == "kill":
            node.kill()
        elif action == "start":
            node.start()
        else:
            raise ControlError(404, f"unknown action {action!r} (fault, clear, restart, kill, "
                                    "start)")
        log.info("control node=%s action=%s body=%s", node.name, action, json.dumps(body))
        return node.status()
