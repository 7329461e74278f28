"""SimControl: the control API from another process (tests, benchmarks, scenarios)."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import httpx


class SimControlError(Exception):
    """The control API refused a request (the message is its explanation)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class SimControl:
    """A client of one simulator's control API; every call has a timeout."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> SimControl:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              params: dict[str, int] | None = None) -> Any:
        resp = self._http.request(method, path, json=body, params=params)
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200]
            raise SimControlError(resp.status_code, message)
        return resp.json()

    def ledger(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/ledger")
        return result

    def slots(self, since: int = 0, limit: int = 10_000) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call(
            "GET", "/ledger/slots", params={"since": since, "limit": limit})["slots"]
        return result

    def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/nodes")["nodes"]
        return result

    def finalizers(self) -> dict[str, Any]:
        """The active finalizer key, which node holds it, the policy generation and each
        node's implicit-pause status (see :meth:`bpleader.sim.engine.Engine.finalizers`)."""
        result: dict[str, Any] = self._call("GET", "/finalizers")
        return result

    def node(self, name: str) -> dict[str, Any]:
        for node in self.nodes():
            if node["name"] == name:
                return node
        raise KeyError(f"no simulated node {name!r}")

    def fault(self, name: str, kind: str, **params: float) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/nodes/{name}/fault",
                                            {"kind": kind, **params})
        return result

    def clear(self, name: str, *kinds: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/nodes/{name}/clear",
                                            {"kinds": list(kinds)})
        return result

    def restart(self, name: str, down: float) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/nodes/{name}/restart", {"down": down})
        return result

    def kill(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/nodes/{name}/kill")
        return result

    def start(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/nodes/{name}/start")
        return result

    def wait_slots(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` more slots have run (polls the ledger)."""
        target = self.ledger()["slots"] + n
        deadline = time.monotonic() + timeout
        while self.ledger()["slots"] < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} slots did not run within {timeout:.1f} s")
            time.sleep(0.05)
