"""Each simulated host's clocks, with a bounded rate error.

A host's monotonic clock (``CLOCK_BOOTTIME``) runs at ``rate`` times true time: the
agent's lease deadlines and its guard's fence time are both on it, as in production where
both read the same host clock. Its wall clock is true time plus a small fixed skew (NTP
keeps it close, but never exact), and is only compared with block timestamps.
"""

from __future__ import annotations

import asyncio

from bpleader.simworld.process import Process

# Virtual time 0 on the wall clock: an arbitrary but fixed date, so traces replay.
EPOCH = 1_780_000_000.0


class HostClock:
    """A host's oscillator: local = anchor_local + (true - anchor_true) * rate."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rate: float, boot: float,
                 wall_skew: float) -> None:
        self.loop = loop
        self.rate = rate
        self.wall_skew = wall_skew
        self._anchor_true = loop.time()
        self._anchor_local = boot

    def now(self) -> float:
        return self._anchor_local + (self.loop.time() - self._anchor_true) * self.rate

    def wall(self) -> float:
        return EPOCH + self.loop.time() + self.wall_skew

    def to_true(self, local: float) -> float:
        """The true time at which this clock will read ``local``."""
        return self._anchor_true + (local - self._anchor_local) / self.rate

    def set_rate(self, rate: float) -> None:
        self._anchor_local = self.now()
        self._anchor_true = self.loop.time()
        self.rate = rate


class ProcClock:
    """The :class:`bpleader.clock.Clock` an agent process sees; its sleeps obey freezes."""

    def __init__(self, host: HostClock, process: Process) -> None:
        self.host = host
        self.process = process

    def now(self) -> float:
        return self.host.now()

    def wall(self) -> float:
        return self.host.wall()

    async def sleep(self, seconds: float) -> None:
        await self.process.gate()
        await asyncio.sleep(max(0.0, seconds) / self.host.rate)
        await self.process.gate()
