"""Bounded exponential backoff for redialling, with the clock and the randomness injected."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays ``initial * factor**n`` seconds, capped at ``maximum``, each scaled by a random
    factor in ``[1 - jitter, 1]``; at most ``attempts`` of them (then the caller gives up)."""

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 5.0
    attempts: int = 8
    jitter: float = 0.2

    def delays(self, rand: Callable[[], float] = random.random) -> Iterator[float]:
        """The waits before each redial, in order (``attempts`` of them)."""
        delay = self.initial
        for _ in range(self.attempts):
            yield min(delay, self.maximum) * (1.0 - self.jitter * rand())
            delay *= self.factor

    def total(self) -> float:
        """The longest the whole sequence can wait (no jitter)."""
        return sum(self.delays(rand=lambda: 0.0))
