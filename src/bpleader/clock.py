"""Time sources for the agent.

The decision core never calls ``time`` directly: it is handed a :class:`Clock`, so the
production agent counts lease deadlines on a clock that keeps running through a machine
suspend, and the deterministic simulation can run the very same core on virtual time.
"""

from __future__ import annotations

import time
from typing import Protocol

BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def boottime() -> float:
    """Monotonic seconds that include time spent suspended (falls back to monotonic).

    A lease deadline measured on ``CLOCK_MONOTONIC`` stops while the machine sleeps, so a
    thawed leader would think its lease still had time left. ``CLOCK_BOOTTIME`` does not
    stop, and it is shared by every process on the host, which lets the agent hand its
    deadline to the guard process as a plain number.
    """
    if BOOTTIME is not None:
        return time.clock_gettime(BOOTTIME)
    return time.monotonic()


class Clock(Protocol):
    """What the core needs of time: a deadline clock, the wall clock, and a way to wait."""

    def now(self) -> float:
        """Monotonic seconds for deadlines (never goes back)."""
        ...

    def wall(self) -> float:
        """POSIX seconds, compared with nodeos's block timestamps."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait without blocking other tasks."""
        ...


class SystemClock:
    """The real clocks of this host."""

    def now(self) -> float:
        return boottime()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        import asyncio  # here, not at the top: the guard process imports boottime only

        await asyncio.sleep(max(0.0, seconds))
