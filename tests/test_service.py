"""The wiring's own services (``twistedgw/service.py``): the WebSocket proxy's orderly stop
(clients told 1001 going away, their closing handshakes waited for, boundedly) and clean
shutdown on SIGTERM/SIGINT. A stand-in factory and reactor, a ``Clock`` for time."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from twistedgw.protocol import CLOSE_GOING_AWAY
from twistedgw.service import ProxyService, ShutdownSignals


class Factory:
    """The parts of ``ProxyFactory`` the service uses, recording calls."""

    def __init__(self, clients: int) -> None:
        self.clients = [object() for _ in range(clients)]
        self.calls: list[tuple[Any, ...]] = []

    def doStart(self) -> None:
        self.calls.append(("start",))

    def doStop(self) -> None:
        self.calls.append(("stop",))

    def close_all(self, code: int, reason: str) -> None:
        self.calls.append(("close_all", code, reason))


def test_start_starts_the_websocket_factory() -> None:
    """``Site`` does not start the WebSocket factory; the service does, once."""
    factory = Factory(0)
    service = ProxyService(factory, Clock())  # type: ignore[arg-type]
    service.startService()
    assert factory.calls == [("start",)] and service.running


def test_stop_says_going_away_and_waits_for_clients_to_leave() -> None:
    """Stopping closes every client with 1001 and "gateway shutting down", then waits while
    clients remain (polling every 50 ms), and stops the factory once they are gone."""
    clock = Clock()
    factory = Factory(2)
    service = ProxyService(factory, clock, close_timeout=3.0)  # type: ignore[arg-type]
    service.startService()
    done = service.stopService()
    assert factory.calls[-1] == ("close_all", CLOSE_GOING_AWAY, "gateway shutting down")
    assert CLOSE_GOING_AWAY == 1001
    clock.advance(0.05)
    assert not done.called
    factory.clients.clear()
    clock.advance(0.05)
    assert done.called and factory.calls[-1] == ("stop",)
    assert not service.running


def test_stop_gives_up_waiting_after_the_close_timeout() -> None:
    """Clients that never finish their closing handshake delay shutdown by at most
    ``close_timeout`` seconds."""
    clock = Clock()
    factory = Factory(1)
    service = ProxyService(factory, clock, close_timeout=0.5)  # type: ignore[arg-type]
    service.startService()
    done = service.stopService()
    clock.pump([0.05] * 9)
    assert not done.called
    clock.pump([0.05] * 2)
    assert done.called and factory.calls[-1] == ("stop",)


def test_stop_without_clients_is_immediate() -> None:
    """No clients: the factory is stopped at once, no waiting."""
    factory = Factory(0)
    service = ProxyService(factory, Clock())  # type: ignore[arg-type]
    service.startService()
    done = service.stopService()
    assert done.called and [c[0] for c in factory.calls] == ["start", "close_all", "stop"]


class Reactor:
    def __init__(self, running: bool = True) -> None:
        self.running = running
        self.when_running: list[Any] = []
        self.from_thread: list[Any] = []
        self.stops = 0

    def callWhenRunning(self, f: Any) -> None:
        self.when_running.append(f)

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.from_thread.append(f)
        f(*args)

    def stop(self) -> None:
        self.stops += 1
        if not self.running:
            raise ReactorNotRunning()
        self.running = False


@pytest.fixture
def restore_signals() -> Any:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_handlers_are_installed_once_the_reactor_runs(restore_signals: Any) -> None:
    """SIGTERM and SIGINT handlers replace twistd's only after reactor start-up (when twistd
    installs its own), not at service start."""
    reactor = Reactor()
    service = ShutdownSignals(reactor)
    before = signal.getsignal(signal.SIGTERM)
    service.startService()
    assert signal.getsignal(signal.SIGTERM) == before
    [install] = reactor.when_running
    install()
    assert signal.getsignal(signal.SIGTERM) == service._handle
    assert signal.getsignal(signal.SIGINT) == service._handle


def test_a_signal_is_logged_and_stops_the_reactor_from_the_reactor_thread(
    restore_signals: Any,
) -> None:
    """A signal logs "received SIGTERM, shutting down" and stops the reactor through
    ``callFromThread``; a second signal while stopping is harmless."""
    reactor = Reactor()
    service = ShutdownSignals(reactor)
    with capturedLogs() as events:
        service._handle(signal.SIGTERM, None)
    assert reactor.stops == 1 and reactor.from_thread == [service._stop]
    [event] = [e for e in events if "shutting down" in e.get("log_format", "")]
    assert event["signal"] == "SIGTERM" and event["log_level"] == LogLevel.info
    service._handle(signal.SIGINT, None)
    assert reactor.stops == 2
