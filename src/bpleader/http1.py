"""Just enough HTTP/1.1 to talk to one local nodeos: the request bytes, and a reply read
as its bytes arrive. No I/O here: the guard drives it over a blocking socket, the agent's
nodeos client over asyncio streams.

Why not ``httpx`` for these: the agent asks nodeos twice per tick for as long as it runs,
and ``httpx`` spent most of an idle agent's CPU building and tearing down each of those
requests (a py-spy profile at rest: 60 % of the event loop's time); the guard must stay a
few MiB, and ``http.client`` alone pulls in ``email`` and ``ssl``. nodeos's producer API
is on localhost (DESIGN.md): a POST, a reply with a ``Content-Length`` (or chunked, or to
the close) is all there is to it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit


class HttpError(ValueError):
    """The peer did not answer in HTTP/1.1 as we read it; the message says how."""


@dataclass(frozen=True)
class Endpoint:
    """Where nodeos listens: ``http(s)://[user:password@]host:port`` or ``unix:///path``."""

    host: str = ""
    port: int = 0
    unix_path: str | None = None
    https: bool = False
    host_header: str = "localhost"
    headers: dict[str, str] = field(default_factory=dict)  # Authorization, from the URL

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        if url.startswith("unix://"):
            return cls(unix_path=url[len("unix://"):])
        parts = urlsplit(url)
        https = parts.scheme == "https"
        extra = {}
        if parts.username is not None:
            user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            extra["Authorization"] = "Basic " + base64.b64encode(user_pass.encode()).decode()
        return cls(parts.hostname or "127.0.0.1", parts.port or (443 if https else 80), None,
                   https, parts.netloc.rpartition("@")[2], extra)

    def request(self, path: str, body: bytes = b"", keep_alive: bool = True) -> bytes:
        """A POST of ``body`` (JSON when not empty) to ``path``."""
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host_header}",
                 f"Content-Length: {len(body)}"]
        if body:
            lines.append("Content-Type: application/json")
        if not keep_alive:
            lines.append("Connection: close")
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Reply:
    """One reply, fed its bytes as they come (:meth:`feed`, then :meth:`eof` at the end
    of the stream); ``status`` and ``body`` once :attr:`done`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.body = b""
        self.done = False
        self.keep_alive = True
        self._buf = b""
        self._head = False
        self._length: int | None = None
        self._chunked = False

    def feed(self, data: bytes) -> bool:
        """Take more bytes; True once the reply is complete."""
        self._buf += data
        if len(self._buf) > self.limit:
            raise HttpError(f"reply larger than {self.limit} bytes")
        if not self._head:
            head, sep, rest = self._buf.partition(b"\r\n\r\n")
            if not sep:
                return False
            self._read_head(head)
            self._buf, self._head = rest, True
        if self._chunked:
            return self._try_unchunk()
        if self._length is not None and len(self._buf) >= self._length:
            self.body, self.done = self._buf[:self._length], True
        return self.done

    def eof(self) -> None:
        """The peer closed the stream: a reply without a length ends here."""
        if self.done:
            return
        if not self._head:
            if self._buf and not self._buf.startswith(b"HTTP/"):
                raise HttpError(f"not an HTTP reply: {self._buf[:60]!r}")
            raise HttpError("reply cut short" if self._buf else "connection closed")
        if self._length is not None or self._chunked:
            raise HttpError("reply cut short")
        self.body, self.done, self.keep_alive = self._buf, True, False

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        try:
            version, status = lines[0].split()[:2]
            self.status = int(status)
        except ValueError:
            raise HttpError(f"not an HTTP reply: {head[:60]!r}") from None
        self.keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length" and value.isdigit():
                self._length = int(value)
            elif name == b"transfer-encoding" and value == b"chunked":
                self._chunked = True
            elif name == b"connection":
                self.keep_alive = value == b"keep-alive" or (
                    self.keep_alive and value != b"close")

    def _try_unchunk(self) -> bool:
        out, rest = b"", self._buf
        while True:
            size_line, sep, after = rest.partition(b"\r\n")
            if not sep:
                return False
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                raise HttpError(f"bad chunk size {size_line[:20]!r}") from None
            if size == 0:
                if not after.startswith(b"\r\n"):
                    return False  # the end (and any trailers) has not arrived yet
                self.body, self.done = out, True
                return True
            if len(after) < size + 2:
                return False
            out, rest = out + after[:size], after[size + 2:]
