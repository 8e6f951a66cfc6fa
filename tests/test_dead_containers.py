"""Stopped containers found by reconciliation are removed once, and again after a failed
removal: the removal keeps other passes off the container while it runs, and only while it
runs. Over the fake runtime."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tests.runtime_contract import spec
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import ContainerInfo, RuntimeUnavailable
from twistedgw.testing.fakes import FakeRuntime


async def _ready(info: ContainerInfo) -> None:
    return None


class SlowRemoveRuntime(FakeRuntime):
    """Removes only when the test fires the pending removal."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[str, Deferred[None]]] = []

    def remove(self, container_id: str, sandbox_id: str = "") -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.pending.append((container_id, d))
        return d

    def finish(self) -> None:
        container_id, d = self.pending.pop(0)
        self.containers.pop(container_id, None)
        d.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_reconcile_during_an_event_driven_removal_leaves_the_container_alone(
    clock: Clock,
) -> None:
    """A sandbox's container dies (event): its removal starts. A reconcile that runs while
    that removal is under way still lists the stopped container, and leaves it alone: one
    removal, not two. Once the removal is done, later passes are free to act on the id."""
    runtime = SlowRemoveRuntime()
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready)
    sandbox = await manager.create()
    manager.startService()
    try:
        runtime.kill(sandbox.container_id, emit=True)
        assert [c for c, _ in runtime.pending] == [sandbox.container_id]
        await manager.reconcile()
        assert [c for c, _ in runtime.pending] == [sandbox.container_id]
        runtime.finish()
        assert sandbox.sandbox_id not in manager._in_flight
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_failed_removal_is_retried_by_the_next_reconcile(clock: Clock) -> None:
    """A stopped container whose removal failed is not forgotten: the next reconcile removes
    it."""
    runtime = FakeRuntime()
    dead = await runtime.create(spec())
    runtime.kill(dead.container_id)
    runtime.fail_removes = 1
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready)
    with pytest.raises(RuntimeUnavailable):
        await manager.reconcile()
    assert dead.container_id in runtime.containers
    await manager.reconcile()
    assert dead.container_id not in runtime.containers
    assert runtime.removed_sandboxes == [dead.sandbox_id]
