"""Services the wiring adds besides the runtime, the manager and the site: the WebSocket
proxy's start and orderly stop (``ProxyService``) and clean shutdown on signals
(``ShutdownSignals``)."""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import deferLater
from twisted.logger import Logger

from twistedgw.protocol import CLOSE_GOING_AWAY
from twistedgw.proxy.client import ProxyFactory


class ProxyService(Service):
    """Starts the WebSocket factory (``Site`` does not); on shutdown closes every client with
    1001 (going away) and waits, boundedly, for the closing handshakes."""

    def __init__(self, factory: ProxyFactory, clock: Any, close_timeout: float = 3.0) -> None:
        self.factory = factory
        self._clock = clock
        self._close_timeout = close_timeout

    def startService(self) -> None:
        super().startService()
        self.factory.doStart()

    async def _stop(self) -> None:
        self.factory.close_all(CLOSE_GOING_AWAY, "gateway shutting down")
        deadline = self._clock.seconds() + self._close_timeout
        while self.factory.clients and self._clock.seconds() < deadline:
            await deferLater(self._clock, 0.05, lambda: None)
        self.factory.doStop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


class ShutdownSignals(Service):
    """SIGTERM and SIGINT stop the gateway cleanly and exit 0.

    twistd's own handlers stop the reactor too, but then re-raise the signal at exit, so a
    clean, complete shutdown would look like a kill to supervisors and scripts.
    """

    _log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        # After reactor start-up, which is when twistd installs its handlers.
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self._log.info("received {signal}, shutting down", signal=signal.Signals(signum).name)
        self._reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # a second signal while already stopping
