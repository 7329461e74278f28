"""Fencing: pausing nodeos when the lease can no longer be trusted, whatever else hangs.

Three independent fences, each a layer of DESIGN.md:

* :class:`ThreadFence` (layer 3) lives in the agent process but not in its event loop: a
  blocked etcd or nodeos call cannot stop it from pausing at ``deadline - fence_guard``.
* :class:`GuardProcess` (layer 8) is a separate process the agent keeps armed with the
  same time. If the agent is frozen (SIGSTOP) or killed, the guard pauses nodeos when
  the time passes, and keeps it paused until the agent arms it again.
* ``bpleader fence`` (:func:`fence_command`), run by systemd's ``ExecStopPost``, pauses
  and confirms after the service stopped for any reason.

All of them use :func:`pause_confirmed`, which trusts nothing but ``/v1/producer/paused``
reading ``true``. Times are on :func:`bpleader.clock.boottime`, shared by every process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bpleader.clock import boottime
from bpleader.nodeos import NodeosClient, NodeosError

log = logging.getLogger(__name__)

# An orphaned guard (its agent died) retries an unconfirmed pause this long, then exits:
# systemd's ExecStopPost fence and the restarted agent take over from there.
GIVE_UP_AFTER = 60.0


async def _pause_confirmed_async(url: str, timeout: float, budget: float) -> tuple[bool, str]:
    deadline = time.monotonic() + budget
    last = "no attempt"
    async with NodeosClient(url, timeout) as client:
        while True:
            try:
                await client.pause()
                if await client.paused():
                    return True, "paused confirmed"
                last = "paused still reads false"
            except NodeosError as exc:
                last = exc.reason
            if time.monotonic() + 0.1 >= deadline:
                return False, last
            await asyncio.sleep(0.1)


def pause_confirmed(url: str, timeout: float, budget: float) -> tuple[bool, str]:
    """Pause nodeos, retrying until ``paused`` reads true or ``budget`` seconds pass.

    Synchronous (its own event loop) so threads and small processes can call it.
    Returns whether the pause is confirmed and the last reason.
    """
    return asyncio.run(_pause_confirmed_async(url, timeout, budget))


class ThreadFence:
    """Layer 3: a thread that pauses nodeos at the armed time unless re-armed first."""

    def __init__(self, pause: Callable[[], tuple[bool, str]],
                 now: Callable[[], float] = boottime, describe: Callable[[], str] = str) -> None:
        self._pause = pause
        self._now = now
        self._describe = describe
        self._cond = threading.Condition()
        self._pause_at: float | None = None
        self.fired = 0
        self._thread = threading.Thread(target=self._run, name="fence", daemon=True)
        self._thread.start()

    def arm(self, pause_at: float) -> None:
        with self._cond:
            self._pause_at = pause_at
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._pause_at = None
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pause_at is None:
                    self._cond.wait()
                left = self._pause_at - self._now()
                if left > 0:
                    # Short waits: a wait on the monotonic clock does not count a suspend,
                    # the boottime deadline does.
                    self._cond.wait(min(left, 0.05))
                    continue
                self._pause_at = None
            self.fired += 1
            ok, reason = self._pause()
            log.warning("%s event=fence_fired source=thread confirmed=%s reason=%r",
                        self._describe(), ok, reason)


class GuardProcess:
    """Layer 8, agent side: spawns ``python -m bpleader.fence`` and keeps it armed.

    Commands are single lines on the guard's stdin; writing them never blocks for long
    (a pipe holds many lines) and a dead guard is restarted on the next command.
    """

    def __init__(self, url: str, timeout: float, check_interval: float, node: str,
                 kill_command: str | None = None) -> None:
        self._argv = [sys.executable, "-m", "bpleader.fence", "--url", url,
                      "--timeout", str(timeout), "--check-interval", str(check_interval),
                      "--node", node]
        if kill_command:
            self._argv += ["--kill-command", kill_command]
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        # Its own session: a terminal's Ctrl-C or a SIGSTOP sent to the agent's process
        # group must not reach the guard.
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, start_new_session=True)

    def _send(self, line: str) -> None:
        with self._lock:
            for _ in range(2):
                if self._proc is None or self._proc.poll() is not None:
                    log.warning("event=guard_restart reason='guard process not running'")
                    self._spawn()
                assert self._proc is not None and self._proc.stdin is not None
                try:
                    self._proc.stdin.write(line.encode() + b"\n")
                    self._proc.stdin.flush()
                    return
                except OSError as exc:
                    log.warning("event=guard_write_failed reason=%r", str(exc))
                    self._proc = None

    def arm(self, pause_at: float) -> None:
        self._send(f"arm {pause_at:.6f}")

    def disarm(self) -> None:
        self._send("disarm")

    def stop(self) -> None:
        """Close the pipe: a disarmed guard exits, an armed one fences first."""
        with self._lock:
            if self._proc is not None and self._proc.stdin is not None:
                try:
                    self._proc.stdin.close()
                except OSError:
                    pass
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()


class Fences:
    """Arms and disarms several fences together."""

    def __init__(self, *fences: ThreadFence | GuardProcess) -> None:
        self._fences = fences

    def arm(self, pause_at: float) -> None:
        for f in self._fences:
            f.arm(pause_at)

    def disarm(self) -> None:
        for f in self._fences:
            f.disarm()


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
    p = argparse.ArgumentParser(prog="python -m bpleader.fence",
                                description="bpleader's dead-man guard (started by the agent)")
    p.add_argument("--url", required=True)
    p.add_argument("--timeout", type=float, default=0.5)
    p.add_argument("--check-interval", type=float, default=0.5)
    p.add_argument("--node", default="")
    p.add_argument("--kill-command", default="",
                   help="run once per deadline when nodeos does not confirm the pause")
    args = p.parse_args(argv)
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
        ok, reason = pause_confirmed(args.url, args.timeout, max(args.timeout * 4, 1.0))
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
        now = boottime()
        wait = 0.05 if pause_at is not None else 1.0
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
                        pause_at, next_check = float(words[1]), 0.0
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


def kill_guards(nodeos_urls: set[str]) -> None:
    """End guard processes fencing these nodeos URLs. They run in their own session, so a
    test or benchmark that kills agents must clean them up explicitly."""
    wanted = {u.encode() for u in nodeos_urls}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"bpleader.fence" in cmd and wanted & set(cmd):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_dir.name), signal.SIGKILL)


def run_kill_command(command: str, ctx: str) -> None:
    try:
        res = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        log.error("%s event=fence_kill_failed reason=%r", ctx, f"{type(exc).__name__}: {exc}")
        return
    if res.returncode != 0:
        log.error("%s event=fence_kill_failed reason=%r", ctx,
                  f"exit {res.returncode}: {(res.stderr or res.stdout).strip()[:200]}")


def fence_command(url: str, timeout: float, budget: float) -> int:
    """``bpleader fence``: exit 0 only when nodeos confirms it is paused."""
    ok, reason = pause_confirmed(url, timeout, budget)
    if ok:
        print(f"nodeos at {url} is paused (confirmed)")
        return 0
    print(f"error: could not confirm that nodeos at {url} is paused: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(guard_main())
