"""The nodeos client against a real HTTP server serving nodeos-shaped replies."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import UnixStreamServer

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpleader.nodeos import (
    ChainInfo,
    NodeosApiMissing,
    NodeosBadResponse,
    NodeosClient,
    NodeosError,
    NodeosHTTPError,
    NodeosTimeout,
    NodeosUnavailable,
    SyncEvaluator,
    parse_block_time,
    parse_info,
    parse_response,
)

INFO = {
    "server_version": "a1b2c3d4", "chain_id": "aca376f2" + "0" * 56,
    "head_block_num": 1234, "last_irreversible_block_num": 1000,
    "head_block_id": "000004d2" + "f" * 56, "head_block_time": "2026-11-25T01:59:33.500",
    "head_block_producer": "mybp", "server_version_string": "v5.0.3",
}
NOT_FOUND = {"code": 404, "message": "Not Found", "error": {
    "code": 0, "name": "exception", "what": "unspecified",
    "details": [{"message": "Unknown Endpoint", "file": "http_plugin.cpp",
                 "line_number": 391, "method": "handle_http_request"}]}}
ERROR_500 = {"code": 500, "message": "Internal Service Error", "error": {
    "code": 3010000, "name": "chain_type_exception", "what": "chain type exception",
    "details": []}}

# path -> (status, body bytes, delay seconds)
Routes = dict[str, tuple[int, bytes, float]]


def good_routes(paused: bool = True) -> Routes:
    return {
        "/v1/chain/get_info": (200, json.dumps(INFO).encode(), 0.0),
        "/v1/producer/pause": (201, b'{"result":"ok"}', 0.0),
        "/v1/producer/resume": (201, b'{"result":"ok"}', 0.0),
        "/v1/producer/paused": (201, b"true" if paused else b"false", 0.0),
    }


def make_handler(routes: Routes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            status, body, delay = routes.get(self.path, (404, json.dumps(NOT_FOUND).encode(),
                                                          0.0))
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *args: object) -> None:
            pass

    return Handler


class UnixHTTPServer(UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # type: ignore[no-untyped-def]
        request, _ = super().get_request()
        return request, ("local", 0)


@pytest.fixture(params=["tcp", "unix"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Routes]]:
    routes = good_routes()
    handler = make_handler(routes)
    srv: ThreadingHTTPServer | UnixHTTPServer
    if request.param == "tcp":
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        url = f"http://127.0.0.1:{srv.server_address[1]}"
    else:
        path = tmp_path / "nodeos.sock"
        srv = UnixHTTPServer(str(path), handler)
        url = f"unix://{path}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield url, routes
    srv.shutdown()
    srv.server_close()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def call(url: str, name: str, timeout: float = 0.5, **kw: object) -> object:
    async with NodeosClient(url, timeout) as c:
        return await getattr(c, name)(**kw)


def test_calls_over_tcp_and_unix_socket(server: tuple[str, Routes]) -> None:
    url, _ = server
    info = run(call(url, "get_info"))
    assert isinstance(info, ChainInfo)
    assert info.head_block_num == 1234 and info.head_block_producer == "mybp"
    assert info.head_block_time == parse_block_time("2026-11-25T01:59:33.5Z")
    assert run(call(url, "paused")) is True
    assert run(call(url, "pause")) is None
    assert run(call(url, "resume")) is None


@pytest.mark.parametrize("path,status,body,error,text", [
    ("/v1/producer/paused", 201, b"<!DOCTYPE html><html>bad gateway</html>",
     NodeosBadResponse, "expected JSON"),
    ("/v1/producer/paused", 201, b"", NodeosBadResponse, "expected JSON"),
    ("/v1/producer/paused", 201, b'"yes"', NodeosBadResponse, "expected true/false"),
    ("/v1/producer/resume", 500, json.dumps(ERROR_500).encode(), NodeosHTTPError,
     "HTTP 500 from nodeos: chain type exception"),
    ("/v1/producer/resume", 201, b'{"result":"no"}', NodeosBadResponse, "expected"),
    ("/v1/chain/get_info", 200, b'{"head_block_num": 1}', NodeosBadResponse, "missing field"),
])
def test_bad_replies_become_typed_errors(server: tuple[str, Routes], path: str, status: int,
                                         body: bytes, error: type[NodeosError],
                                         text: str) -> None:
    url, routes = server
    routes[path] = (status, body, 0.0)
    name = path.rsplit("/", 1)[1]
    with pytest.raises(error) as exc:
        run(call(url, name))
    assert text in exc.value.reason


def test_producer_api_missing(server: tuple[str, Routes]) -> None:
    url, routes = server
    del routes["/v1/producer/pause"]
    with pytest.raises(NodeosApiMissing, match="producer_api_plugin"):
        run(call(url, "pause"))


def test_timeout_and_budget(server: tuple[str, Routes]) -> None:
    url, routes = server
    routes["/v1/producer/paused"] = (201, b"true", 2.0)
    t0 = time.monotonic()
    with pytest.raises(NodeosTimeout):
        run(call(url, "paused", timeout=0.2))
    with pytest.raises(NodeosTimeout):
        run(call(url, "paused", timeout=0.2, budget=0.5))
    assert time.monotonic() - t0 < 2.0  # neither call waited for the slow reply


def test_connection_refused() -> None:
    with pytest.raises(NodeosUnavailable):
        run(call("http://127.0.0.1:9", "get_info"))


def test_sync_rules() -> None:
    info = ChainInfo(10, 1000.0, "mybp", 5, "aa" * 32, "v5")
    ev = SyncEvaluator(3.0, expected_chain_id="aa" * 32)
    assert ev.observe(1001.0, 0.0, info).in_sync
    assert "old" in ev.observe(1005.0, 1.0, info).reason
    assert "stuck" in ev.observe(1002.0, 4.0, info).reason
    advanced = ChainInfo(11, 1004.0, "mybp", 5, "aa" * 32, "v5")
    assert ev.observe(1004.5, 4.5, advanced).in_sync
    wrong = ChainInfo(12, 1004.5, "mybp", 5, "bb" * 32, "v5")
    assert "chain_id mismatch" in ev.observe(1004.6, 4.6, wrong).reason
    err = NodeosTimeout("get_info", "timed out after 0.50 s")
    state = ev.observe(1005.0, 5.0, None, err)
    assert not state.in_sync and "timed out" in state.reason


@given(status=st.integers(100, 599), body=st.binary(max_size=200),
       call_name=st.sampled_from(["get_info", "pause", "resume", "paused"]))
def test_any_reply_gives_a_value_or_a_nodeos_error(status: int, body: bytes,
                                                   call_name: str) -> None:
    try:
        data = parse_response(call_name, status, body)
        if call_name == "get_info":
            parse_info(data)
    except NodeosError:
        pass


# ------------------------------------------------------ the keep-alive connections


async def _raw_server(replies: list[bytes], close_after: set[int]) -> tuple[
        asyncio.AbstractServer, list[int], str]:
    """Answers request i with ``replies[i]`` (raw bytes), closing after the ones in
    ``close_after``; counts the connections it accepted."""
    connections = [0]
    served = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                await reader.readexactly(length)
                i = served[0]
                served[0] += 1
                writer.write(replies[i])
                await writer.drain()
                if i in close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, connections, f"http://127.0.0.1:{port}"


def test_one_kept_connection_serves_every_tick_and_a_closed_one_is_replaced() -> None:
    ok = b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ntrue"
    chunked = (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\ntr\r\n2\r\nue\r\n0\r\n\r\n")
    close = b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 5\r\n\r\nfalse"

    async def run() -> tuple[list[bool], int]:
        server, connections, url = await _raw_server([ok, chunked, ok, close, ok, ok], {2})
        client = NodeosClient(url, 1.0)
        try:
            # 0-1 on one connection; the server closes it after 2 (unannounced): 3 finds
            # it closed and goes again on a new one, which 3's reply closes; 4-5 share one.
            answers = [await client.paused() for _ in range(6)]
        finally:
            await client.aclose()
            server.close()
        return answers, connections[0]

    answers, connections = asyncio.run(run())
    assert answers == [True, True, True, False, True, True]
    assert connections == 3


def test_a_reply_cut_short_is_a_bad_response_not_a_hang() -> None:
    cut = b"HTTP/1.1 201 Created\r\nContent-Length: 40\r\n\r\n{\"head"

    async def run() -> NodeosError:
        server, _, url = await _raw_server([cut], {0})
        client = NodeosClient(url, 1.0)
        try:
            with pytest.raises(NodeosError) as caught:
                await client.get_info()
        finally:
            await client.aclose()
            server.close()
        return caught.value

    error = asyncio.run(run())
    assert isinstance(error, NodeosBadResponse) and "cut short" in error.reason
