"""The simulated guard: the :class:`bpleader.agent.Fencer` of one agent process.

It stands for production's fence thread and guard process together, and behaves as the
guard (:func:`bpleader.guard.guard_main`): from the armed time on (on the host's clock)
it reads ``paused`` every check interval and pauses, confirmed, whenever nodeos is not
paused, until it is re-armed later or disarmed. It runs on the world's loop, outside the
agent process: freezing the agent does not freeze it, and when the agent dies an armed
guard still fences at its time, then exits (a disarmed one exits at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bpleader.guard import GIVE_UP_AFTER, kill_after
from bpleader.nodeos import NodeosError
from bpleader.simworld.clocks import HostClock
from bpleader.simworld.loop import SimLoop
from bpleader.simworld.nodeos import NodeosClient, SimNodeos
from bpleader.simworld.trace import Trace

# Local and true time convert through a rate: equal instants may differ by rounding.
ROUNDING = 1e-6

class SimGuard:
    def __init__(self, loop: SimLoop, host: HostClock, nodeos: SimNodeos, timeout: float,
                 check_interval: float, trace: Trace,
                 kill: Callable[[], None] | None = None,
                 confirm_for: float | None = None) -> None:
        self.kill = kill  # nodeos.kill_command: stop the nodeos process
        # How long it tries to confirm a pause before the kill: the real guard's, unless
        # a scenario undoes that bound.
        self.confirm_for = kill_after(timeout) if confirm_for is None else confirm_for
        self._killed_for: float | None = None
        self.loop = loop
        self.host = host
        self.name = nodeos.name
        self.client = NodeosClient(nodeos, timeout, None, "guard")
        self.timeout = timeout
        self.check_interval = check_interval
        self.trace = trace
        self.pause_at: float | None = None
        self.orphaned = False
        self.exited = False
        self.fired = 0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ Fencer API

    def arm(self, pause_at: float) -> None:
        if self.exited:
            return
        self.pause_at = pause_at
        self._schedule()

    def disarm(self) -> None:
        self.pause_at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------- lifecycle

    def orphan(self) -> None:
        """The agent is gone (crash or exit): fence if armed, then exit."""
        self.orphaned = True
        if self.pause_at is None:
            self._exit()

    def _exit(self) -> None:
        self.exited = True
        self.disarm()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self.pause_at is not None
        when = max(self.host.to_true(self.pause_at), self.loop.time())
        self._timer = self.loop.call_at(when, self._due)

    def _due(self) -> None:
        self._timer = None
        if self.pause_at is None or self.exited:
            return
        # The clock's rate changed since arming. The tolerance absorbs float rounding of
        # local -> true -> local time, which would otherwise reschedule at this very
        # instant forever and stop virtual time.
        if self.host.now() < self.pause_at - ROUNDING:
            self._schedule()
        elif self._task is None:
            self._task = self.loop.spawn(self._enforce(), None)

    async def _enforce(self) -> None:
        try:
            while self.pause_at is not None and self.host.now() >= self.pause_at - ROUNDING:
                if self.orphaned and self.host.now() > self.pause_at + GIVE_UP_AFTER:
                    self.trace.add(self.name, "guard gave up: pause never confirmed")
                    self._exit()
                    return
                # Always an explicit pause, as bpleader.guard.guard_main: an implicit
                # pause reads true and lifts by itself.
                self.fired += 1
                confirmed = await self._pause_confirmed(self.confirm_for)
                self.trace.add(self.name, f"guard fired: confirmed={confirmed}")
                if not confirmed and self.kill is not None and \
                        self._killed_for != self.pause_at:
                    self._killed_for = self.pause_at
                    self.trace.add(self.name, "guard ran the kill command")
                    self.kill()
                if self.orphaned and confirmed:
                    self._exit()
                    return
                await asyncio.sleep(self.check_interval / self.host.rate)
        finally:
            self._task = None
        if self.pause_at is not None:
            self._schedule()  # re-armed for later while enforcing

    async def _pause_confirmed(self, budget: float) -> bool:
        deadline = self.loop.time() + budget
        while True:
            try:
                await self.client.pause()
                if await self.client.paused():
                    return True
            except NodeosError:
                pass
            if self.loop.time() + 0.1 >= deadline:
                return False
            await asyncio.sleep(0.1)
