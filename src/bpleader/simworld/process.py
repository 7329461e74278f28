"""A simulated agent process: its tasks, and SIGSTOP/SIGCONT/SIGKILL on virtual time.

A real process can be stopped at any instruction; here the agent's code runs between two
awaits in zero virtual time, so stopping it at its next I/O point is the same thing. Every
call the agent makes to the outside world (sleep, etcd, nodeos) passes :meth:`gate` on the
way in and on the way out:

* frozen: the call does not start, or its answer is not handed back, until the thaw; a
  request already sent still reaches etcd or nodeos (it is on the wire), as with SIGSTOP;
* killed: every task is cancelled; requests already sent still land.

The fencer is deliberately *not* a task of the process: it stands for the guard process,
which a freeze or a crash of the agent does not stop.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Process:
    def __init__(self, loop: asyncio.AbstractEventLoop, node: str, incarnation: int) -> None:
        self.loop = loop
        self.node = node
        self.name = f"{node}#{incarnation}"
        self.alive = True
        self.frozen = False
        # dicts keep insertion order, so cancellation order does not depend on hashes.
        self.tasks: dict[asyncio.Task[Any], None] = {}
        self._waiters: list[asyncio.Future[None]] = []

    def adopt(self, task: asyncio.Task[Any]) -> None:
        self.tasks[task] = None
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self.tasks.pop(task, None)

    async def gate(self) -> None:
        """Return only while the process runs; raise CancelledError once it is dead."""
        if not self.alive:
            raise asyncio.CancelledError
        while self.frozen:
            # One future per waiter: cancelling one waiting task must not wake the others.
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._waiters.append(waiter)
            await waiter
            if not self.alive:
                raise asyncio.CancelledError

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def kill(self) -> None:
        """SIGKILL: works on a frozen process too."""
        self.alive = False
        self.frozen = False
        self._waiters.clear()
        for task in list(self.tasks):
            task.cancel()
