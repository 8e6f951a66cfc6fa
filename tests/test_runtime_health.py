"""``DockerRuntime``'s health check, without an engine: a ping that answers at once, and a
docker thread pool kept busy by calls that do not come back yet."""

from __future__ import annotations

import threading
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from twistedgw.runtime.docker import DockerRuntime


class PingOnlyRuntime(DockerRuntime):
    """A ``DockerRuntime`` whose engine answers every ping at once."""

    pings = 0

    def _thd_ping(self) -> None:
        self.pings += 1


@pytest_twisted.ensureDeferred
async def test_saturated_docker_pool_does_not_mark_the_engine_down() -> None:
    """While every docker thread is busy (a burst of creates), the health ping still gets an
    answer in time, so a busy but healthy engine is not reported down (no false 503s)."""
    # A health interval of a second (each ping's deadline): long enough for a thread to run
    # on a loaded 2-core machine, far shorter than the 30 s the busy calls wait.
    runtime = PingOnlyRuntime(reactor, image="unused", threads=2, health_interval=1.0)
    release = threading.Event()
    runtime.startService()
    busy: list[Any] = []
    try:
        # More slow calls than threads: the pool is saturated and calls queue.
        busy = [runtime._defer(release.wait, 30) for _ in range(4)]
        for _ in range(50):  # until two pings were answered (about 1 s), the engine up throughout
            await deferLater(reactor, 0.1, lambda: None)
            assert runtime.available
            if runtime.pings >= 2:
                break
        assert runtime.pings >= 2
        assert runtime.available
    finally:
        release.set()
        for d in busy:
            await d
        await runtime.stopService()
    assert runtime.available


@pytest_twisted.ensureDeferred
async def test_unanswered_ping_marks_the_engine_down() -> None:
    """A ping that does not come back within the health interval marks the engine down."""

    class StuckPing(DockerRuntime):
        def _thd_ping(self) -> None:
            stuck.wait(30)

    stuck = threading.Event()
    runtime = StuckPing(reactor, image="unused", threads=2, health_interval=0.3)
    runtime.startService()
    try:
        await deferLater(reactor, 0.6, lambda: None)
        assert not runtime.available
    finally:
        stuck.set()
        await runtime.stopService()
