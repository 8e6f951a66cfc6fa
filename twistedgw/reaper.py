"""Idle reaping: a periodic sweep that removes sandboxes idle longer than the idle timeout.

Idle means no client attached and no command activity since ``last_activity``. Each sweep first
reconciles the registry with the runtime, so vanished containers are noticed too. A sweep never
raises (a ``LoopingCall`` that raises stops for good) and returns a Deferred, so two sweeps never
overlap.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twistedgw.manager import SandboxManager, SandboxNotFound


class Reaper:
    """Removes idle sandboxes; ``sweep`` is driven by ``make_reaper_service``."""

    _log = Logger()

    def __init__(self, manager: SandboxManager, idle_timeout: float) -> None:
        self.manager = manager
        self.idle_timeout = idle_timeout

    def idle_sandboxes(self) -> list[str]:
        """Ids of sandboxes idle longer than the timeout, right now."""
        now = self.manager.now()
        return [
            s.sandbox_id
            for s in self.manager.registry
            if s.clients == 0 and s.idle_for(now) > self.idle_timeout
        ]

    def sweep(self) -> Deferred[None]:
        """One pass: reconcile, then reap. Logs its own failures; never fails."""
        return Deferred.fromCoroutine(self._sweep())

    async def _sweep(self) -> None:
        try:
            await self.manager.reconcile()
        except Exception:
            # Without a fresh view of Docker we still reap from the cache: an idle sandbox
            # is idle whether or not Docker answered this time.
            self._log.failure("reconciliation failed; reaping from the cached registry")
        for sandbox_id in self.idle_sandboxes():
            try:
                await self.manager.delete(sandbox_id, reason="idle")
            except SandboxNotFound:
                pass  # deleted meanwhile
            except Exception:
                self._log.failure("could not reap sandbox {sandbox_id}", sandbox_id=sandbox_id)
            else:
                self._log.info(
                    "reaped sandbox {sandbox_id}: idle longer than {timeout} s",
                    sandbox_id=sandbox_id,
                    timeout=self.idle_timeout,
                )


def make_reaper_service(reaper: Reaper, interval: float, clock: Any) -> TimerService:
    """A ``TimerService`` running ``reaper.sweep`` every ``interval`` seconds on ``clock``."""
    service = TimerService(interval, reaper.sweep)
    service.clock = clock
    service.setName("reaper")
    return service
