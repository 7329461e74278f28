"""Turning etcd client failures into one line that names the cause, and pacing retries
after the failures that retrying soon cannot fix.

``pyetcd`` replaces gRPC's error by a bare ``ConnectionFailedError`` ("etcd connection
failed") and after one failure answers "No endpoint available" for a while: an operator
reading that cannot tell a dead member from a certificate etcd refuses. The gRPC status
is still on the exception's ``__context__``; this module digs it out and maps the known
TLS and authentication failures to a sentence naming the configuration field to fix.

A client certificate that etcd rejects is only seen by the client as a broken TLS
stream (TLS 1.3 sends the alert after the handshake), so the reason is completed by
looking at the certificate itself: expired, not yet valid, or issued by another CA.

Nothing here ever includes a password or a token: the messages are built from gRPC
status details, which etcd never fills with the credentials it was sent.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from typing import Any

# Failure kinds. TLS and authentication failures will not fix themselves within a tick:
# the agent keeps trying (an operator may fix etcd at any moment) but with backoff.
TLS = "tls"
AUTH = "auth"
PERMISSION = "permission"
PERSISTENT = (TLS, AUTH, PERMISSION)

# (substring of gRPC's details, kind, explanation); first match wins.
_KNOWN: tuple[tuple[str, str, str], ...] = (
    ("CERTIFICATE_VERIFY_FAILED", TLS,
     "TLS: etcd's server certificate is not trusted by etcd.ca_cert"),
    ("is not in peer certificate", TLS,
     "TLS: etcd's server certificate does not name the endpoint's host"),
    ("WRONG_VERSION_NUMBER", TLS,
     "TLS handshake failed: the endpoint does not speak TLS (use http:// or enable TLS)"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", TLS, "TLS: etcd rejected the client certificate"),
    ("SSLV3_ALERT_CERTIFICATE_EXPIRED", TLS,
     "TLS: etcd rejected the client certificate as expired"),
    ("CERTIFICATE_REQUIRED", TLS,
     "TLS: etcd requires a client certificate (set etcd.cert and etcd.key)"),
    # TLS 1.3: the server's alert about our certificate arrives after the handshake.
    ("TSI_DATA_CORRUPTED", TLS, "TLS: etcd rejected the client certificate"),
    ("authentication failed", AUTH,
     "authentication failed: etcd rejected etcd.username or etcd.password"),
    ("user name not found", AUTH, "authentication failed: etcd.username is not an etcd user"),
    ("user name is empty", AUTH, "authentication failed: etcd.username is empty"),
    ("permission denied", PERMISSION,
     "permission denied: the etcd user's role lacks readwrite on this key"),
    ("authentication is not enabled", AUTH,
     "etcd has authentication disabled: remove etcd.username and etcd.password"),
)


@dataclass(frozen=True)
class Explained:
    reason: str  # one line, no secrets
    kind: str | None  # TLS, AUTH, PERMISSION or None (transient or unknown)


def grpc_status(exc: BaseException) -> tuple[str, str] | None:
    """(code name, details) of the gRPC error in ``exc`` or its context chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code, details = getattr(cur, "code", None), getattr(cur, "details", None)
        if callable(code) and callable(details):
            try:
                c: Any = code()
                return str(getattr(c, "name", c)).lower(), str(details() or "")
            except Exception:
                pass
        cur = cur.__cause__ or cur.__context__
    return None


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line[:limit] + ("…" if len(line) > limit else "")


def explain(exc: BaseException) -> Explained:
    """One readable line for an etcd failure: the known cause first, then gRPC's words."""
    status = grpc_status(exc)
    if status is None:
        text = str(exc).strip() or type(exc).__name__
        return Explained(_one_line(text.splitlines()[0]), None)
    code, details = status
    for needle, kind, sentence in _KNOWN:
        if needle.lower() in details.lower():
            return Explained(f"{sentence} ({code}: {_short_details(details)})", kind)
    return Explained(f"{code}: {_one_line(details)}", None)


def _short_details(details: str) -> str:
    """gRPC's details without its address-list preamble, so the line stays short."""
    tail = details.rsplit("last error: ", 1)[-1]
    # BoringSSL's "error:1000007d:SSL routines:OPENSSL_internal:" says nothing more.
    tail = tail.rsplit("OPENSSL_internal:", 1)[-1].removesuffix(": OK")
    return _one_line(tail, 120)


def cert_hint(cert: str | None, ca: str | None, now: float | None = None) -> str:
    """Why etcd may reject our client certificate, judged from the files alone."""
    if not cert:
        return "no client certificate configured (etcd.cert, etcd.key)"
    try:
        info: dict[str, Any] = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except Exception:
        return f"etcd.cert {cert} cannot be decoded"
    now = time.time() if now is None else now
    try:
        not_after = ssl.cert_time_to_seconds(info["notAfter"])
        not_before = ssl.cert_time_to_seconds(info["notBefore"])
    except (KeyError, ValueError):
        return ""
    if now > not_after:
        return f"etcd.cert expired on {info['notAfter']}"
    if now < not_before:
        return f"etcd.cert is not valid before {info['notBefore']}"
    if ca:
        try:
            ca_info: dict[str, Any] = ssl._ssl._test_decode_cert(ca)  # type: ignore[attr-defined]
        except Exception:
            return ""
        if info.get("issuer") != ca_info.get("subject"):
            return (f"etcd.cert is issued by {_name(info.get('issuer'))}, not by etcd.ca_cert's "
                    f"{_name(ca_info.get('subject'))}: is it signed by a CA etcd trusts?")
    return "etcd.cert looks valid: is its CA in etcd's --trusted-ca-file?"


def _name(rdns: Any) -> str:
    try:
        return ",".join(f"{k}={v}" for rdn in rdns for k, v in rdn) or "?"
    except (TypeError, ValueError):
        return "?"


class Backoff:
    """Spacing of attempts after persistent failures: 0.5 s doubling up to ``cap``.

    Only TLS, authentication and permission failures are paced: a dead member or a
    timeout must be retried at once (that is how the client fails over), but retrying
    a refused certificate four times a second only floods etcd's log and ours. The cap
    bounds how long a fix made by the operator takes to be noticed.
    """

    def __init__(self, first: float = 0.5, cap: float = 8.0) -> None:
        self.first, self.cap = first, cap
        self.failures = 0
        self.until = 0.0
        self.reason = ""

    def held(self, now: float) -> float:
        """Seconds left before the next attempt may be made (0: go ahead)."""
        return max(0.0, self.until - now) if self.failures else 0.0

    def failed(self, now: float, reason: str) -> float:
        delay: float = min(self.cap, self.first * 2.0 ** self.failures)
        self.failures += 1
        self.until, self.reason = now + delay, reason
        return delay

    def succeeded(self) -> None:
        self.failures, self.until, self.reason = 0, 0.0, ""
