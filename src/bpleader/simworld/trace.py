"""The readable record of one simulated run: what happened, when, on which node."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class Trace:
    """Timestamped lines; only the last ``keep`` are kept unless ``keep`` is None.

    A violation report needs the events that led to it, not the whole run, and keeping
    every line of a long exploration would cost memory for nothing.
    """

    def __init__(self, now: Callable[[], float], keep: int | None = 400) -> None:
        self._now = now
        self.lines: deque[str] = deque(maxlen=keep)
        self.count = 0

    def add(self, who: str, text: str) -> None:
        self.count += 1
        self.lines.append(f"{self._now():9.3f} {who:<7} {text}")

    def text(self) -> str:
        return "\n".join(self.lines)
