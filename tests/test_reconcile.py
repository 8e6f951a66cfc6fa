"""Reconciliation over the fake runtime: what a full listing does with each container it finds
(adopt, leave alone, remove, bury), recovery at start-up, and what the operator reads."""

from __future__ import annotations

import re

import attrs
import pytest_twisted
from twisted.internet.task import Clock

from tests.test_sandbox import Client
from tests.test_templates import facts, make_manager
from twistedgw.lifecycle.core import CLOSE_SANDBOX_GONE
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import settings_from_body
from twistedgw.testing.fakes import FakeRuntime


def restarted(manager: SandboxManager) -> SandboxManager:
    """A second gateway over the same engine, as after a restart (nothing in its registry)."""
    return SandboxManager(
        type(manager.registry)(),
        manager.runtime,
        manager._reactor,
        wait_ready=manager._wait_ready,
        policy=manager.policy,
    )


@pytest_twisted.ensureDeferred
async def test_recovery_is_logged_with_its_count_and_a_later_start_backs_off_from_one_second(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock, log_messages: list[str]
) -> None:
    """Start-up with Docker away retries after 1 s (plus up to 1 s of jitter), then 2 s; once
    recovered the operator reads how many sandboxes are served, and the back-off starts over:
    a later start with Docker away retries within 1 to 2 s again."""
    await manager.create()
    await manager.create()
    fresh = restarted(manager)
    runtime.available = False
    fresh.startService()
    clock.advance(2.0)  # the first retry, failing too
    runtime.available = True
    clock.advance(3.0)
    assert fresh.recovered
    assert "recovered 2 sandboxes from Docker; serving them" in log_messages
    await fresh.stopService()
    runtime.available = False
    fresh.startService()
    retries = [m for m in log_messages if m.startswith("could not recover sandboxes")]
    assert len(retries) == 3
    delay = float(re.fullmatch(r".*retrying in ([0-9.]+) s", retries[-1]).group(1))  # type: ignore[union-attr]
    # 1 s plus jitter in [0, 1), logged to one decimal: 1.97 s reads "2.0".
    assert 1.0 <= delay <= 2.0
    runtime.available = True
    clock.advance(2.0)
    assert fresh.recovered
    await fresh.stopService()


@pytest_twisted.ensureDeferred
async def test_a_reconcile_reads_the_template_images_again(clock: Clock) -> None:
    """A template's image rebuilt under the same name (new labels, new id) is seen by the
    next reconcile, without a restart."""
    runtime = FakeRuntime()
    runtime.images = {"gw-default": facts(), "gw-python": facts()}
    manager = make_manager(runtime, clock)
    await manager.reconcile()
    rebuilt = attrs.evolve(facts({"org.twistedgw.memory": "2g"}), image_id="sha256:2")
    runtime.images["gw-python"] = rebuilt
    await manager.reconcile()
    assert manager.templates.facts["python"] == rebuilt


@pytest_twisted.ensureDeferred
async def test_a_container_with_a_malformed_sandbox_id_is_left_alone_and_the_rest_reconciled(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    """A container of ours whose sandbox id label is malformed (listed first) is neither
    adopted nor removed, and the containers after it are still reconciled: a dead one is
    removed, a vanished one forgotten."""
    dead = await manager.create()
    vanished = await manager.create()
    kept = await manager.create()
    odd = attrs.evolve(runtime.containers[kept.container_id], sandbox_id="../etc", running=False)
    runtime.containers = {"odd": odd, **runtime.containers}
    runtime.kill(dead.container_id)
    del runtime.containers[vanished.container_id]
    await manager.reconcile()
    assert "odd" in runtime.containers
    assert [s.sandbox_id for s in manager.registry] == [kept.sandbox_id]
    assert dead.container_id in runtime.removed


@pytest_twisted.ensureDeferred
async def test_a_restart_adopts_every_running_sandbox_and_logs_each(
    manager: SandboxManager, log_messages: list[str]
) -> None:
    """All running sandboxes are adopted by one reconcile after a restart, each logged."""
    first = await manager.create()
    second = await manager.create()
    fresh = restarted(manager)
    await fresh.reconcile()
    assert {s.sandbox_id for s in fresh.registry} == {first.sandbox_id, second.sandbox_id}
    for sandbox in (first, second):
        assert f"adopted running sandbox {sandbox.sandbox_id}" in log_messages


@pytest_twisted.ensureDeferred
async def test_a_container_found_dead_after_a_restart_is_buried_as_exited_with_its_owner(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock, log_messages: list[str]
) -> None:
    """A container that died while no gateway watched (found stopped by a restarted one) is
    removed, logged with what happened to it (an OOM kill says so), and leaves a tombstone:
    ``exited``, when it was found, the detail and its owner (so only they see it)."""
    settings = settings_from_body(manager.policy, {}, None, "alice")
    sandbox = await manager.create(settings)
    runtime.kill(sandbox.container_id)
    info = runtime.containers[sandbox.container_id]
    runtime.containers[sandbox.container_id] = attrs.evolve(info, oom_killed=True)
    clock.advance(30)
    fresh = restarted(manager)
    await fresh.reconcile()
    assert sandbox.container_id in runtime.removed
    tombstone = fresh.graveyard.get(sandbox.sandbox_id, clock.seconds())
    assert tombstone is not None
    assert (tombstone.reason, tombstone.removed_at, tombstone.detail, tombstone.owner) == (
        "exited",
        clock.seconds(),
        "killed: out of memory",
        "alice",
    )
    assert (
        f"sandbox {sandbox.sandbox_id}: container is not running (killed: out of memory); "
        "removing it"
    ) in log_messages


@pytest_twisted.ensureDeferred
async def test_a_vanished_sandbox_is_logged_and_its_clients_told_it_is_gone(
    manager: SandboxManager, runtime: FakeRuntime, log_messages: list[str]
) -> None:
    """A container removed behind the gateway's back: the log names the sandbox, and its
    attached clients are closed with the "sandbox gone" code."""
    sandbox = await manager.create()
    client = Client()
    sandbox.attach(client, manager.now())
    del runtime.containers[sandbox.container_id]
    await manager.reconcile()
    assert f"sandbox {sandbox.sandbox_id}: container vanished; forgetting it" in log_messages
    assert [code for code, _ in client.closed] == [CLOSE_SANDBOX_GONE]


class BrokenClient(Client):
    def disconnect(self, code: int, reason: str) -> None:
        raise ConnectionResetError("client gone already")


@pytest_twisted.ensureDeferred
async def test_a_client_that_fails_to_disconnect_is_logged_and_the_others_still_closed(
    manager: SandboxManager, runtime: FakeRuntime, log_messages: list[str]
) -> None:
    """Forgetting a vanished sandbox closes every client; one whose close fails is logged and
    does not keep the others open."""
    sandbox = await manager.create()
    broken, fine = BrokenClient(), Client()
    sandbox.attach(broken, manager.now())
    sandbox.attach(fine, manager.now())
    del runtime.containers[sandbox.container_id]
    await manager.reconcile()
    assert "disconnecting a client failed" in log_messages
    assert [code for code, _ in fine.closed] == [CLOSE_SANDBOX_GONE]
    assert manager.registry.get(sandbox.sandbox_id) is None


@pytest_twisted.ensureDeferred
async def test_a_network_less_sandbox_is_adopted_with_its_agent_socket(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    """A network-less sandbox (its agent on a Unix socket, no port) adopted after a restart
    keeps the socket path the engine reports, through which the gateway reaches its agent."""
    sandbox = await manager.create()
    info = runtime.containers[sandbox.container_id]
    socket = f"/state/sockets/gw/{sandbox.sandbox_id}/agent.sock"
    runtime.containers[sandbox.container_id] = attrs.evolve(info, agent_port=0, agent_socket=socket)
    fresh = restarted(manager)
    await fresh.reconcile()
    adopted = fresh.lookup(sandbox.sandbox_id)
    assert (adopted.agent_socket, adopted.agent_port) == (socket, 0)
