"""What the gateway tells its operator (the log) when Docker reports a container's death, an
out-of-memory kill or a removal behind its back, for sandboxes and for warm pool containers,
and when cleaning up after one fails. Over the fake runtime; events as the engine sends them."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import ContainerEvent, ContainerInfo
from twistedgw.testing.fakes import FakeRuntime


async def _ready(info: ContainerInfo) -> None:
    return None


def pooled(runtime: FakeRuntime, clock: Clock, size: int) -> SandboxManager:
    return SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready, pool_size=size)


@pytest_twisted.ensureDeferred
async def test_a_dead_pool_container_is_logged_and_removed_by_its_sandbox_id(
    clock: Clock, log_messages: list[str]
) -> None:
    """A pool container's ``die`` event: the log says it died and is replaced, and its removal
    names the sandbox (the engine call carries the id)."""
    runtime = FakeRuntime()
    manager = pooled(runtime, clock, 1)
    manager.startService()
    try:
        await manager.reconcile()
        (dead,) = manager._pool
        runtime.kill(dead.container_id, emit=True)
        assert "a warm pool container died; replacing it" in log_messages
        assert runtime.removed_sandboxes == [dead.sandbox_id]
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_failed_removal_of_a_dead_pool_container_is_logged(
    clock: Clock, log_messages: list[str]
) -> None:
    """When removing a dead pool container fails, the failure is logged, not lost."""
    runtime = FakeRuntime()
    manager = pooled(runtime, clock, 1)
    manager.startService()
    try:
        await manager.reconcile()
        (dead,) = manager._pool
        runtime.fail_removes = 1
        runtime.kill(dead.container_id, emit=True)
        assert "removing a dead container failed" in log_messages
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_an_out_of_memory_event_is_logged_and_the_sandbox_kept(
    manager: SandboxManager, runtime: FakeRuntime, log_messages: list[str]
) -> None:
    """``oom`` (a process in the sandbox was killed, the container lives on): logged with the
    sandbox id; the sandbox stays."""
    sandbox = await manager.create()
    manager.startService()
    try:
        event = ContainerEvent(sandbox.sandbox_id, sandbox.container_id, "oom")
        runtime.watchers[-1](event)
        assert f"sandbox {sandbox.sandbox_id}: out of memory" in log_messages
        assert manager.registry.get(sandbox.sandbox_id) is sandbox
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_dead_sandbox_is_logged_with_its_exit_code(
    manager: SandboxManager, runtime: FakeRuntime, log_messages: list[str]
) -> None:
    """A sandbox's container dies: the log names the sandbox, the event and the exit code;
    the container is removed by its sandbox id."""
    sandbox = await manager.create()
    manager.startService()
    try:
        runtime.kill(sandbox.container_id, exit_code=3, emit=True)
        assert (
            f"sandbox {sandbox.sandbox_id}: container die (container exited with code 3)"
            in log_messages
        )
        assert manager.registry.get(sandbox.sandbox_id) is None
        assert runtime.removed_sandboxes == [sandbox.sandbox_id]
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_sandbox_removed_behind_the_gateways_back_is_logged(
    manager: SandboxManager, runtime: FakeRuntime, log_messages: list[str]
) -> None:
    """``destroy`` of a sandbox's container (someone ran ``docker rm``): logged as removed
    outside the gateway."""
    sandbox = await manager.create()
    manager.startService()
    try:
        del runtime.containers[sandbox.container_id]
        runtime.watchers[-1](ContainerEvent(sandbox.sandbox_id, sandbox.container_id, "destroy"))
        assert (
            f"sandbox {sandbox.sandbox_id}: container destroy "
            "(container removed outside the gateway)" in log_messages
        )
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_failed_removal_of_a_dead_sandbox_is_logged(
    manager: SandboxManager, runtime: FakeRuntime, log_messages: list[str]
) -> None:
    """When removing a dead sandbox's container fails, the failure is logged, not lost."""
    sandbox = await manager.create()
    manager.startService()
    try:
        runtime.fail_removes = 1
        runtime.kill(sandbox.container_id, emit=True)
        assert "removing a dead container failed" in log_messages
    finally:
        await manager.stopService()
