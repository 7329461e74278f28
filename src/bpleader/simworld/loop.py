"""A deterministic asyncio event loop on virtual time.

The simulated world has no real I/O: every wait is a timer. So the loop's selector never
blocks; asked to wait ``timeout`` seconds for I/O, it advances the virtual clock by
exactly that much (to the next timer) and reports no events. Everything that runs on the
loop therefore sees time jump from one event to the next, and the order of callbacks
depends only on the order in which they were scheduled: a seed replays byte for byte.

Tasks are tagged with the simulated *process* that created them (through a context
variable that tasks inherit), so that a crash can cancel every task of one agent, and a
freeze can be enforced at that process's I/O points (see :mod:`bpleader.simworld.process`).
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class SimDeadlock(RuntimeError):
    """Nothing is ready and no timer is scheduled: the simulated world stopped moving."""


class TaskOwner(Protocol):
    def adopt(self, task: asyncio.Task[Any]) -> None: ...


CURRENT_OWNER: contextvars.ContextVar[TaskOwner | None] = contextvars.ContextVar(
    "simworld_owner", default=None)


class VirtualSelector(selectors.SelectSelector):
    """Registers file descriptors like a real selector but never polls them.

    Only the loop's own self-pipe is ever registered; nothing writes to it because the
    simulation uses no threads.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.before_advance: Callable[[], None] = lambda: None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimDeadlock("no callback is ready and no timer is scheduled")
        if timeout > 0:
            # The world's invariants are checked whenever virtual time is about to move:
            # every state reached at one instant has been reached by then.
            self.before_advance()
            self.now += timeout
        return []


class SimLoop(asyncio.SelectorEventLoop):
    """``asyncio`` on virtual time; ``time()`` is the simulated (true) time in seconds."""

    def __init__(self) -> None:
        self._virtual = VirtualSelector()
        super().__init__(self._virtual)
        # Timers due within this much of "now" run now; virtual time has no jitter, this
        # only absorbs float rounding of now + (when - now).
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual.now

    def set_before_advance(self, hook: Callable[[], None]) -> None:
        self._virtual.before_advance = hook

    def create_task(self, coro: Any, *, name: str | None = None,  # type: ignore[override]
                    context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = super().create_task(coro, name=name, context=context)
        owner = context.get(CURRENT_OWNER) if context is not None else CURRENT_OWNER.get()
        if owner is not None:
            owner.adopt(task)
        return task

    def spawn(self, coro: Coroutine[Any, Any, T], owner: TaskOwner | None,
              name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as a task of ``owner`` (None: of the world itself)."""
        ctx = contextvars.copy_context()
        ctx.run(CURRENT_OWNER.set, owner)
        return self.create_task(coro, name=name, context=ctx)
