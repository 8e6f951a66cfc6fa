"""The periodic sweep: reconcile with Docker, then remove sandboxes past their time.

A sandbox is removed when it has been idle (no client attached and no command activity) longer
than its idle timeout, or when it is past its maximum lifetime (connected or not). Each sweep
first reconciles the registry with the runtime, so vanished containers are noticed even without
events, and ends by saving the state file. A sweep never raises (a ``LoopingCall`` that raises
stops for good) and returns a Deferred, so two sweeps never overlap.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twistedgw.lifecycle.errors import SandboxNotFound
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.sandbox import REASON_IDLE, REASON_LIFETIME


class Reaper:
    """Removes sandboxes past their time; ``sweep`` is driven by ``make_reaper_service``."""

    _log = Logger()

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager

    def due(self) -> list[tuple[str, str]]:
        """``(sandbox_id, reason)`` for every sandbox to remove right now."""
        now = self.manager.now()
        due = []
        for sandbox in self.manager.registry:
            if sandbox.is_lifetime_over(now):
                due.append((sandbox.sandbox_id, REASON_LIFETIME))
            elif sandbox.paused_at is not None:
                # Paused on purpose: kept for --paused-timeout, whatever its idle timeout.
                if now - sandbox.paused_at > self.manager.paused_timeout:
                    due.append((sandbox.sandbox_id, REASON_IDLE))
            elif sandbox.is_idle_expired(now):
                due.append((sandbox.sandbox_id, REASON_IDLE))
        return due

    def sweep(self) -> Deferred[None]:
        """One pass: reconcile, reap, save state. Logs its own failures; never fails."""
        return Deferred.fromCoroutine(self._sweep())

    async def _sweep(self) -> None:
        try:
            await self.manager.reconcile()
        except Exception:
            # Without a fresh view of Docker we still reap from the cache: an idle sandbox
            # is idle whether or not Docker answered this time (and removal needs Docker
            # anyway, so nothing is forgotten while it is away).
            self._log.failure("reconciliation failed; reaping from the cached registry")
        for sandbox_id, reason in self.due():
            try:
                await self.manager.delete(sandbox_id, reason=reason)
            except SandboxNotFound:
                pass  # deleted meanwhile
            except Exception:
                self._log.failure(
                    "could not remove sandbox {sandbox_id} ({reason})",
                    sandbox_id=sandbox_id,
                    reason=reason,
                )
            else:
                self._log.info(
                    "reaped sandbox {sandbox_id} (reason: {reason})",
                    sandbox_id=sandbox_id,
                    reason=reason,
                )
        try:
            await self.manager.save_state()
        except Exception:
            self._log.failure("could not save the state file")


def make_reaper_service(reaper: Reaper, interval: float, clock: Any) -> TimerService:
    """A ``TimerService`` running ``reaper.sweep`` every ``interval`` seconds on ``clock``."""
    service = TimerService(interval, reaper.sweep)
    service.clock = clock
    service.setName("reaper")
    return service
