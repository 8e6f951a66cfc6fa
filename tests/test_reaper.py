"""Idle reaping and reconciliation, driven by a Clock."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from tests.test_sandbox import Client
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.reaper import Reaper, make_reaper_service
from twistedgw.runtime.interface import ContainerEvent
from twistedgw.testing.fakes import FakeRuntime


@pytest_twisted.ensureDeferred
async def test_idle_sandbox_is_reaped_after_timeout(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """A sandbox with no clients is removed once idle longer than the timeout, not before."""
    sandbox = await manager.create()
    service = make_reaper_service(Reaper(manager), 10, clock)
    service.startService()
    try:
        clock.advance(90)
        assert sandbox.sandbox_id in manager.registry
        clock.advance(20)
        assert sandbox.sandbox_id not in manager.registry
        assert runtime.containers == {}
    finally:
        service.stopService()


@pytest_twisted.ensureDeferred
async def test_connected_sandbox_is_never_reaped(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """An attached client keeps a sandbox alive however long; idle time starts when it leaves."""
    sandbox = await manager.create()
    client = Client()
    sandbox.attach(client, manager.now())
    reaper = Reaper(manager)
    clock.advance(10_000)
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry
    sandbox.detach(client, manager.now())
    clock.advance(50)
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry
    clock.advance(51)
    await reaper.sweep()
    assert sandbox.sandbox_id not in manager.registry


@pytest_twisted.ensureDeferred
async def test_command_activity_defers_reaping(manager: SandboxManager, clock: Clock) -> None:
    """Command activity (touch) restarts the idle clock."""
    sandbox = await manager.create()
    reaper = Reaper(manager)
    clock.advance(90)
    sandbox.touch(manager.now())
    clock.advance(90)
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry


@pytest_twisted.ensureDeferred
async def test_failing_sweep_does_not_stop_later_sweeps(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """A sweep whose removal fails is logged; the timer keeps running and reaps next time."""
    sandbox = await manager.create()
    runtime.fail_removes = 1
    service = make_reaper_service(Reaper(manager), 10, clock)
    service.startService()
    try:
        clock.advance(110)  # idle: the sweep's remove fails
        assert sandbox.sandbox_id in manager.registry
        assert service.running
        clock.advance(10)  # the next sweep succeeds
        assert sandbox.sandbox_id not in manager.registry
    finally:
        service.stopService()


@pytest_twisted.ensureDeferred
async def test_docker_down_means_no_mass_delete(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """With the engine unreachable, sweeps neither forget sandboxes nor stop the timer: once
    it is back, the next sweep reconciles again (a container removed meanwhile is noticed)."""
    busy = await manager.create()
    gone = await manager.create()
    busy.attach(Client(), manager.now())
    runtime.available = False
    service = make_reaper_service(Reaper(manager), 10, clock)
    service.startService()
    try:
        clock.advance(30)  # sweeps at 0, 10, 20 and 30 s, each failing to reach Docker
        assert service.running and service._loop.running
        assert {s.sandbox_id for s in manager.registry} == {busy.sandbox_id, gone.sandbox_id}
        runtime.available = True
        del runtime.containers[gone.container_id]
        clock.advance(10)
        assert [s.sandbox_id for s in manager.registry] == [busy.sandbox_id]
    finally:
        service.stopService()


@pytest_twisted.ensureDeferred
async def test_reconcile_forgets_vanished_and_dead_containers(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    """A container removed or stopped behind our back is forgotten; its clients are closed."""
    gone = await manager.create()
    dead = await manager.create()
    alive = await manager.create()
    watcher = Client()
    dead.attach(watcher, manager.now())
    del runtime.containers[gone.container_id]
    runtime.kill(dead.container_id)
    await manager.reconcile()
    assert [s.sandbox_id for s in manager.registry] == [alive.sandbox_id]
    assert dead.container_id in runtime.removed
    assert watcher.closed and watcher.closed[0][0] == 1011


@pytest_twisted.ensureDeferred
async def test_reconcile_adopts_running_containers(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """Containers of ours that the registry does not know (a restart) are adopted."""
    first = await manager.create()
    fresh = SandboxManager(type(manager.registry)(), runtime, clock, policy=manager.policy)
    await fresh.reconcile()
    adopted = fresh.lookup(first.sandbox_id)
    assert adopted.created_at == first.created_at
    assert adopted.agent_secret == first.agent_secret


@pytest_twisted.ensureDeferred
async def test_external_removal_is_recorded_as_exited(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """A container removed or stopped outside the gateway is remembered as ``exited`` (with
    what happened), never as ``deleted``, which means a client asked for it; only a DELETE
    through the gateway is ``deleted``."""
    vanished = await manager.create()
    stopped = await manager.create()
    destroyed = await manager.create()
    deleted = await manager.create()
    del runtime.containers[vanished.container_id]
    runtime.kill(stopped.container_id, exit_code=3)
    manager.startService()
    try:
        await manager.reconcile()
        runtime.watchers[-1](
            ContainerEvent(destroyed.sandbox_id, destroyed.container_id, "destroy")
        )
        await manager.delete(deleted.sandbox_id)
    finally:
        await manager.stopService()
    now = clock.seconds()
    found = {
        s.sandbox_id: manager.graveyard.get(s.sandbox_id, now)
        for s in (vanished, stopped, destroyed, deleted)
    }
    assert {k: (t.reason if t else None) for k, t in found.items()} == {
        vanished.sandbox_id: "exited",
        stopped.sandbox_id: "exited",
        destroyed.sandbox_id: "exited",
        deleted.sandbox_id: "deleted",
    }
    assert found[vanished.sandbox_id].detail == "container removed outside the gateway"
    assert found[destroyed.sandbox_id].detail == "container removed outside the gateway"
    assert "3" in found[stopped.sandbox_id].detail


@pytest_twisted.ensureDeferred
async def test_out_of_memory_events_keep_the_sandbox(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    """An ``oom`` event (a process in the sandbox was OOM-killed; the container lives on) is
    only logged: the sandbox stays, and so does a pool container; events about unknown
    sandboxes or other containers of a sandbox are ignored."""
    sandbox = await manager.create()
    manager.startService()
    try:
        notify = runtime.watchers[-1]
        notify(ContainerEvent(sandbox.sandbox_id, sandbox.container_id, "oom"))
        notify(ContainerEvent("f" * 32, "elsewhere", "die", 1))
        notify(ContainerEvent(sandbox.sandbox_id, "an-older-container", "die", 1))
        assert manager.lookup(sandbox.sandbox_id) is sandbox
        assert runtime.removed == []
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_dead_containers_are_removed_with_their_sandbox_id(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    """A container found dead, or reported dead, is removed naming its sandbox (the Docker
    runtime removes the sandbox's socket directory by that id)."""
    found = await manager.create()
    reported = await manager.create()
    runtime.kill(found.container_id)
    await manager.reconcile()
    manager.startService()
    try:
        runtime.kill(reported.container_id, emit=True)
    finally:
        await manager.stopService()
    removals = dict(zip(runtime.removed, runtime.removed_sandboxes, strict=True))
    assert removals == {
        found.container_id: found.sandbox_id,
        reported.container_id: reported.sandbox_id,
    }
