"""Fencing: pausing nodeos when the lease can no longer be trusted, whatever else hangs.

Three independent fences, each a layer of DESIGN.md:

* :class:`ThreadFence` (layer 3) lives in the agent process but not in its event loop: a
  blocked etcd or nodeos call cannot stop it from pausing at ``deadline - fence_guard``.
* :class:`GuardProcess` (layer 8) keeps a separate process (:mod:`bpleader.guard`) armed
  with the same time. If the agent is frozen (SIGSTOP) or killed, the guard pauses nodeos
  when the time passes, and keeps it paused until the agent arms it again.
* ``bpleader fence`` (:func:`fence_command`), run by systemd's ``ExecStopPost``, pauses
  and confirms after the service stopped for any reason.

All of them use :func:`bpleader.guard.pause_confirmed`, which trusts nothing but
``/v1/producer/paused`` reading ``true``. Times are on :func:`bpleader.clock.boottime`,
shared by every process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from bpleader.clock import boottime
from bpleader.config import redact_url
from bpleader.guard import GUARD_URL_ENV, pause_confirmed

log = logging.getLogger(__name__)


# The fence thread's longest wait: after a machine suspend it fires this late at most.
STEP = 0.25


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
            # A later time needs no wake-up: the thread looks again at its next step.
            # The leader moves it out at every renewal.
            later = self._pause_at is not None and pause_at >= self._pause_at
            self._pause_at = pause_at
            if not later:
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
                    # Steps of at most STEP: a wait on the monotonic clock does not count
                    # a suspend, the boottime deadline does; after a resume the thread
                    # fires within one step (the guard process within its own).
                    self._cond.wait(min(left, STEP))
                    continue
                self._pause_at = None
            self.fired += 1
            ok, reason = self._pause()
            log.warning("%s event=fence_fired source=thread confirmed=%s reason=%r",
                        self._describe(), ok, reason)


class GuardProcess:
    """Layer 8, agent side: spawns ``python -m bpleader.guard`` and keeps it armed.

    Commands are single lines on the guard's stdin; writing them never blocks for long
    (a pipe holds many lines) and a dead guard is restarted on the next command.
    """

    def __init__(self, url: str, timeout: float, check_interval: float, node: str,
                 kill_command: str | None = None) -> None:
        # The URL goes in the environment: a process list shows the command line to
        # every local user, so it only shows the URL with its password redacted.
        self._env = {**os.environ, GUARD_URL_ENV: url}
        self._argv = [sys.executable, "-m", "bpleader.guard", "--url", redact_url(url),
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
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, env=self._env,
                                      start_new_session=True)

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
        if b"bpleader.guard" in cmd and wanted & set(cmd):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_dir.name), signal.SIGKILL)


def fence_command(url: str, timeout: float, budget: float) -> int:
    """``bpleader fence``: exit 0 only when nodeos confirms it is paused."""
    ok, reason = pause_confirmed(url, timeout, budget)
    shown = redact_url(url)
    if ok:
        print(f"nodeos at {shown} is paused (confirmed)")
        return 0
    print(f"error: could not confirm that nodeos at {shown} is paused: {reason}",
          file=sys.stderr)
    return 1

