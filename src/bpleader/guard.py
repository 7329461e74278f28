"""The dead-man guard process (layer 8) and the confirmed pause every fence uses.

The agent starts ``python -m bpleader.guard`` and keeps it armed with its fence time (see
:class:`bpleader.fence.GuardProcess`). If the agent is frozen or killed, the guard pauses
nodeos once that time has passed, and keeps it paused until the agent arms it again.

This module imports only small parts of the standard library: one guard runs on every
producer host for as long as the agent does, so it should cost a few MiB, not the agent's
HTTP stack. That is why :func:`pause_confirmed` speaks its two requests of HTTP/1.1 over a
plain socket (with :mod:`bpleader.http1`) instead of through ``httpx`` or ``http.client``
(which alone pulls in the ``email`` package and ``ssl``, about 8 MiB). The agent's own fence
thread and ``bpleader fence`` use the same function, so all three fences trust exactly the
same thing: ``/v1/producer/paused`` reading ``true`` after a pause of their own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time

from bpleader.clock import boottime
from bpleader.http1 import Endpoint, HttpError, Reply

log = logging.getLogger(__name__)

# An orphaned guard (its agent died) retries an unconfirmed pause this long, then exits:
# systemd's ExecStopPost fence and the restarted agent take over from there.
GIVE_UP_AFTER = 60.0
GUARD_URL_ENV = "BPLEADER_GUARD_URL"  # the nodeos URL, credentials and all (not in argv)
MAX_REPLY = 1 << 16  # a pause or paused reply is a few bytes; more is not nodeos


class PauseError(Exception):
    """One pause or paused request failed; the message is the reason to log."""


def _connect(end: Endpoint, timeout: float) -> socket.socket:
    if end.unix_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(end.unix_path)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((end.host, end.port), timeout=timeout)
    if end.https:
        import ssl  # only for an https nodeos URL: ssl is most of http.client's weight

        try:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=end.host)
        except BaseException:
            sock.close()
            raise
    return sock


def post(url: str, path: str, timeout: float) -> tuple[int, bytes]:
    """POST ``path`` with an empty body; the status and body, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    end = Endpoint.from_url(url)
    reply = Reply(MAX_REPLY)
    try:
        with _connect(end, timeout) as sock:
            sock.sendall(end.request(path, keep_alive=False))
            while not reply.done:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(MAX_REPLY)
                if not chunk:
                    reply.eof()
                else:
                    reply.feed(chunk)
    except TimeoutError:
        raise PauseError(f"timed out after {timeout:.2f} s") from None
    except OSError as exc:
        raise PauseError(f"unreachable: {type(exc).__name__} {str(exc)[:120]}") from None
    except HttpError as exc:
        raise PauseError(str(exc)) from None
    return reply.status, reply.body


def _call(url: str, what: str, timeout: float) -> bytes:
    status, body = post(url, f"/v1/producer/{what}", timeout)
    if not 200 <= status < 300:
        raise PauseError(f"{what}: HTTP {status} from nodeos: {body[:120]!r}")
    return body


def kill_after(timeout: float) -> float:
    """How long the guard tries to confirm its pause, once its time has come, before it
    runs the kill command: one pause call's timeout.

    A successor bounds a leader that vanished from its fence time plus this (and the
    block begun by then). A guard that went on retrying for longer let a nodeos whose API
    hung while it kept producing sign one height past that bound, on a branch the
    successor never saw, while etcd loss kept its agent from marking it unfenced
    (seed 6889). A slow API at a fence deadline therefore costs a nodeos restart: the
    price of knowing when it stopped. Raise ``nodeos.timeout`` if the API is slow.
    """
    return timeout


def pause_confirmed(url: str, timeout: float, budget: float) -> tuple[bool, str]:
    """Pause nodeos, retrying until ``paused`` reads true or ``budget`` seconds pass.

    Each request has ``timeout`` seconds. Returns whether the pause is confirmed and the
    last reason. Only the JSON literal ``true`` confirms: anything else is a failure.
    """
    deadline = time.monotonic() + budget
    last = "no attempt"
    while True:
        try:
            _call(url, "pause", timeout)
            reply = _call(url, "paused", timeout)
            try:
                paused = json.loads(reply)
            except ValueError:
                paused = None
            if paused is True:
                return True, "paused confirmed"
            last = "paused still reads false" if paused is False else \
                f"paused: not a boolean: {reply[:60]!r}"
        except PauseError as exc:
            last = str(exc)
        if time.monotonic() + 0.1 >= deadline:
            return False, last
        time.sleep(0.1)


def run_kill_command(command: str, ctx: str) -> None:
    try:
        res = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        log.error("%s event=fence_kill_failed reason=%r", ctx, f"{type(exc).__name__}: {exc}")
        return
    if res.returncode != 0:
        log.error("%s event=fence_kill_failed reason=%r", ctx,
                  f"exit {res.returncode}: {(res.stderr or res.stdout).strip()[:200]}")


def guard_main(argv: list[str] | None = None) -> int:
    """The guard process: enforce the pause from the armed time until re-armed or disarmed.

    Once the time has passed it does not pause just once: every check interval it sends
    ``pause`` again (idempotent) and reads ``paused``, so a thawed agent that sends a stale
    resume is undone within one interval. It never trusts a ``paused`` of true without
    sending its own pause first: Spring's implicit pause reads true and then lifts by
    itself, and only an explicit pause keeps nodeos paused after it. When the agent dies
    (stdin closes) an armed guard waits for its time, pauses, confirms, and exits; a
    disarmed one exits at once.
    """
    p = argparse.ArgumentParser(prog="python -m bpleader.guard",
                                description="bpleader's dead-man guard (started by the agent)")
    p.add_argument("--url", required=True,
                   help=f"nodeos URL as shown (its password redacted); ${GUARD_URL_ENV}, "
                        "when set, is the one used")
    p.add_argument("--timeout", type=float, default=0.5)
    p.add_argument("--check-interval", type=float, default=0.5)
    p.add_argument("--node", default="")
    p.add_argument("--kill-command", default="",
                   help="run once per deadline when nodeos does not confirm the pause")
    args = p.parse_args(argv)
    args.url = os.environ.get(GUARD_URL_ENV) or args.url
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s bpleader-guard %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    pause_at: float | None = None
    parent_alive = True
    next_check = 0.0
    buf = b""
    ctx = f"node={args.node} role=guard"
    reported: tuple[float | None, bool] = (None, False)  # one log line per arm and outcome

    killed_for: float | None = None

    def enforce() -> bool:
        nonlocal reported, killed_for
        ok, reason = pause_confirmed(args.url, args.timeout, kill_after(args.timeout))
        if reported != (pause_at, ok):
            reported = (pause_at, ok)
            log.warning("%s event=fence_fired source=guard confirmed=%s reason=%r", ctx, ok,
                        reason)
        if not ok and args.kill_command and killed_for != pause_at:
            # A nodeos whose API hangs may still be signing: nothing but stopping the
            # process fences it. Once per deadline; systemd starts it again, paused.
            killed_for = pause_at
            log.error("%s event=fence_kill reason=%r", ctx, f"pause unconfirmed: {reason}")
            run_kill_command(args.kill_command, ctx)
        return ok

    def on_term(_sig: int, _frame: object) -> None:
        if pause_at is not None:
            enforce()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    while True:
        # Armed: wake when the fence time (or the next check) comes, or on a new command.
        wait = 1.0 if pause_at is None else \
            min(1.0, max(0.0, max(pause_at, next_check) - boottime()))
        if parent_alive:
            ready, _, _ = select.select([stdin], [], [], wait)
            if ready:
                chunk = os.read(stdin.fileno(), 4096)
                if not chunk:
                    parent_alive = False
                    log.info("%s event=agent_gone armed=%s", ctx, pause_at is not None)
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    words = line.decode(errors="replace").split()
                    if words[:1] == ["arm"] and len(words) == 2:
                        try:
                            pause_at, next_check = float(words[1]), 0.0
                        except ValueError:
                            # Not from our agent; arming now is the safe reading of it.
                            log.error("%s event=bad_command line=%r", ctx, line[:80])
                            pause_at, next_check = boottime(), 0.0
                    elif words[:1] == ["disarm"]:
                        pause_at = None
        else:
            if pause_at is None:
                return 0
            time.sleep(wait)
        now = boottime()
        if not parent_alive and pause_at is not None and now > pause_at + GIVE_UP_AFTER:
            log.error("%s event=guard_gave_up reason='pause never confirmed'", ctx)
            return 1
        if pause_at is not None and now >= pause_at and now >= next_check:
            next_check = now + args.check_interval
            if enforce() and not parent_alive:
                return 0


if __name__ == "__main__":
    sys.exit(guard_main())
