"""Instance isolation in memory: a gateway shares its engine with other gateways' containers
and containers that are nobody's; it must never list, adopt, reap, remove or mourn them."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from tests.runtime_contract import spec
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy
from twistedgw.reaper import Reaper
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import ContainerInfo
from twistedgw.runtime.labels import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_SANDBOX_ID,
    instance_labels,
    labels_for,
)
from twistedgw.testing.fakes import FakeRuntime


async def _ready(info: ContainerInfo) -> None:
    return None


def test_instance_filter_names_both_labels() -> None:
    """The label filter selects our managed containers of exactly this instance."""
    assert instance_labels("gw-1") == [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}=gw-1"]


def engine_with_neighbours(runtime: FakeRuntime) -> list[ContainerInfo]:
    """Add running and dead containers that are not this gateway's."""
    neighbours = []
    for running in (True, False):
        other = spec()
        neighbours.append(runtime.add_foreign(other, running=running))
        unlabelled = spec()
        neighbours.append(
            runtime.add_foreign(unlabelled, {LABEL_SANDBOX_ID: unlabelled.sandbox_id}, running)
        )
        half = spec()
        labels = labels_for(half, runtime.instance)
        del labels[LABEL_INSTANCE]
        neighbours.append(runtime.add_foreign(half, labels, running))
    return neighbours


@pytest_twisted.ensureDeferred
async def test_reconcile_leaves_other_gateways_containers_alone(clock: Clock) -> None:
    """Reconcile, a reaper sweep and the warm pool see only this instance's containers:
    others' running ones are not adopted (nor pooled), others' dead ones are neither removed
    nor recorded as removed, and the engine keeps all of them."""
    runtime = FakeRuntime(instance="gw-a")
    neighbours = engine_with_neighbours(runtime)
    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        policy=LifecyclePolicy(idle_timeout=10),
        pool_size=1,
    )
    manager.startService()
    try:
        ours = await manager.create()
        await manager.reconcile()
        clock.advance(60)  # long past every idle timeout
        await Reaper(manager).sweep()
        await manager.reconcile()
        assert [s.sandbox_id for s in manager.registry] == []  # ours was reaped as idle
        assert ours.container_id in runtime.removed
        pooled = {s.sandbox_id for s in manager._pool}
        for info in neighbours:
            assert info.container_id in runtime.containers
            assert info.container_id not in runtime.removed
            assert info.sandbox_id not in pooled
            assert manager.graveyard.get(info.sandbox_id, clock.seconds()) is None
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_restarted_gateway_adopts_only_its_own(clock: Clock) -> None:
    """After a restart, only this instance's running containers come back as sandboxes."""
    runtime = FakeRuntime(instance="gw-a")
    first = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready)
    mine = await first.create()
    engine_with_neighbours(runtime)
    second = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready)
    await second.reconcile()
    assert [s.sandbox_id for s in second.registry] == [mine.sandbox_id]


@pytest_twisted.ensureDeferred
async def test_events_of_other_containers_do_not_reach_the_gateway(clock: Clock) -> None:
    """A neighbour that dies is not our event (the engine's event filter); ours still is."""
    runtime = FakeRuntime(instance="gw-a")
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready)
    manager.startService()
    try:
        seen: list[str] = []
        runtime.watch(lambda event: seen.append(event.container_id))
        ours = await manager.create()
        other = runtime.add_foreign(spec())
        runtime.kill(other.container_id, emit=True)
        assert seen == []
        runtime.kill(ours.container_id, emit=True)
        assert seen == [ours.container_id]
        assert manager.graveyard.get(ours.sandbox_id, clock.seconds()) is not None
    finally:
        await manager.stopService()
