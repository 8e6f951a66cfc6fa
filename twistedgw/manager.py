"""``SandboxManager``: the sandbox lifecycle, between the edges and the container runtime.

Creates (container, then wait for its agent), deletes (container, then forget and disconnect
clients), and reconciles the registry with the runtime, which is the source of truth: running
containers of ours are adopted, vanished ones are forgotten, dead ones are removed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twistedgw.agentlink import AgentSide, AgentUnavailable, connect_agent, wait_for_agent
from twistedgw.runtime import ContainerInfo, ContainerSpec, IContainerRuntime
from twistedgw.sandbox import (
    Sandbox,
    SandboxRegistry,
    is_valid_sandbox_id,
    new_agent_secret,
    new_sandbox_id,
)

#: WebSocket close code for "the sandbox went away under you" (1011: server error).
CLOSE_SANDBOX_GONE = 1011
#: WebSocket close code when the sandbox was deleted on purpose (1000 would read as "all fine").
CLOSE_SANDBOX_DELETED = 4000


class SandboxNotFound(Exception):
    """No sandbox with that id (or not one this gateway may show)."""


class SandboxManager(Service):
    """Owns the sandbox lifecycle; every method runs on the reactor thread."""

    _log = Logger()

    def __init__(
        self,
        registry: SandboxRegistry,
        runtime: IContainerRuntime,
        reactor: Any,
        agent_ready_timeout: float = 30.0,
        agent_connect_timeout: float = 10.0,
        max_message_size: int = 0,
        wait_ready: Callable[[ContainerInfo], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.runtime = runtime
        self._reactor = reactor
        self._agent_ready_timeout = agent_ready_timeout
        self._agent_connect_timeout = agent_connect_timeout
        self._max_message_size = max_message_size
        # Sandbox ids whose container is being created or removed right now: reconciliation
        # must neither adopt nor remove those.
        self._in_flight: set[str] = set()
        self._wait_ready = wait_ready or self._wait_for_agent

    # -- Service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self.reconcile())
        d.addErrback(
            lambda f: self._log.failure(
                "could not recover sandboxes at start-up; will retry on the next sweep", f
            )
        )

    # -- lookups ---------------------------------------------------------------------------

    def lookup(self, sandbox_id: str) -> Sandbox:
        """The sandbox with this id; raises ``SandboxNotFound``.

        Ids that cannot be ours are refused before any lookup, so attacker text never travels
        further than this check.
        """
        sandbox = self.registry.get(sandbox_id) if is_valid_sandbox_id(sandbox_id) else None
        if sandbox is None:
            raise SandboxNotFound(sandbox_id)
        return sandbox

    def now(self) -> float:
        """Wall-clock seconds (epoch), from the injected reactor/clock."""
        return float(self._reactor.seconds())

    # -- lifecycle -------------------------------------------------------------------------

    async def create(self) -> Sandbox:
        """Create a sandbox and return it once its agent answers."""
        sandbox_id = new_sandbox_id()
        spec = ContainerSpec(
            sandbox_id=sandbox_id, created_at=self.now(), agent_secret=new_agent_secret()
        )
        self._in_flight.add(sandbox_id)
        try:
            started = self.now()
            info = await self.runtime.create(spec)
            self._log.info(
                "created container for sandbox {sandbox_id} in {ms:.0f} ms",
                sandbox_id=sandbox_id,
                ms=(self.now() - started) * 1000,
            )
            try:
                await self._wait_ready(info)
            except AgentUnavailable:
                self._log.warn(
                    "agent of sandbox {sandbox_id} never became ready; removing it",
                    sandbox_id=sandbox_id,
                )
                await self.runtime.remove(info.container_id)
                raise
            sandbox = self._sandbox_from(info)
            self.registry.add(sandbox)
            self._log.info(
                "sandbox {sandbox_id} ready in {ms:.0f} ms",
                sandbox_id=sandbox_id,
                ms=(self.now() - started) * 1000,
            )
            return sandbox
        finally:
            self._in_flight.discard(sandbox_id)

    async def delete(self, sandbox_id: str, reason: str = "deleted") -> Sandbox:
        """Remove a sandbox's container, forget it, and disconnect its clients.

        If the runtime fails, the sandbox stays registered (nothing is lost) and the error
        propagates.
        """
        sandbox = self.lookup(sandbox_id)
        self._in_flight.add(sandbox_id)
        try:
            await self.runtime.remove(sandbox.container_id)
        finally:
            self._in_flight.discard(sandbox_id)
        self._forget(sandbox, CLOSE_SANDBOX_DELETED, f"sandbox {reason}")
        self._log.info(
            "removed sandbox {sandbox_id} (reason: {reason})", sandbox_id=sandbox_id, reason=reason
        )
        return sandbox

    async def reconcile(self) -> None:
        """Bring the registry in line with the runtime (the source of truth)."""
        infos = await self.runtime.list_containers()
        seen: set[str] = set()
        for info in infos:
            if not is_valid_sandbox_id(info.sandbox_id) or info.sandbox_id in self._in_flight:
                continue
            seen.add(info.sandbox_id)
            known = self.registry.get(info.sandbox_id)
            if info.running and info.agent_port and info.agent_secret:
                if known is None:
                    self.registry.add(self._sandbox_from(info))
                    self._log.info(
                        "adopted running sandbox {sandbox_id}", sandbox_id=info.sandbox_id
                    )
                continue
            # A container of ours that is not running cannot serve anyone: remove it.
            self._log.warn(
                "sandbox {sandbox_id}: container is not running; removing it",
                sandbox_id=info.sandbox_id,
            )
            self._in_flight.add(info.sandbox_id)
            try:
                await self.runtime.remove(info.container_id)
            finally:
                self._in_flight.discard(info.sandbox_id)
            if known is not None:
                self._forget(known, CLOSE_SANDBOX_GONE, "sandbox container exited")
        for sandbox in self.registry:
            if sandbox.sandbox_id not in seen and sandbox.sandbox_id not in self._in_flight:
                self._log.warn(
                    "sandbox {sandbox_id}: container vanished; forgetting it",
                    sandbox_id=sandbox.sandbox_id,
                )
                self._forget(sandbox, CLOSE_SANDBOX_GONE, "sandbox container is gone")

    def open_agent(self, sandbox: Sandbox) -> Deferred[AgentSide]:
        """Open a new agent connection for one client of ``sandbox``."""
        return connect_agent(
            self._reactor,
            sandbox.agent_host,
            sandbox.agent_port,
            sandbox.agent_secret,
            timeout=self._agent_connect_timeout,
            max_message_size=self._max_message_size,
        )

    # -- internals -------------------------------------------------------------------------

    async def _wait_for_agent(self, info: ContainerInfo) -> None:
        await wait_for_agent(
            self._reactor,
            info.agent_host,
            info.agent_port,
            info.agent_secret,
            self._agent_ready_timeout,
        )

    def _forget(self, sandbox: Sandbox, code: int, reason: str) -> None:
        self.registry.remove(sandbox.sandbox_id)
        for client in list(sandbox.attachments):
            try:
                client.disconnect(code, reason)
            except Exception:
                self._log.failure("disconnecting a client failed")
        sandbox.attachments.clear()

    def _sandbox_from(self, info: ContainerInfo) -> Sandbox:
        return Sandbox(
            sandbox_id=info.sandbox_id,
            container_id=info.container_id,
            created_at=info.created_at,
            ip_address=info.ip_address,
            agent_host=info.agent_host,
            agent_port=info.agent_port,
            agent_secret=info.agent_secret,
            last_activity=self.now(),
        )
