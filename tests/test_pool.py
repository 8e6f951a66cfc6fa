"""The warm pool's own rules, over the fake runtime and a Clock: filling after failures with
a backoff, adopting pool containers after a restart, and replacing dead ones."""

from __future__ import annotations

import gc
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from tests.runtime_contract import spec
from twistedgw.lifecycle.core import exit_detail
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import settings_from_body
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import (
    ContainerEvent,
    ContainerFailed,
    ContainerInfo,
    ContainerSpec,
)
from twistedgw.state import StateFile
from twistedgw.testing.fakes import FakeRuntime


async def _ready(info: ContainerInfo) -> None:
    return None


def pooled(runtime: FakeRuntime, clock: Clock, size: int) -> SandboxManager:
    return SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready, pool_size=size)


class RefusingRuntime(FakeRuntime):
    """A fake engine that lists fine but refuses creates while ``refuse`` is set."""

    refuse = True

    def create(self, spec: ContainerSpec) -> Deferred[ContainerInfo]:
        if self.refuse:
            return fail(ContainerFailed("no room"))
        return super().create(spec)


@pytest_twisted.ensureDeferred
async def test_pool_fill_failures_back_off_then_refill(clock: Clock) -> None:
    """While the engine refuses, the pool retries after 1-2, then at least 2 seconds (not in a
    loop); once the engine creates again, the next retry fills it and the backoff starts
    over."""
    runtime = RefusingRuntime()
    manager = pooled(runtime, clock, 2)
    manager.startService()
    try:
        await manager.reconcile()
        assert _totals(manager.pool_status()) == {"size": 2, "ready": 0, "filling": 0}
        assert "default" in manager._pool_retry  # per template (issue 18)
        first_delay = manager._pool_retry["default"].getTime() - clock.seconds()
        assert 1 <= first_delay < 2  # 1 s and up to 1 s of jitter
        clock.advance(first_delay)
        second_delay = manager._pool_retry["default"].getTime() - clock.seconds()
        assert second_delay >= 2  # backed off further (not 1 s and jitter again)
        runtime.refuse = False
        clock.advance(second_delay)
        assert _totals(manager.pool_status()) == {"size": 2, "ready": 2, "filling": 0}
        assert manager._pool_retry == {} and manager._pool_failures.get("default", 0) == 0
        assert runtime.creates == 2
    finally:
        await manager.stopService()
    assert manager._pool_retry == {}


@pytest_twisted.ensureDeferred
async def test_an_agent_that_never_answers_is_not_pooled(clock: Clock) -> None:
    """A pool container whose agent never gets ready is removed, not pooled."""
    from twistedgw.agents import AgentUnavailable

    async def never(info: ContainerInfo) -> None:
        raise AgentUnavailable("no agent")

    runtime = FakeRuntime()
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=never, pool_size=1)
    manager.startService()
    try:
        assert manager.pool_status()["ready"] == 0
        assert runtime.creates == 1 and runtime.containers == {}
        assert "default" in manager._pool_retry  # a retry is scheduled
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_restart_adopts_pool_containers_up_to_the_pool_size(clock: Clock) -> None:
    """Pool containers from an earlier run go back into the pool; those beyond a smaller
    pool size are removed; none is ever listed as a sandbox."""
    runtime = FakeRuntime()
    first = pooled(runtime, clock, 3)
    first.startService()
    await first.reconcile()
    await first.stopService()
    assert len(runtime.containers) == 3
    second = pooled(runtime, clock, 2)
    await second.reconcile()
    assert second.pool_status()["ready"] == 2
    assert len(runtime.removed) == 1 and len(runtime.containers) == 2
    assert len(second.registry) == 0


@pytest_twisted.ensureDeferred
async def test_a_dead_pool_container_is_removed_and_replaced(clock: Clock) -> None:
    """A pool container that dies (event) or is found stopped (reconcile) is removed from
    the engine and the pool, and a replacement is started."""
    runtime = FakeRuntime()
    manager = pooled(runtime, clock, 2)
    manager.startService()
    try:
        await manager.reconcile()
        died, stopped = manager._pool
        runtime.kill(died.container_id, emit=True)
        assert died.container_id in runtime.removed
        runtime.kill(stopped.container_id)
        await manager.reconcile()
        assert stopped.container_id in runtime.removed
        ids = {s.container_id for s in manager._pool}
        assert len(ids) == 2 and not ids & {died.container_id, stopped.container_id}
        assert runtime.creates == 4
        assert len(manager.registry) == 0
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_vanished_pool_container_leaves_the_pool(clock: Clock) -> None:
    """A pool container removed outside the gateway (destroy event) leaves the pool."""
    runtime = FakeRuntime()
    manager = pooled(runtime, clock, 1)
    manager.startService()
    try:
        await manager.reconcile()
        (gone,) = manager._pool
        del runtime.containers[gone.container_id]
        runtime.watchers[-1](ContainerEvent(gone.sandbox_id, gone.container_id, "destroy"))
        assert gone.sandbox_id not in {s.sandbox_id for s in manager._pool}
        assert gone.container_id not in runtime.removed  # nothing left to remove
    finally:
        await manager.stopService()


def test_exit_details_say_what_happened() -> None:
    """How a stopped container is described in removal records and close reasons."""
    assert exit_detail(137, True) == "killed: out of memory"
    assert exit_detail(None, False) == "container stopped"
    assert exit_detail(3, False) == "container exited with code 3"


@pytest_twisted.ensureDeferred
async def test_foreign_dead_containers_are_not_mourned(clock: Clock) -> None:
    """A stopped container of another instance gets no removal record here."""
    runtime = FakeRuntime()
    other = runtime.add_foreign(spec(), running=False)
    manager = pooled(runtime, clock, 0)
    await manager.reconcile()
    assert manager.graveyard.get(other.sandbox_id, clock.seconds()) is None


@pytest_twisted.ensureDeferred
async def test_an_out_of_memory_pool_container_stays_in_the_pool(clock: Clock) -> None:
    """Only ``die`` and ``destroy`` take a container out of the pool, not ``oom``."""
    runtime = FakeRuntime()
    manager = pooled(runtime, clock, 1)
    manager.startService()
    try:
        await manager.reconcile()
        (ready,) = manager._pool
        runtime.watchers[-1](ContainerEvent(ready.sandbox_id, ready.container_id, "oom"))
        assert manager._pool == [ready] and runtime.removed == []
        assert runtime.creates == 1
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_pool_containers_are_created_with_the_default_idle_timeout(clock: Clock) -> None:
    """A pool container is created now, labelled with the server's idle timeout."""
    runtime = FakeRuntime()
    manager = pooled(runtime, clock, 1)
    manager.startService()
    try:
        await manager.reconcile()
        (info,) = runtime.containers.values()
        assert info.for_pool and info.created_at == clock.seconds()
        assert info.settings.idle_timeout == manager.policy.idle_timeout
    finally:
        await manager.stopService()


def _totals(status: dict[str, object]) -> dict[str, object]:
    """The pool's totals (``size``, ``ready``, ``filling``), without the per-template split."""
    return {key: status[key] for key in ("size", "ready", "filling")}


class HangingRuntime(FakeRuntime):
    """A fake engine whose creates hang (never answer) while ``hang`` is set.

    It keeps every hanging Deferred, as the real runtime's thread pool keeps its work: a
    Deferred nobody refers to would let the garbage collector close the coroutine awaiting
    it, which ends the fill (``finally``) at a moment that depends on the collector.
    """

    hang = False

    def __init__(self) -> None:
        super().__init__()
        self.hanging: list[Deferred[ContainerInfo]] = []

    def create(self, spec: ContainerSpec) -> Deferred[ContainerInfo]:
        if self.hang:
            d: Deferred[ContainerInfo] = Deferred()
            self.hanging.append(d)
            return d
        return super().create(spec)


def _pool_spec(template: str = "default") -> ContainerSpec:
    base = spec(template=template)
    return ContainerSpec(base.sandbox_id, base.created_at, base.agent_secret, base.settings, True)


@pytest_twisted.ensureDeferred
async def test_a_pool_container_of_an_unserved_template_is_removed_on_restart(
    clock: Clock, log_messages: list[str]
) -> None:
    """A pool container left by an earlier run for a template this gateway has no pool for is
    removed (by its sandbox id), not adopted; one of a served template is adopted, and the log
    says which."""
    runtime = FakeRuntime()
    kept = await runtime.create(_pool_spec())
    gone = await runtime.create(_pool_spec("retired"))
    manager = pooled(runtime, clock, 1)
    await manager.reconcile()
    assert [s.sandbox_id for s in manager._pool] == [kept.sandbox_id]
    assert runtime.removed == [gone.container_id]
    assert runtime.removed_sandboxes == [gone.sandbox_id]
    assert f"adopted pool container {kept.sandbox_id}" in log_messages


@pytest_twisted.ensureDeferred
async def test_pool_containers_being_created_count_against_adoption(clock: Clock) -> None:
    """A restarted gateway whose pool is already being filled adopts an earlier run's pool
    container only into room left by the fills under way: with the one place taken by a
    create in progress, the old container is removed."""
    runtime = HangingRuntime()
    manager = pooled(runtime, clock, 1)
    runtime.hang = True
    manager.startService()
    try:
        assert _totals(manager.pool_status()) == {"size": 1, "ready": 0, "filling": 1}
        runtime.hang = False
        gc.collect()  # the fill under way must survive a collection (it did not once, in CI)
        old = await runtime.create(_pool_spec())
        await manager.reconcile()
        assert runtime.removed_sandboxes == [old.sandbox_id]
        assert _totals(manager.pool_status()) == {"size": 1, "ready": 0, "filling": 1}
    finally:
        await manager.stopService()


class UnsavableState(StateFile):
    """A state file whose every save fails (a full or read-only disk)."""

    def save(self, sandboxes: Any) -> Deferred[None]:
        return fail(OSError(28, "No space left on device"))


@pytest_twisted.ensureDeferred
async def test_a_hand_out_starts_the_sandboxs_life_and_activity_now(clock: Clock) -> None:
    """A pool container waited a while; handed out, its sandbox is created and active as of
    the hand-out, not as of the container's start."""
    runtime = FakeRuntime()
    manager = pooled(runtime, clock, 1)
    manager.startService()
    try:
        await manager.reconcile()
        clock.advance(50)
        handed = await manager.create()
        assert handed.from_pool
        assert handed.created_at == clock.seconds()
        assert handed.last_activity == clock.seconds()
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_hand_out_that_cannot_be_recorded_is_dropped_for_a_cold_create(
    clock: Clock, log_messages: list[str]
) -> None:
    """If the state file cannot record a hand-out, the pool container is removed (by its
    sandbox id, so a restart cannot pool it again), the log says so, and the creator gets a
    cold container instead."""
    runtime = FakeRuntime()
    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        pool_size=1,
        state=UnsavableState(None, clock),
    )
    manager.startService()
    try:
        await manager.reconcile()
        (pooled_one,) = manager._pool
        created = await manager.create()
        assert not created.from_pool and created.sandbox_id != pooled_one.sandbox_id
        assert pooled_one.sandbox_id in runtime.removed_sandboxes
        assert "could not record a pool hand-out; creating cold instead" in log_messages
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_reconcile_during_a_pool_fill_leaves_the_new_container_alone(
    clock: Clock,
) -> None:
    """A pool container is created and its agent not ready yet: a reconcile that lists it
    neither adopts nor removes it; once ready, it is the pool's one container."""
    waiting: list[Deferred[None]] = []

    def wait_ready(info: ContainerInfo) -> Deferred[None]:
        waiting.append(Deferred())
        return waiting[-1]

    runtime = FakeRuntime()
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=wait_ready, pool_size=1)
    manager.startService()
    try:
        assert len(waiting) == 1 and len(runtime.containers) == 1
        await manager.reconcile()
        assert runtime.removed == [] and manager._pool == []
        waiting[0].callback(None)
        assert _totals(manager.pool_status()) == {"size": 1, "ready": 1, "filling": 0}
        assert runtime.removed == [] and len(runtime.containers) == 1
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_failed_fill_is_logged_with_template_error_and_retry_delay(
    clock: Clock, log_messages: list[str]
) -> None:
    """The operator reads which template's pool could not grow, why, and when it retries;
    the retry is for that template."""
    runtime = RefusingRuntime()
    manager = pooled(runtime, clock, 1)
    manager.startService()
    try:
        await manager.reconcile()
        delay = manager._pool_retry["default"].getTime() - clock.seconds()
        assert (
            f"could not add to the warm pool of template default (no room); "
            f"retrying in {delay:.1f} s" in log_messages
        )
        runtime.refuse = False
        clock.advance(delay)
        assert _totals(manager.pool_status()) == {"size": 1, "ready": 1, "filling": 0}
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_pool_status_shows_fills_under_way_per_template(clock: Clock) -> None:
    """Per template, ``filling`` counts that template's creates in progress (0 when none)."""
    runtime = HangingRuntime()
    runtime.hang = True
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready, pool_size=2)
    assert manager.pool_status()["templates"]["default"] == {"size": 2, "ready": 0, "filling": 0}
    manager.startService()
    try:
        status = manager.pool_status()
        assert status["templates"]["default"] == {"size": 2, "ready": 0, "filling": 2}
    finally:
        await manager.stopService()


# -- issue 13: what the pool's surviving mutants showed unguarded --------------------------------


@pytest_twisted.ensureDeferred
async def test_a_hand_out_is_logged_and_a_failed_drop_too(
    clock: Clock, log_messages: list[str]
) -> None:
    """A hand-out names the sandbox in the log; when one cannot be recorded and removing its
    container fails as well, that failure is logged, not lost."""
    runtime = FakeRuntime()
    manager = pooled(runtime, clock, 1)
    manager.startService()
    try:
        await manager.reconcile()
        handed = await manager.create()
        assert f"sandbox {handed.sandbox_id} handed out from the warm pool" in log_messages
    finally:
        await manager.stopService()
    runtime = FakeRuntime()
    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        pool_size=1,
        state=UnsavableState(None, clock),
    )
    manager.startService()
    try:
        await manager.reconcile()
        runtime.fail_removes = 1
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            created = await manager.create()
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert not created.from_pool
        assert "removing a pool container failed" in log_messages
        (failed,) = [e for e in events if e.get("log_format") == "removing a pool container failed"]
        assert str(failed["log_failure"].value) == "fake remove failure"  # the cause, kept
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_pool_fill_waits_for_its_own_containers_agent(clock: Clock) -> None:
    """A pool container joins the pool once its own agent is ready (the wait is given that
    container); one whose agent never answers is removed by its sandbox id."""
    from twistedgw.agents import AgentUnavailable

    waited: list[str] = []

    async def refuse(info: ContainerInfo) -> None:
        waited.append(info.container_id)
        raise AgentUnavailable("no agent")

    runtime = FakeRuntime()
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=refuse, pool_size=1)
    manager.startService()
    try:
        assert waited == ["container0001"]
        assert runtime.removed == ["container0001"]
        assert runtime.removed_sandboxes == [runtime.specs[0].sandbox_id]
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_backing_off_template_does_not_hold_up_the_others_pools(clock: Clock) -> None:
    """The default template's image is missing (its pool backs off); the python template's
    pool still fills, is refilled after a hand-out, and once the default image appears the
    default pool's own retry fills it."""
    from tests.test_templates import facts, make_manager

    runtime = FakeRuntime()
    runtime.images = {"gw-python": facts()}
    manager = make_manager(runtime, clock, pool_sizes={"default": 1, "python": 1})
    manager.startService()
    try:
        await manager.reconcile()
        assert "default" in manager._pool_retry
        assert _totals_of(manager, "python") == 1
        handed = await manager.create(
            settings_from_body(manager.policy, {"template": "python"}, None, None)
        )
        assert handed.from_pool
        assert _totals_of(manager, "python") == 1  # refilled while default backs off
        runtime.images["gw-default"] = facts()
        clock.advance(2.0)
        assert _totals_of(manager, "default") == 1
        assert manager._pool_retry == {}
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_non_default_template_pool_is_retried_after_its_backoff(clock: Clock) -> None:
    """A template other than the default whose image is missing: once it appears, that
    template's own retry fills its pool."""
    from tests.test_templates import facts, make_manager

    runtime = FakeRuntime()
    runtime.images = {"gw-default": facts()}
    manager = make_manager(runtime, clock, pool_sizes={"default": 0, "python": 1})
    manager.startService()
    try:
        await manager.reconcile()
        assert "python" in manager._pool_retry
        runtime.images["gw-python"] = facts()
        clock.advance(2.0)
        assert _totals_of(manager, "python") == 1
        assert manager._pool_retry == {}
    finally:
        await manager.stopService()


def _totals_of(manager: SandboxManager, template: str) -> int:
    return len(manager._pooled(template))
