"""``Shared``: one operation's outcome for any number of waiters."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")


class Shared(Generic[T]):
    """One operation's outcome handed to any number of followers.

    A follower's cancellation (a client that went away) does not cancel the operation.
    """

    _log = Logger()

    def __init__(self, source: Deferred[T]) -> None:
        self._result: Any = None
        self._done = False
        self._followers: list[Deferred[T]] = []
        source.addBoth(self._fire)

    def _fire(self, result: Any) -> None:
        self._done, self._result = True, result
        followers, self._followers = self._followers, []
        for follower in followers:
            self._deliver(follower)
        if isinstance(result, Failure) and not followers:
            self._log.failure("a shared operation failed with nobody waiting", result)

    def _deliver(self, follower: Deferred[T]) -> None:
        if follower.called:
            return  # cancelled by its caller
        if isinstance(self._result, Failure):
            follower.errback(self._result)
        else:
            follower.callback(self._result)

    def follow(self) -> Deferred[T]:
        follower: Deferred[T] = Deferred()
        if self._done:
            self._deliver(follower)
        else:
            self._followers.append(follower)
        return follower
