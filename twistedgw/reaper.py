"""The periodic sweep: reconcile with Docker, then remove sandboxes past their time.

A sandbox is removed when it has been idle (no client attached and no command activity) longer
than its idle timeout, or when it is past its maximum lifetime (connected or not). Each sweep
first reconciles the registry with the runtime, so vanished containers are noticed even without
events, and ends by saving the state file. A sweep never raises (a ``LoopingCall`` that raises
stops for good) and returns a Deferred, so two sweeps never overlap.

Processes (issue 14): a sandbox whose agent still runs a process (background, yielded, or
left by a closed connection) is not idle, up to its lifetime. The agent owns the processes, so
before warning about or removing an idle sandbox the reaper asks it (a ``processes`` round trip
on a connection of its own); running processes count as activity now. An agent that cannot be
asked counts as having none. Within ``warn_before`` seconds of its idle removal a sandbox's
event streams get ``idle_warning`` (once per idle period).

Several gateways (Swarm backend): each sweeps every sandbox, but removes one only after
taking its lease (``twistedgw.lease``), which also brings the cluster's newest saved facts;
the sandbox must still be due by those. On one host the lease is always granted (``NoLease``).
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twistedgw.lease import ClusterLease, NoLease
from twistedgw.lifecycle.errors import SandboxNotFound
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.sandbox import REASON_IDLE, REASON_LIFETIME, Sandbox
from twistedgw.web.events import SandboxEvents

#: Seconds the reaper waits for an agent's process list.
PROCESS_QUERY_TIMEOUT = 2.0


class Reaper:
    """Removes sandboxes past their time; ``sweep`` is driven by ``make_reaper_service``."""

    _log = Logger()

    def __init__(
        self,
        manager: SandboxManager,
        events: SandboxEvents | None = None,
        warn_before: float = 60.0,
        lease: ClusterLease | NoLease | None = None,
    ) -> None:
        self.manager = manager
        #: Who reaps a sandbox when several gateways serve it (``twistedgw.lease``).
        self.lease = lease or NoLease()
        self.events = events or SandboxEvents()
        self.warn_before = warn_before
        #: sandbox id -> the ``last_activity`` it was warned about (one warning per idle spell).
        self._warned: dict[str, float] = {}

    def due(self) -> list[tuple[str, str]]:
        """``(sandbox_id, reason)`` for every sandbox to remove right now."""
        now = self.manager.now()
        due = []
        for sandbox in self.manager.registry:
            reason = self._reason(sandbox, now)
            if reason is not None:
                due.append((sandbox.sandbox_id, reason))
        return due

    def _reason(self, sandbox: Sandbox, now: float) -> str | None:
        """Why ``sandbox`` is to be removed now, or ``None``."""
        if sandbox.is_lifetime_over(now):
            return REASON_LIFETIME
        if sandbox.paused_at is not None:
            # Paused on purpose: kept for --paused-timeout, whatever its idle timeout.
            if now - sandbox.paused_at > self.manager.paused_timeout:
                return REASON_IDLE
            return None
        if sandbox.is_idle_expired(now):
            return REASON_IDLE
        return None

    async def _leased(self, sandbox_id: str, reason: str) -> str | None:
        """The reason to remove ``sandbox_id`` if this gateway holds its lease (always, on
        one host) and it is still due by the cluster's newest facts; else ``None``."""
        sandbox = self.manager.registry.get(sandbox_id)
        if sandbox is None:
            return None
        granted, saved = await self.lease.try_acquire(sandbox)
        if not granted:
            return None
        if saved is None:
            return reason
        self.manager.merge_saved(sandbox, saved)
        return self._reason(sandbox, self.manager.now())

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
        await self._check_processes()
        for sandbox_id, due_for in self.due():
            leased = await self._leased(sandbox_id, due_for)
            if leased is None:
                continue  # another gateway reaps it, or it is busy after all
            reason = leased
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
                self._warned.pop(sandbox_id, None)
                self._log.info(
                    "reaped sandbox {sandbox_id} (reason: {reason})",
                    sandbox_id=sandbox_id,
                    reason=reason,
                )
        try:
            await self.manager.save_state()
        except Exception:
            self._log.failure("could not save the state file")

    async def _check_processes(self) -> None:
        """Running processes count as activity; warn sandboxes about to be removed idle."""
        manager = self.manager
        for sandbox in list(manager.registry):
            now = manager.now()
            if sandbox.clients or sandbox.is_lifetime_over(now) or sandbox.paused_at is not None:
                continue  # a paused sandbox's agent is frozen: it has --paused-timeout instead
            remaining = sandbox.settings.idle_timeout - sandbox.idle_for(now)
            if remaining > self.warn_before:
                continue
            if await self._running_processes(sandbox) > 0:
                sandbox.touch(manager.now())
                continue
            if self._warned.get(sandbox.sandbox_id) != sandbox.last_activity:
                self._warned[sandbox.sandbox_id] = sandbox.last_activity
                self.events.publish(
                    sandbox.sandbox_id,
                    "idle_warning",
                    {"idle_for": sandbox.idle_for(now), "remove_in": max(0.0, remaining)},
                )
        for sandbox_id in list(self._warned):
            if sandbox_id not in manager.registry:
                del self._warned[sandbox_id]

    async def _running_processes(self, sandbox: Sandbox) -> int:
        """How many processes the sandbox's agent runs now (0 if it cannot be asked)."""
        manager = self.manager
        link: Any = None
        try:
            # Not ``open_agent``: an agent that does not answer is not worth a recovery here.
            link = await manager.agents.connect(
                sandbox.agent_host,
                sandbox.agent_port,
                sandbox.agent_secret,
                timeout=PROCESS_QUERY_TIMEOUT,
                unix_socket=sandbox.agent_socket,
            )
            processes = await manager.agents.list_processes(link, PROCESS_QUERY_TIMEOUT)
        except Exception as e:
            self._log.debug(
                "could not list processes of {sandbox_id}: {error}",
                sandbox_id=sandbox.sandbox_id,
                error=str(e),
            )
            return 0
        finally:
            if link is not None:
                link.close()
        return sum(1 for p in processes if p.get("state") == "running")


def make_reaper_service(reaper: Reaper, interval: float, clock: Any) -> TimerService:
    """A ``TimerService`` running ``reaper.sweep`` every ``interval`` seconds on ``clock``."""
    service = TimerService(interval, reaper.sweep)
    service.clock = clock
    service.setName("reaper")
    return service
