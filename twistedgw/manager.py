"""``SandboxManager``: the sandbox lifecycle, between the edges and the container runtime.

Creates (container, then wait for its agent), deletes (container, then forget, record why, and
disconnect clients), and keeps the registry in line with the runtime, which is the source of
truth: running containers of ours are adopted, vanished or dead ones are forgotten (and dead
ones removed). Docker events make that immediate; the reaper's periodic ``reconcile`` is the
safety net.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs
from attrs import frozen
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedgw.agentlink import (
    AgentSide,
    AgentUnavailable,
    connect_agent,
    list_sessions,
    wait_for_agent,
)
from twistedgw.protocol import ProtocolError, validate_env
from twistedgw.runtime.interface import (
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    IContainerRuntime,
)
from twistedgw.sandbox import (
    REASON_DELETED,
    REASON_EXITED,
    Graveyard,
    Sandbox,
    SandboxRegistry,
    SandboxSettings,
    Tombstone,
    is_valid_sandbox_id,
    new_agent_secret,
    new_sandbox_id,
)
from twistedgw.state import SavedSandbox, StateFile

#: WebSocket close code for "the sandbox went away under you" (1011: server error).
CLOSE_SANDBOX_GONE = 1011
#: WebSocket close code when the sandbox was removed on purpose (deleted, idle, lifetime).
CLOSE_SANDBOX_REMOVED = 4000

METADATA_KEY_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
MAX_METADATA = 32
MAX_METADATA_VALUE = 256
#: The gateway's own cap on a creation ``env`` value (names and entries: ``protocol``).
MAX_ENV_VALUE = 32 * 1024


T = TypeVar("T")


@frozen
class AgentRecovery:
    """What became of a sandbox's agent after a connection to it dropped."""

    #: The agent answers again (normally: it died and its supervisor restarted it in place).
    back: bool
    #: Sessions clients had used that the agent no longer has.
    lost_sessions: tuple[str, ...] = ()
    #: Why it is not back, when it is not.
    detail: str = ""


class SandboxNotFound(Exception):
    """No sandbox with that id (or not one this gateway may show)."""

    def __init__(self, sandbox_id: str, tombstone: Tombstone | None = None) -> None:
        super().__init__(sandbox_id)
        self.sandbox_id = sandbox_id
        self.tombstone = tombstone


class InvalidSettings(ValueError):
    """Creation options that are malformed or beyond the server's maxima."""


class IdempotencyConflict(InvalidSettings):
    """An Idempotency-Key was used again with other creation options."""


class CapacityExceeded(Exception):
    """The gateway already runs its maximum number of sandboxes."""


class Recovering(Exception):
    """The gateway has started but not yet recovered its sandboxes from the runtime, so it
    cannot tell whether a sandbox exists (answered as 503 with ``Retry-After``)."""

    #: Seconds a client should wait before asking again.
    retry_after = 1


@frozen
class LifecyclePolicy:
    """Server-side limits on sandboxes (the operator's options)."""

    idle_timeout: float = 3600.0
    max_idle_timeout: float = 86400.0
    default_lifetime: float | None = None
    max_lifetime: float | None = None
    max_sandboxes: int = 200


DEFAULT_LIFECYCLE = LifecyclePolicy()


def _positive_seconds(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidSettings(f"'{key}' must be a number of seconds greater than 0")
    if value == float("inf"):
        raise InvalidSettings(f"'{key}' must be finite")
    return float(value)


def _string_map(
    body: Mapping[str, Any], key: str, name_re: re.Pattern[str], most: int, longest: int
) -> dict[str, str]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > most:
        raise InvalidSettings(f"'{key}' must be an object with at most {most} entries")
    for name, item in value.items():
        if not name_re.match(name):
            raise InvalidSettings(f"'{key}' name {name[:64]!r} is not allowed")
        if not isinstance(item, str) or "\x00" in item or len(item) > longest:
            raise InvalidSettings(
                f"'{key}' value of {name!r} must be a string of at most {longest} characters"
            )
    return dict(value)


def _creation_env(value: Any) -> dict[str, str]:
    """The creation body's ``env``: the protocol's one env rule, plus the value cap."""
    if value is None:
        return {}
    try:
        return validate_env(value, max_value_length=MAX_ENV_VALUE)
    except ProtocolError as e:
        raise InvalidSettings(e.message) from None


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
        policy: LifecyclePolicy = DEFAULT_LIFECYCLE,
        state: StateFile | None = None,
        pool_size: int = 0,
        agent_recovery_timeout: float = 5.0,
    ) -> None:
        self.registry = registry
        self.runtime = runtime
        self.policy = policy
        self.graveyard = Graveyard()
        self._reactor = reactor
        self._agent_ready_timeout = agent_ready_timeout
        self._agent_connect_timeout = agent_connect_timeout
        self._max_message_size = max_message_size
        self._wait_ready = wait_ready or self._wait_for_agent
        self._state = state or StateFile(None, reactor)
        self._saved: dict[str, SavedSandbox] = {}
        # Sandbox ids whose container is being created or removed right now: reconciliation
        # must neither adopt nor remove those, and events about them are ours.
        self._in_flight: set[str] = set()
        # Creates in progress by idempotency key, so concurrent retries share one container.
        self._creating: dict[str, _Shared[Sandbox]] = {}
        # Agents being waited for after a dropped connection, by sandbox id: every client of
        # the sandbox (and new ones) follows one recovery.
        self._recoveries: dict[str, _Shared[AgentRecovery]] = {}
        self._agent_recovery_timeout = agent_recovery_timeout
        self._cold_creates = 0
        # The warm pool: started, agent-ready containers nobody has asked for yet. They are
        # not in the registry (not listed, not reaped, not counted in --max-sandboxes).
        self.pool_size = pool_size
        self._pool: list[Sandbox] = []
        self._pool_filling = 0
        self._pool_failures = 0
        self._pool_retry: Any = None
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
        self._reconciling: _Shared[None] | None = None
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

    def _check_recovered(self) -> None:
        if not self.recovered:
            raise Recovering("the gateway is still recovering its sandboxes from Docker")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for call in (self._pool_retry, self._recovery_retry):
            if call is not None and call.active():
                call.cancel()
        d = self.save_state()
        d.addErrback(lambda f: self._log.failure("could not save state at shutdown", f))
        return d

    def save_state(self) -> Deferred[None]:
        """Persist what labels cannot hold (last activity, lifetime extensions)."""
        return self._state.save(self.registry)

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

    def now(self) -> float:
        """Wall-clock seconds (epoch), from the injected reactor/clock."""
        return float(self._reactor.seconds())

    # -- creation --------------------------------------------------------------------------

    def settings_for(
        self,
        body: Mapping[str, Any] | None,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> SandboxSettings:
        """Validate creation options against the policy; raises ``InvalidSettings``."""
        body = body or {}
        unknown = set(body) - {"idle_timeout", "max_lifetime", "env", "metadata", "network"}
        if unknown:
            raise InvalidSettings(f"unknown creation option(s): {', '.join(sorted(unknown))}")
        policy = self.policy
        idle_timeout = _positive_seconds(body, "idle_timeout") or policy.idle_timeout
        if idle_timeout > policy.max_idle_timeout:
            raise InvalidSettings(
                f"'idle_timeout' exceeds the server maximum of {policy.max_idle_timeout:g} s"
            )
        lifetime = _positive_seconds(body, "max_lifetime") or policy.default_lifetime
        if policy.max_lifetime is not None:
            if lifetime is not None and lifetime > policy.max_lifetime:
                raise InvalidSettings(
                    f"'max_lifetime' exceeds the server maximum of {policy.max_lifetime:g} s"
                )
            lifetime = lifetime or policy.max_lifetime
        network = body.get("network", "bridge")
        if network not in ("bridge", "none"):
            raise InvalidSettings('\'network\' must be "bridge" or "none"')
        key = None
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 256:
                raise InvalidSettings("Idempotency-Key must be 1-256 characters")
            # Scoped to the owner: one client's key never returns another's sandbox.
            scoped = f"{owner or ''}\x00{idempotency_key}".encode()
            key = hashlib.sha256(scoped).hexdigest()[:40]
        return SandboxSettings(
            idle_timeout=idle_timeout,
            max_lifetime=lifetime,
            metadata=_string_map(
                body, "metadata", METADATA_KEY_RE, MAX_METADATA, MAX_METADATA_VALUE
            ),
            env=_creation_env(body.get("env")),
            idempotency_key=key,
            owner=owner,
            network=network,
        )

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
                    if sandbox.settings != settings:
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
        shared = _Shared(creating)
        if key is not None and not creating.called:
            self._creating[key] = shared
        return shared.follow()

    def _count(self) -> int:
        """Sandboxes that count towards --max-sandboxes: registered ones and cold creates in
        progress (the warm pool does not count)."""
        return len(self.registry) + self._cold_creates

    async def _create(self, settings: SandboxSettings) -> Sandbox:
        if self._count() >= self.policy.max_sandboxes:
            raise CapacityExceeded(
                f"this gateway already runs its maximum of {self.policy.max_sandboxes} sandboxes"
            )
        if (
            self._pool
            and not settings.env
            and not settings.metadata
            and settings.network == "bridge"
        ):
            sandbox = await self._hand_out(settings)
            if sandbox is not None:
                return sandbox
        sandbox_id = new_sandbox_id()
        spec = ContainerSpec(
            sandbox_id=sandbox_id,
            created_at=self.now(),
            agent_secret=new_agent_secret(),
            settings=settings,
        )
        self._begin(sandbox_id)
        self._cold_creates += 1
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

    # -- warm pool -------------------------------------------------------------------------

    def pool_status(self) -> dict[str, int]:
        """How full the warm pool is."""
        return {"size": self.pool_size, "ready": len(self._pool), "filling": self._pool_filling}

    async def _hand_out(self, settings: SandboxSettings) -> Sandbox | None:
        """Give a pooled container to a creator (never twice, never back to the pool).

        Its new settings live only in the state file, so the assignment is saved before the
        creator hears of it: a restarted gateway must not pool it again. If that save fails,
        the container is dropped and the caller creates cold.
        """
        pooled = self._pool.pop(0)
        now = self.now()
        lifetime = settings.max_lifetime
        # The same container, with the creator's settings and a life that starts now.
        sandbox = attrs.evolve(
            pooled,
            created_at=now,
            last_activity=now,
            settings=settings,
            expires_at=None if lifetime is None else now + lifetime,
            pooled=True,
        )
        self._touch(sandbox.sandbox_id)
        self.registry.add(sandbox)
        self.refill_pool()
        try:
            await self.save_state()
        except Exception:
            self._log.failure("could not record a pool hand-out; creating cold instead")
            self.registry.remove(sandbox.sandbox_id)
            d = Deferred.fromCoroutine(self._remove_dead(sandbox.sandbox_id, sandbox.container_id))
            d.addErrback(lambda f: self._log.failure("removing a pool container failed", f))
            return None
        self._log.info(
            "sandbox {sandbox_id} handed out from the warm pool", sandbox_id=sandbox.sandbox_id
        )
        return sandbox

    def refill_pool(self) -> None:
        """Start creating pool containers until the pool is (being) filled."""
        if not self.running or self._pool_retry is not None:
            return
        missing = self.pool_size - len(self._pool) - self._pool_filling
        for _ in range(max(0, missing)):
            self._pool_filling += 1
            d = Deferred.fromCoroutine(self._fill_one())
            d.addErrback(lambda f: self._log.failure("filling the warm pool failed", f))

    async def _fill_one(self) -> None:
        sandbox_id = new_sandbox_id()
        spec = ContainerSpec(
            sandbox_id=sandbox_id,
            created_at=self.now(),
            agent_secret=new_agent_secret(),
            settings=SandboxSettings(idle_timeout=self.policy.idle_timeout),
            pooled=True,
        )
        self._begin(sandbox_id)
        try:
            info = await self.runtime.create(spec)
            try:
                await self._wait_ready(info)
            except AgentUnavailable:
                await self.runtime.remove(info.container_id, info.sandbox_id)
                raise
            self._pool.append(self._sandbox_from(info))
            self._pool_failures = 0
        except Exception as e:
            # Back off (about 1, 2, 4 ... 30 s) instead of hammering an engine in trouble.
            self._pool_failures += 1
            delay = self._backoff(self._pool_failures - 1)
            self._log.warn(
                "could not add to the warm pool ({error}); retrying in {delay:.1f} s",
                error=str(e),
                delay=delay,
            )
            if self._pool_retry is None and self.running:
                self._pool_retry = self._reactor.callLater(delay, self._retry_refill)
        finally:
            self._end(sandbox_id)
            self._pool_filling -= 1

    def _retry_refill(self) -> None:
        self._pool_retry = None
        self.refill_pool()

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
        self.registry.touch(sandbox, now)
        if extend_by is not None:
            if self.policy.max_lifetime is not None and extend_by > self.policy.max_lifetime:
                raise InvalidSettings(
                    f"'extend_by' exceeds the server maximum of {self.policy.max_lifetime:g} s"
                )
            if sandbox.expires_at is not None:
                sandbox.expires_at = max(sandbox.expires_at, now + extend_by)
        return sandbox

    # -- reconciliation --------------------------------------------------------------------

    def reconcile(self) -> Deferred[None]:
        """Bring the registry in line with the runtime (the source of truth).

        One reconcile runs at a time: a call while one is in progress shares its outcome.
        The first success after ``startService`` marks the registry as recovered.
        """
        if self._reconciling is None:
            running = Deferred.fromCoroutine(self._reconcile())

            def done(result: Any) -> Any:
                self._reconciling = None
                self._touched = None
                if not isinstance(result, Failure) and not self.recovered:
                    self.recovered = True
                    self._recovery_failures = 0
                    self._log.info(
                        "recovered {count} sandboxes from Docker; serving them",
                        count=len(self.registry),
                    )
                return result

            running.addBoth(done)
            if running.called:
                return running
            self._reconciling = _Shared(running)
        return self._reconciling.follow()

    async def _reconcile(self) -> None:
        # Ids that anything else creates, hands out, removes or forgets from here on are
        # left alone by this pass: its listing may predate the change.
        touched: set[str] = set()
        self._touched = touched
        registered = {s.sandbox_id for s in self.registry}
        pooled_before = {p.sandbox_id for p in self._pool}
        infos = await self.runtime.list_containers()
        seen: set[str] = set()
        for info in infos:
            sandbox_id = info.sandbox_id
            if (
                not is_valid_sandbox_id(sandbox_id)
                or sandbox_id in self._in_flight
                or sandbox_id in touched
            ):
                seen.add(sandbox_id)
                continue
            seen.add(info.sandbox_id)
            known = self.registry.get(info.sandbox_id)
            in_pool = any(p.sandbox_id == info.sandbox_id for p in self._pool)
            if info.running and (info.agent_port or info.agent_socket) and info.agent_secret:
                saved = self._saved.get(info.sandbox_id)
                if known is not None or in_pool:
                    continue
                if info.pooled and (saved is None or saved.assigned is None):
                    await self._adopt_into_pool(info)
                    continue
                self.registry.add(self._sandbox_from(info, saved))
                self._log.info("adopted running sandbox {sandbox_id}", sandbox_id=info.sandbox_id)
                continue
            if in_pool:
                self._pool = [p for p in self._pool if p.sandbox_id != info.sandbox_id]
            # A container of ours that is not running cannot serve anyone: remove it.
            detail = _exit_detail(info.exit_code, info.oom_killed)
            self._log.warn(
                "sandbox {sandbox_id}: container is not running ({detail}); removing it",
                sandbox_id=info.sandbox_id,
                detail=detail,
            )
            await self._remove_dead(info.sandbox_id, info.container_id)
            if known is not None:
                self._forget(known, CLOSE_SANDBOX_GONE, REASON_EXITED, detail)
            else:
                self.graveyard.bury(
                    Tombstone(
                        info.sandbox_id, REASON_EXITED, self.now(), detail, info.settings.owner
                    )
                )
        self._pool = [
            p for p in self._pool if p.sandbox_id in seen or p.sandbox_id not in pooled_before
        ]
        self.refill_pool()
        for sandbox in self.registry:
            sandbox_id = sandbox.sandbox_id
            if (
                sandbox_id in registered
                and sandbox_id not in seen
                and sandbox_id not in self._in_flight
                and sandbox_id not in touched
            ):
                self._log.warn(
                    "sandbox {sandbox_id}: container vanished; forgetting it",
                    sandbox_id=sandbox.sandbox_id,
                )
                self._forget(
                    sandbox,
                    CLOSE_SANDBOX_GONE,
                    REASON_EXITED,
                    "container removed outside the gateway",
                )

    async def _adopt_into_pool(self, info: ContainerInfo) -> None:
        """A pool container from an earlier run: back into the pool, or removed if the pool
        is full already."""
        if len(self._pool) + self._pool_filling < self.pool_size:
            self._pool.append(self._sandbox_from(info))
            self._log.info("adopted pool container {sandbox_id}", sandbox_id=info.sandbox_id)
        else:
            await self._remove_dead(info.sandbox_id, info.container_id)

    def _on_event(self, event: ContainerEvent) -> None:
        """A Docker event about one of our containers (reactor thread)."""
        if event.action in ("die", "destroy") and event.sandbox_id not in self._in_flight:
            before = len(self._pool)
            self._pool = [p for p in self._pool if p.container_id != event.container_id]
            if len(self._pool) != before:
                self._log.warn("a warm pool container died; replacing it")
                if event.action == "die":
                    d = Deferred.fromCoroutine(
                        self._remove_dead(event.sandbox_id, event.container_id)
                    )
                    d.addErrback(lambda f: self._log.failure("removing a dead container failed", f))
                self.refill_pool()
                return
        sandbox = self.registry.get(event.sandbox_id)
        if sandbox is None or event.sandbox_id in self._in_flight:
            return  # not one we serve, or our own removal
        if sandbox.container_id != event.container_id:
            return
        if event.action == "oom":
            self._log.warn("sandbox {sandbox_id}: out of memory", sandbox_id=event.sandbox_id)
            return
        if event.action == "die":
            detail = _exit_detail(event.exit_code, False)
        else:
            detail = "container removed outside the gateway"
        self._log.warn(
            "sandbox {sandbox_id}: container {action} ({detail})",
            sandbox_id=event.sandbox_id,
            action=event.action,
            detail=detail,
        )
        self._forget(sandbox, CLOSE_SANDBOX_GONE, REASON_EXITED, detail)
        if event.action == "die":
            d = Deferred.fromCoroutine(self._remove_dead(event.sandbox_id, event.container_id))
            d.addErrback(lambda f: self._log.failure("removing a dead container failed", f))

    async def _remove_dead(self, sandbox_id: str, container_id: str) -> None:
        self._begin(sandbox_id)
        try:
            await self.runtime.remove(container_id, sandbox_id)
        finally:
            self._end(sandbox_id)

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

    # -- agents ----------------------------------------------------------------------------

    async def open_agent(self, sandbox: Sandbox) -> AgentSide:
        """Open a new agent connection for one client of ``sandbox``.

        While the agent is being restarted (a recovery is under way, or this connection
        fails), the recovery is waited for and the connection tried once more.
        """
        if self.recovering(sandbox):
            await self.agent_lost(sandbox)
        try:
            return await self._connect(sandbox)
        except AgentUnavailable:
            if self.registry.get(sandbox.sandbox_id) is not sandbox:
                raise
            recovery = await self.agent_lost(sandbox)
            if not recovery.back:
                raise
            return await self._connect(sandbox)

    def _connect(self, sandbox: Sandbox, timeout: float | None = None) -> Deferred[AgentSide]:
        return connect_agent(
            self._reactor,
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
            shared = _Shared(recovery)
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
                present = await list_sessions(self._reactor, agent, timeout=min(2.0, remaining))
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
        await wait_for_agent(
            self._reactor,
            info.agent_host,
            info.agent_port,
            info.agent_secret,
            self._agent_ready_timeout,
            unix_socket=info.agent_socket,
        )

    # -- internals -------------------------------------------------------------------------

    def _forget(self, sandbox: Sandbox, code: int, reason: str, detail: str = "") -> None:
        self._touch(sandbox.sandbox_id)
        self.registry.remove(sandbox.sandbox_id)
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

    def _sandbox_from(self, info: ContainerInfo, saved: SavedSandbox | None = None) -> Sandbox:
        settings, created_at, pooled = info.settings, info.created_at, False
        if saved is not None and saved.assigned is not None:
            # Handed out from the pool: its labels describe the pool, the state file the
            # sandbox.
            settings, pooled = saved.assigned, True
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
            pooled=pooled,
        )
        if saved is not None:
            # Resume the idle clock where it was; never in the future.
            sandbox.last_activity = min(saved.last_activity, self.now())
            sandbox.ever_connected = saved.ever_connected
            if saved.expires_at is not None and expires_at is not None:
                sandbox.expires_at = max(expires_at, saved.expires_at)
        return sandbox


def _exit_detail(exit_code: int | None, oom_killed: bool) -> str:
    if oom_killed:
        return "killed: out of memory"
    if exit_code is None:
        return "container stopped"
    return f"container exited with code {exit_code}"


async def _value(sandbox: Sandbox) -> Sandbox:
    return sandbox


class _Shared(Generic[T]):
    """One operation's outcome handed to any number of followers.

    A follower's cancellation (a client that went away) does not cancel the operation.
    """

    _log = Logger()

    def __init__(self, source: Deferred[T]) -> None:
        self._result: Any = None
        self._done = False
        self._followers: list[Deferred[T]] = []
        source.addBoth(self._fire)

    def _fire(self, result: Any) -> None:
        self._done, self._result = True, result
        followers, self._followers = self._followers, []
        for follower in followers:
            self._deliver(follower)
        if isinstance(result, Failure) and not followers:
            self._log.failure("a shared operation failed with nobody waiting", result)

    def _deliver(self, follower: Deferred[T]) -> None:
        if follower.called:
            return  # cancelled by its caller
        if isinstance(self._result, Failure):
            follower.errback(self._result)
        else:
            follower.callback(self._result)

    def follow(self) -> Deferred[T]:
        follower: Deferred[T] = Deferred()
        if self._done:
            self._deliver(follower)
        else:
            self._followers.append(follower)
        return follower
