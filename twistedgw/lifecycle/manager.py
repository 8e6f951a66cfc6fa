"""``SandboxManager``: the sandbox lifecycle, between the edges and the container runtime.

Creates (container, then wait for its agent), deletes (container, then forget, record why, and
disconnect clients), keeps alive, and recovers agents that restarted. The warm pool
(``pool.py``) and keeping the registry in line with the runtime (``reconcile.py``) are the
parts it builds on; creation bodies are checked in ``options.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from attrs import evolve, frozen
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from twistedgw.agents import AgentLink, AgentUnavailable, IAgents, NoAgents
from twistedgw.lifecycle.errors import (
    CapacityExceeded,
    IdempotencyConflict,
    InvalidSettings,
    SandboxNotFound,
)
from twistedgw.lifecycle.options import DEFAULT_LIFECYCLE, LifecyclePolicy
from twistedgw.lifecycle.reconcile import Reconciliation
from twistedgw.lifecycle.shared import Shared
from twistedgw.lifecycle.templates import DEFAULT_TEMPLATE, TemplateCatalog
from twistedgw.metrics import GatewayMetrics
from twistedgw.protocol import CLOSE_SANDBOX_REMOVED
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import ContainerInfo, IContainerRuntime
from twistedgw.sandbox import (
    REASON_DELETED,
    Graveyard,
    Sandbox,
    SandboxSettings,
    is_valid_sandbox_id,
    new_sandbox_id,
)
from twistedgw.state import SavedSandbox, StateFile, StateStore


@frozen
class AgentRecovery:
    """What became of a sandbox's agent after a connection to it dropped."""

    #: The agent answers again (normally: it died and its supervisor restarted it in place).
    back: bool
    #: Sessions clients had used that the agent no longer has.
    lost_sessions: tuple[str, ...] = ()
    #: Why it is not back, when it is not.
    detail: str = ""


class SandboxManager(Reconciliation):
    """Owns the sandbox lifecycle; every method runs on the reactor thread."""

    def __init__(
        self,
        registry: SandboxRegistry,
        runtime: IContainerRuntime,
        reactor: Any,
        agent_ready_timeout: float = 30.0,
        agent_connect_timeout: float = 10.0,
        max_message_size: int = 0,
        wait_ready: Callable[[ContainerInfo], Awaitable[None]] | None = None,
        policy: LifecyclePolicy = DEFAULT_LIFECYCLE,
        state: StateStore | None = None,
        pool_size: int = 0,
        agent_recovery_timeout: float = 5.0,
        agents: IAgents | None = None,
        paused_timeout: float = 86400.0,
        templates: TemplateCatalog | None = None,
        pool_sizes: Mapping[str, int] | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.registry = registry
        #: Creates, removals and agent connect failures are counted here; the registered
        #: sandboxes and the pool are read from this manager at scrape time.
        self.metrics = metrics or GatewayMetrics()
        self.metrics.observe(sandboxes=lambda: list(self.registry), pool=self.pool_status)
        #: The templates sandboxes are made from (default: the runtime's image only).
        self.templates = templates or TemplateCatalog()
        #: Seconds a paused sandbox is kept (not reaped as idle) before it is reaped.
        self.paused_timeout = paused_timeout
        self.agents: IAgents = agents or NoAgents()
        self.runtime = runtime
        self.policy = policy
        self.graveyard = Graveyard()
        self._reactor = reactor
        self._agent_ready_timeout = agent_ready_timeout
        self._agent_connect_timeout = agent_connect_timeout
        self._max_message_size = max_message_size
        self._wait_ready = wait_ready or self._wait_for_agent
        self._state: StateStore = state or StateFile(None, reactor)
        self._saved: dict[str, SavedSandbox] = {}
        # Sandbox ids whose container is being created or removed right now: reconciliation
        # must neither adopt nor remove those, and events about them are ours.
        self._in_flight: set[str] = set()
        # Creates in progress by idempotency key, so concurrent retries share one container.
        self._creating: dict[str, Shared[Sandbox]] = {}
        # Agents being waited for after a dropped connection, by sandbox id: every client of
        # the sandbox (and new ones) follows one recovery.
        self._recoveries: dict[str, Shared[AgentRecovery]] = {}
        self._agent_recovery_timeout = agent_recovery_timeout
        self._cold_creates = 0
        # The warm pool: started, agent-ready containers nobody has asked for yet. They are
        # not in the registry (not listed, not reaped, not counted in --max-sandboxes). One
        # pool per template: ``pool_size`` is the default template's, ``pool_sizes`` any's.
        self.pool_sizes = {DEFAULT_TEMPLATE: pool_size, **(pool_sizes or {})}
        self._pool: list[Sandbox] = []
        self._pool_filling: dict[str, int] = {}
        self._pool_failures: dict[str, int] = {}
        self._pool_retry: dict[str, Any] = {}
        self._backoff = backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=2.0)
        # Between startService and the first successful reconcile the registry may miss
        # running sandboxes: lookups and listings raise ``Recovering`` instead of answering
        # a false "not found" or an incomplete list.
        self.recovered = True
        self._recovery_failures = 0
        self._recovery_retry: Any = None
        # The reconcile in progress (at most one at a time; later callers share it), and the
        # sandbox ids something else touched since its listing began, about which that
        # listing may be stale.
        self._reconciling: Shared[None] | None = None
        self._touched: set[str] | None = None

    # -- Service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._saved = self._state.load()
        self.runtime.watch(self._on_event)
        self.recovered = False
        self._recover()

    def _recover(self) -> None:
        """Reconcile until one succeeds; only then is the registry complete."""
        self._recovery_retry = None
        if not self.running:
            return
        d = self.reconcile()

        def failed(f: Failure) -> None:
            self._recovery_failures += 1
            delay = self._backoff(self._recovery_failures - 1)
            self._log.failure(
                "could not recover sandboxes at start-up; retrying in {delay:.1f} s",
                f,
                delay=delay,
            )
            if self.running:
                self._recovery_retry = self._reactor.callLater(delay, self._recover)

        d.addErrback(failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for call in (*self._pool_retry.values(), self._recovery_retry):
            if call is not None and call.active():
                call.cancel()
        d = self.save_state()
        d.addErrback(lambda f: self._log.failure("could not save state at shutdown", f))
        return d

    # -- lookups ---------------------------------------------------------------------------

    def lookup(self, sandbox_id: str, owner: str | None = None) -> Sandbox:
        """The sandbox with this id; raises ``SandboxNotFound`` (with a tombstone if known).

        Ids that cannot be ours are refused before any lookup, so attacker text never travels
        further than this check. With an ``owner``, another owner's sandbox is "not found"
        (not "forbidden"), so ids do not leak.
        """
        if not is_valid_sandbox_id(sandbox_id):
            raise SandboxNotFound(sandbox_id)
        self._check_recovered()
        sandbox = self.registry.get(sandbox_id)
        if sandbox is None:
            tombstone = self.graveyard.get(sandbox_id, self.now())
            if tombstone is not None and owner is not None and tombstone.owner != owner:
                tombstone = None
            raise SandboxNotFound(sandbox_id, tombstone)
        if owner is not None and sandbox.settings.owner != owner:
            raise SandboxNotFound(sandbox_id)
        return sandbox

    def visible_to(self, owner: str | None) -> list[Sandbox]:
        """The sandboxes ``owner`` may see (all of them in open mode); raises ``Recovering``
        until the registry is known to be complete."""
        self._check_recovered()
        return [s for s in self.registry if owner is None or s.settings.owner == owner]

    # -- creation --------------------------------------------------------------------------

    def create(self, settings: SandboxSettings | None = None) -> Deferred[Sandbox]:
        """Create a sandbox; fires with it once its agent answers.

        With an idempotency key, a retry returns the sandbox the key already made, and
        concurrent retries share one creation. The creation goes on even if the caller
        cancels its Deferred (a client that went away), so no half-made sandbox is left.
        """
        self._check_recovered()  # the registry may miss the sandbox this key made
        settings = settings or SandboxSettings(idle_timeout=self.policy.idle_timeout)
        key = settings.idempotency_key
        if key is not None:
            for sandbox in self.registry:
                if sandbox.settings.idempotency_key == key:
                    # What it got (``resources``) was resolved at creation; the request
                    # (template, ``requested`` and the rest) must be the same.
                    if evolve(sandbox.settings, resources=None) != evolve(settings, resources=None):
                        raise IdempotencyConflict(
                            "Idempotency-Key already used with other creation options"
                        )
                    return Deferred.fromCoroutine(_value(sandbox))
            if key in self._creating:
                return self._creating[key].follow()
        creating = Deferred.fromCoroutine(self._create(settings))
        if key is not None:

            def done(result: Any) -> Any:
                self._creating.pop(key, None)
                return result

            creating.addBoth(done)
        shared = Shared(creating)
        if key is not None and not creating.called:
            self._creating[key] = shared
        return shared.follow()

    def _count(self) -> int:
        """Sandboxes that count towards --max-sandboxes: registered ones and cold creates in
        progress (the warm pool does not count)."""
        return len(self.registry) + self._cold_creates

    async def _create(self, settings: SandboxSettings) -> Sandbox:
        """``_make``, timed: ``twistedgw_sandbox_create_duration_seconds`` by path and
        outcome."""
        started = self.now()
        path, outcome = "cold", "failed"
        try:
            sandbox = await self._make(settings)
            path, outcome = ("pool" if sandbox.from_pool else "cold"), "ok"
            return sandbox
        except CapacityExceeded:
            outcome = "refused"
            raise
        finally:
            self.metrics.creates.labels(path=path, outcome=outcome).observe(self.now() - started)

    async def _make(self, settings: SandboxSettings) -> Sandbox:
        if self._count() >= self.policy.max_sandboxes:
            raise CapacityExceeded(
                f"this gateway already runs its maximum of {self.policy.max_sandboxes} sandboxes"
            )
        if self._can_hand_out(settings):
            sandbox = await self._hand_out(settings)
            if sandbox is not None:
                return sandbox
        sandbox_id = new_sandbox_id()
        self._begin(sandbox_id)
        self._cold_creates += 1
        try:
            started = self.now()
            spec = await self._container_spec(sandbox_id, settings)
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
                await self.runtime.remove(info.container_id, info.sandbox_id)
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
            self._end(sandbox_id)
            self._cold_creates -= 1

    # -- removal ---------------------------------------------------------------------------

    async def delete(
        self, sandbox_id: str, reason: str = REASON_DELETED, owner: str | None = None
    ) -> Sandbox:
        """Remove a sandbox's container, forget it, record why, and disconnect its clients.

        If the runtime fails, the sandbox stays registered (nothing is lost) and the error
        propagates. Two deletes of one sandbox at once remove it once; the second finds it gone.
        """
        sandbox = self.lookup(sandbox_id, owner)
        if sandbox_id in self._in_flight:
            raise SandboxNotFound(sandbox_id)  # being removed right now
        self._begin(sandbox_id)
        # Decided before the container goes: its agent link drops during the removal, and
        # clients must see this reason, not a crash's 1011.
        sandbox.closing = (CLOSE_SANDBOX_REMOVED, f"sandbox {reason}")
        try:
            await self.runtime.remove(sandbox.container_id, sandbox_id)
        except BaseException:
            sandbox.closing = None
            raise
        finally:
            self._end(sandbox_id)
        self._forget(sandbox, CLOSE_SANDBOX_REMOVED, reason)
        self._log.info(
            "removed sandbox {sandbox_id} (reason: {reason})", sandbox_id=sandbox_id, reason=reason
        )
        return sandbox

    def keepalive(
        self, sandbox_id: str, extend_by: float | None, owner: str | None = None
    ) -> Sandbox:
        """Count as activity now and, with ``extend_by``, push the lifetime out to at least
        now + extend_by (never beyond the server's maximum lifetime from now)."""
        sandbox = self.lookup(sandbox_id, owner)
        now = self.now()
        sandbox.touch(now)
        if extend_by is not None:
            if self.policy.max_lifetime is not None and extend_by > self.policy.max_lifetime:
                raise InvalidSettings(
                    f"'extend_by' exceeds the server maximum of {self.policy.max_lifetime:g} s"
                )
            if sandbox.expires_at is not None:
                sandbox.expires_at = max(sandbox.expires_at, now + extend_by)
        return sandbox

    # -- pause -----------------------------------------------------------------------------

    async def pause(self, sandbox_id: str, owner: str | None = None) -> Sandbox:
        """Freeze the sandbox's processes (Docker's pause; memory is kept). Idempotent."""
        sandbox = self.lookup(sandbox_id, owner)
        if not sandbox.paused:
            await self.runtime.pause(sandbox.container_id)
            sandbox.paused_at = self.now()
            self._log.info("paused sandbox {sandbox_id}", sandbox_id=sandbox_id)
        return sandbox

    async def resume(self, sandbox_id: str, owner: str | None = None) -> Sandbox:
        """Thaw a paused sandbox; counts as activity. Idempotent."""
        sandbox = self.lookup(sandbox_id, owner)
        await self.runtime.unpause(sandbox.container_id)
        if sandbox.paused:
            sandbox.paused_at = None
            self._log.info("resumed sandbox {sandbox_id}", sandbox_id=sandbox_id)
        sandbox.touch(self.now())
        return sandbox

    # -- agents ----------------------------------------------------------------------------

    async def open_agent(self, sandbox: Sandbox) -> AgentLink:
        """Open a new agent connection for one client of ``sandbox``.

        While the agent is being restarted (a recovery is under way, or this connection
        fails), the recovery is waited for and the connection tried once more.
        """
        if self.recovering(sandbox):
            await self.agent_lost(sandbox)
        try:
            return await self._connect(sandbox)
        except AgentUnavailable:
            self.metrics.agent_connect_failures.inc()
            if self.registry.get(sandbox.sandbox_id) is not sandbox:
                raise
            recovery = await self.agent_lost(sandbox)
            if not recovery.back:
                raise
        try:
            return await self._connect(sandbox)
        except AgentUnavailable:
            self.metrics.agent_connect_failures.inc()
            raise

    def _connect(self, sandbox: Sandbox, timeout: float | None = None) -> Deferred[AgentLink]:
        return self.agents.connect(
            sandbox.agent_host,
            sandbox.agent_port,
            sandbox.agent_secret,
            timeout=self._agent_connect_timeout if timeout is None else timeout,
            max_message_size=self._max_message_size,
            unix_socket=sandbox.agent_socket,
        )

    def recovering(self, sandbox: Sandbox) -> bool:
        """Whether the gateway is waiting for this sandbox's agent to come back."""
        return sandbox.sandbox_id in self._recoveries

    def agent_lost(self, sandbox: Sandbox) -> Deferred[AgentRecovery]:
        """A connection to the sandbox's agent dropped: wait (at most the recovery timeout)
        for the agent to answer again, and find which sessions it lost.

        The agent's supervisor restarts a dead agent in place, within a second, and the
        container with its files lives on; a restarted agent has none of the old sessions.
        Concurrent callers share one recovery.
        """
        shared = self._recoveries.get(sandbox.sandbox_id)
        if shared is None:
            recovery = Deferred.fromCoroutine(self._recover_agent(sandbox))

            def done(result: Any) -> Any:
                self._recoveries.pop(sandbox.sandbox_id, None)
                return result

            recovery.addBoth(done)
            shared = Shared(recovery)
            if not recovery.called:
                self._recoveries[sandbox.sandbox_id] = shared
        return shared.follow()

    async def _recover_agent(self, sandbox: Sandbox) -> AgentRecovery:
        started = self.now()
        deadline = started + self._agent_recovery_timeout
        last = "no answer"
        while self.now() < deadline:
            if self.registry.get(sandbox.sandbox_id) is not sandbox:
                return AgentRecovery(False, detail="sandbox removed")
            remaining = max(0.2, deadline - self.now())
            try:
                agent = await self._connect(sandbox, timeout=min(2.0, remaining))
            except AgentUnavailable as e:
                last = str(e)
                await deferLater(self._reactor, 0.05, lambda: None)
                continue
            try:
                present = await self.agents.list_sessions(agent, timeout=min(2.0, remaining))
            except AgentUnavailable as e:
                last = str(e)
                continue
            finally:
                agent.close()
            lost = tuple(sorted(sandbox.sessions - present))
            sandbox.sessions -= set(lost)
            sandbox.lost_sessions |= set(lost)
            sandbox.agent_restarts += 1
            self._log.warn(
                "sandbox {sandbox_id}: agent connection lost; the agent answers again after "
                "{ms:.0f} ms; sessions lost: {lost}",
                sandbox_id=sandbox.sandbox_id,
                ms=(self.now() - started) * 1000,
                lost=", ".join(lost) or "none",
            )
            return AgentRecovery(True, lost)
        self._log.warn(
            "sandbox {sandbox_id}: agent did not come back within {timeout:g} s: {error}",
            sandbox_id=sandbox.sandbox_id,
            timeout=self._agent_recovery_timeout,
            error=last,
        )
        return AgentRecovery(False, detail=last)

    async def _wait_for_agent(self, info: ContainerInfo) -> None:
        await self.agents.wait_ready(
            info.agent_host,
            info.agent_port,
            info.agent_secret,
            self._agent_ready_timeout,
            unix_socket=info.agent_socket,
        )


async def _value(sandbox: Sandbox) -> Sandbox:
    return sandbox
