"""A fake clock with asyncio's ``call_later``/``time`` shape, for the agent's timers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FakeHandle:
    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Timers that run only when the test advances the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> FakeHandle:
        handle = FakeHandle(self.now + delay, callback, args)
        self.calls.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = [h for h in self.calls if not h.cancelled and h.when <= self.now]
            if not due:
                return
            handle = min(due, key=lambda h: h.when)
            self.calls.remove(handle)
            handle.callback(*handle.args)

    @property
    def pending(self) -> int:
        return sum(1 for h in self.calls if not h.cancelled)
