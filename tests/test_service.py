"""The WebSocket proxy's service (``twistedgw.service``): it starts the factory, and on
shutdown closes every client with 1001 and waits, boundedly, for them to go; and the signal
handling that stops the reactor once."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import Clock

from twistedgw.protocol import CLOSE_GOING_AWAY
from twistedgw.service import ProxyService, ShutdownSignals


class FakeFactory:
    def __init__(self, clients: int) -> None:
        self.clients = {f"c{i}" for i in range(clients)}
        self.closed: list[tuple[int, str]] = []
        self.started = self.stopped = 0

    def close_all(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def doStart(self) -> None:
        self.started += 1

    def doStop(self) -> None:
        self.stopped += 1


def test_start_starts_the_factory() -> None:
    """Starting the service starts the factory (a ``Site`` would not)."""
    factory = FakeFactory(0)
    service = ProxyService(factory, Clock())  # type: ignore[arg-type]
    service.startService()
    assert service.running and factory.started == 1


def test_stop_closes_clients_with_going_away_and_waits_for_them() -> None:
    """Stopping closes every client with 1001 ``gateway shutting down``, then waits until the
    clients are gone before stopping the factory and firing."""
    clock = Clock()
    factory = FakeFactory(2)
    service = ProxyService(factory, clock, close_timeout=3.0)  # type: ignore[arg-type]
    service.startService()
    stopped = service.stopService()
    fired: list[object] = []
    stopped.addCallback(fired.append)
    assert factory.closed == [(CLOSE_GOING_AWAY, "gateway shutting down")]
    assert CLOSE_GOING_AWAY == 1001
    assert not service.running
    clock.advance(0.05)
    assert fired == [] and factory.stopped == 0
    factory.clients.clear()
    clock.advance(0.05)
    assert fired == [None] and factory.stopped == 1
    assert clock.seconds() < 1.0


def test_stop_gives_up_waiting_at_the_close_timeout() -> None:
    """Clients that never go do not hold shutdown beyond ``close_timeout`` seconds."""
    clock = Clock()
    factory = FakeFactory(1)
    service = ProxyService(factory, clock, close_timeout=2.0)  # type: ignore[arg-type]
    service.startService()
    fired: list[object] = []
    service.stopService().addCallback(fired.append)
    clock.pump([0.05] * 39)
    assert fired == [] and factory.stopped == 0
    clock.pump([0.05] * 2)
    assert fired == [None] and factory.stopped == 1


def test_stop_without_clients_is_immediate() -> None:
    """With no clients, stopping fires at once and stops the factory."""
    factory = FakeFactory(0)
    service = ProxyService(factory, Clock())  # type: ignore[arg-type]
    service.startService()
    fired: list[object] = []
    service.stopService().addCallback(fired.append)
    assert fired == [None] and factory.stopped == 1


class FakeReactor:
    def __init__(self) -> None:
        self.when_running: list[Any] = []
        self.from_thread: list[Any] = []
        self.stops = 0

    def callWhenRunning(self, f: Any) -> None:
        self.when_running.append(f)

    def callFromThread(self, f: Any) -> None:
        self.from_thread.append(f)

    def stop(self) -> None:
        self.stops += 1
        if self.stops > 1:
            raise ReactorNotRunning()


def test_signals_stop_the_reactor_once() -> None:
    """SIGTERM and SIGINT handlers are installed once the reactor runs; a signal stops the
    reactor from the reactor thread, and a second one while stopping is harmless."""
    reactor = FakeReactor()
    service = ShutdownSignals(reactor)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.startService()
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        [install] = reactor.when_running
        install()
        for signum in (signal.SIGTERM, signal.SIGINT):
            assert signal.getsignal(signum) == service._handle
        service._handle(signal.SIGTERM, None)
        service._handle(signal.SIGINT, None)
        assert reactor.stops == 0
        for call in reactor.from_thread:
            call()
        assert reactor.stops == 2
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
