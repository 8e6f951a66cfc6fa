"""The lifecycle's shared state and the small operations every part uses: the clock, the
in-flight and touched bookkeeping that keeps reconciliation off ids being changed, and how a
sandbox is forgotten (tombstone, clients disconnected) or built from a container.

``SandboxManager`` (``manager.py``) builds on ``Reconciliation`` (``reconcile.py``), which
builds on ``WarmPool`` (``pool.py``), which builds on this; ``SandboxManager.__init__`` sets
every attribute declared here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twistedgw.lifecycle.errors import InvalidSettings, Recovering
from twistedgw.lifecycle.options import LifecyclePolicy
from twistedgw.lifecycle.templates import TemplateCatalog
from twistedgw.metrics import GatewayMetrics
from twistedgw.protocol import CLOSE_AGENT_LOST
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import ContainerInfo, ContainerSpec, IContainerRuntime
from twistedgw.sandbox import Graveyard, Sandbox, SandboxSettings, Tombstone, new_agent_secret
from twistedgw.state import SavedSandbox, StateStore

#: WebSocket close code for "the sandbox went away under you" (1011: server error).
CLOSE_SANDBOX_GONE = CLOSE_AGENT_LOST


class LifecycleCore(Service):
    """State and helpers shared by the warm pool, reconciliation and the manager."""

    _log = Logger()

    registry: SandboxRegistry
    runtime: IContainerRuntime
    policy: LifecyclePolicy
    templates: TemplateCatalog
    graveyard: Graveyard
    metrics: GatewayMetrics
    recovered: bool
    _reactor: Any
    _state: StateStore
    _saved: dict[str, SavedSandbox]
    _in_flight: set[str]
    _touched: set[str] | None
    _wait_ready: Callable[[ContainerInfo], Awaitable[None]]

    def _check_recovered(self) -> None:
        if not self.recovered:
            raise Recovering("the gateway is still recovering its sandboxes from Docker")

    def save_state(self) -> Deferred[None]:
        """Persist what labels cannot hold (last activity, lifetime extensions)."""
        return self._state.save(self.registry)

    def now(self) -> float:
        """Wall-clock seconds (epoch), from the injected reactor/clock."""
        return float(self._reactor.seconds())

    async def _remove_dead(self, sandbox_id: str, container_id: str) -> None:
        self._begin(sandbox_id)
        try:
            await self.runtime.remove(container_id, sandbox_id)
        finally:
            self._end(sandbox_id)

    async def _container_spec(
        self, sandbox_id: str, settings: SandboxSettings, for_pool: bool = False
    ) -> ContainerSpec:
        """What to create for ``settings``: its template's image and limits (the image's
        labels are read first, once, for its resource defaults)."""
        template = settings.template
        if template not in self.templates.images:
            known = ", ".join(self.templates.names)
            raise InvalidSettings(f"unknown template {template!r}; known templates: {known}")
        await self.templates.ensure(self.runtime, template)
        # Server defaults < the template's labels (within the maxima) < the creator's request
        # (checked against the same maxima): what it gets is in its labels from here on.
        resources, limits = self.policy.resources.resolve(
            self.templates.limits_of(template), settings.requested
        )
        return ContainerSpec(
            sandbox_id=sandbox_id,
            created_at=self.now(),
            agent_secret=new_agent_secret(),
            settings=attrs.evolve(settings, resources=resources),
            for_pool=for_pool,
            image=self.templates.image_of(template),
            limits=limits,
        )

    def _begin(self, sandbox_id: str) -> None:
        """A container operation on ``sandbox_id`` starts (reconciliation keeps off it)."""
        self._in_flight.add(sandbox_id)
        self._touch(sandbox_id)

    def _end(self, sandbox_id: str) -> None:
        self._in_flight.discard(sandbox_id)
        self._touch(sandbox_id)

    def _touch(self, sandbox_id: str) -> None:
        """``sandbox_id`` changed outside a reconcile: its listing may be stale about it."""
        if self._touched is not None:
            self._touched.add(sandbox_id)

    def _forget(self, sandbox: Sandbox, code: int, reason: str, detail: str = "") -> None:
        self._touch(sandbox.sandbox_id)
        if self.registry.remove(sandbox.sandbox_id) is not None:
            self.metrics.removed.labels(reason=reason).inc()
        self.graveyard.bury(
            Tombstone(sandbox.sandbox_id, reason, self.now(), detail, sandbox.settings.owner)
        )
        close_reason = f"sandbox {reason}" + (f": {detail}" if detail else "")
        for client in list(sandbox.attachments):
            try:
                client.disconnect(code, close_reason)
            except Exception:
                self._log.failure("disconnecting a client failed")
        sandbox.attachments.clear()

    def merge_saved(self, sandbox: Sandbox, saved: SavedSandbox) -> None:
        """Facts another gateway saved in the cluster (Swarm): its later activity (never in
        the future), its clients, its lifetime extension, so that whichever gateway reaps
        judges by both."""
        sandbox.last_activity = max(sandbox.last_activity, min(saved.last_activity, self.now()))
        sandbox.ever_connected = sandbox.ever_connected or saved.ever_connected
        if saved.expires_at is not None and sandbox.expires_at is not None:
            sandbox.expires_at = max(sandbox.expires_at, saved.expires_at)

    def _sandbox_from(self, info: ContainerInfo, saved: SavedSandbox | None = None) -> Sandbox:
        settings, created_at, from_pool = info.settings, info.created_at, False
        if saved is not None and saved.assigned is not None:
            # Handed out from the pool: its labels describe the pool, the state file the
            # sandbox (the resources, fixed at creation, are the labels').
            settings = attrs.evolve(saved.assigned, resources=info.settings.resources)
            from_pool = True
            created_at = saved.created_at if saved.created_at is not None else created_at
        lifetime = settings.max_lifetime
        expires_at = None if lifetime is None else created_at + lifetime
        sandbox = Sandbox(
            sandbox_id=info.sandbox_id,
            container_id=info.container_id,
            created_at=created_at,
            ip_address=info.ip_address,
            agent_host=info.agent_host,
            agent_port=info.agent_port,
            agent_secret=info.agent_secret,
            agent_socket=info.agent_socket,
            last_activity=self.now(),
            settings=settings,
            expires_at=expires_at,
            from_pool=from_pool,
        )
        if saved is not None:
            # Resume the idle clock where it was; never in the future.
            sandbox.last_activity = min(saved.last_activity, self.now())
            sandbox.ever_connected = saved.ever_connected
            if saved.expires_at is not None and expires_at is not None:
                sandbox.expires_at = max(expires_at, saved.expires_at)
        return sandbox


def exit_detail(exit_code: int | None, oom_killed: bool) -> str:
    if oom_killed:
        return "killed: out of memory"
    if exit_code is None:
        return "container stopped"
    return f"container exited with code {exit_code}"
