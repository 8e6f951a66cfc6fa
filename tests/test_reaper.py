"""Idle reaping and reconciliation, driven by a Clock."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from tests.test_sandbox import Client
from twistedgw.agents import IAgents, NoAgents
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import settings_from_body
from twistedgw.reaper import PROCESS_QUERY_TIMEOUT, Reaper, make_reaper_service
from twistedgw.runtime.interface import ContainerEvent
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.web.events import SandboxEvents


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


# -- running processes count as activity (issue 14) --------------------------------------------


class _Link:
    closed = False

    def close(self) -> None:
        self.closed = True


@implementer(IAgents)
class _ProcessAgents(NoAgents):
    """Agents whose process table says ``running`` processes run; counts the questions."""

    def __init__(self, running: int) -> None:
        self.running = running
        self.asked = 0
        self.links: list[_Link] = []

    def connect(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        link = _Link()
        self.links.append(link)
        return succeed(link)

    def list_processes(self, link: Any, timeout: float) -> Deferred[list[dict[str, Any]]]:
        self.asked += 1
        return succeed([{"pid": 10 + i, "state": "running"} for i in range(self.running)])


@pytest_twisted.ensureDeferred
async def test_a_running_process_keeps_an_idle_sandbox_until_its_lifetime(
    manager: SandboxManager, clock: Clock
) -> None:
    """Idle past its timeout with a process still running: kept (and the agent link closed);
    once the process is gone it is reaped; the lifetime wins over processes."""
    agents = _ProcessAgents(running=1)
    manager.agents = agents
    sandbox = await manager.create()
    reaper = Reaper(manager)
    clock.advance(150)  # idle timeout 100
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry
    assert agents.asked == 1 and all(link.closed for link in agents.links)
    agents.running = 0
    clock.advance(150)
    await reaper.sweep()
    assert sandbox.sandbox_id not in manager.registry


@pytest_twisted.ensureDeferred
async def test_processes_do_not_outlive_the_lifetime(manager: SandboxManager, clock: Clock) -> None:
    """An idle sandbox with running processes and a 1000 s lifetime, swept every 60 s, is kept
    at 960 s and removed at the sweep after its lifetime (1020 s)."""
    manager.agents = _ProcessAgents(running=3)
    settings = settings_from_body(manager.policy, {"max_lifetime": 1000}, None, None)
    sandbox = await manager.create(settings)
    reaper = Reaper(manager)
    for _ in range(16):
        clock.advance(60)
        await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry  # 960 s, idle, processes running
    clock.advance(60)
    await reaper.sweep()
    assert sandbox.sandbox_id not in manager.registry


@pytest_twisted.ensureDeferred
async def test_idle_warning_is_published_once_before_idle_removal(
    manager: SandboxManager, clock: Clock
) -> None:
    """With ``warn_before=30`` and a 100 s idle timeout: no warning 40 s before removal; two
    sweeps within the last 30 s publish one ``idle_warning`` (``remove_in`` 20); the sandbox is
    removed once idle past 100 s."""
    manager.agents = _ProcessAgents(running=0)
    events = SandboxEvents()
    sandbox = await manager.create()
    heard: list[tuple[str, dict[str, Any]]] = []
    events.subscribe(sandbox.sandbox_id, lambda name, data: heard.append((name, data)))
    reaper = Reaper(manager, events, warn_before=30)
    clock.advance(60)  # 40 s before removal: no warning yet
    await reaper.sweep()
    assert heard == []
    clock.advance(20)  # 20 s before removal
    await reaper.sweep()
    clock.advance(5)
    await reaper.sweep()
    assert [name for name, _ in heard] == ["idle_warning"]
    assert heard[0][1]["remove_in"] == pytest.approx(20)
    clock.advance(20)
    await reaper.sweep()
    assert sandbox.sandbox_id not in manager.registry


@pytest_twisted.ensureDeferred
async def test_paused_sandbox_is_kept_for_the_paused_timeout(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """A paused sandbox is not reaped as idle (its idle timeout is 100 s here) until
    --paused-timeout has passed since the pause; resumed, its idle clock starts again."""
    manager.paused_timeout = 1000
    sandbox = await manager.create()
    reaper = Reaper(manager)
    await manager.pause(sandbox.sandbox_id)
    assert runtime.paused == {sandbox.container_id}
    clock.advance(500)
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry
    await manager.resume(sandbox.sandbox_id)
    assert runtime.paused == set()
    clock.advance(90)
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry
    await manager.pause(sandbox.sandbox_id)
    clock.advance(999)
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry
    clock.advance(2)
    await reaper.sweep()
    assert sandbox.sandbox_id not in manager.registry


@pytest_twisted.ensureDeferred
async def test_a_paused_sandbox_is_neither_asked_for_processes_nor_warned(
    manager: SandboxManager, clock: Clock
) -> None:
    """A paused sandbox's agent is frozen: the reaper does not query it (that would wait out
    the timeout) and publishes no ``idle_warning``; --paused-timeout governs it instead."""
    agents = _ProcessAgents(running=0)
    manager.agents = agents
    manager.paused_timeout = 1000
    events = SandboxEvents()
    sandbox = await manager.create()
    heard: list[str] = []
    events.subscribe(sandbox.sandbox_id, lambda name, data: heard.append(name))
    await manager.pause(sandbox.sandbox_id)
    reaper = Reaper(manager, events, warn_before=30)
    clock.advance(90)  # 10 s before an idle removal, were it not paused
    await reaper.sweep()
    clock.advance(50)
    await reaper.sweep()
    assert agents.asked == 0
    assert heard == []
    assert sandbox.sandbox_id in manager.registry


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


# -- issue 13: what the reaper's surviving mutants showed unguarded ------------------------------


@implementer(IAgents)
class _AgentsBySecret(NoAgents):
    """Agents answering per sandbox (by the secret the reaper connects with); records how each
    was asked, and fails for the secrets in ``broken``."""

    def __init__(self, running: dict[str, int], broken: frozenset[str] = frozenset()) -> None:
        self.running = running
        self.broken = broken
        self.connects: list[tuple[Any, ...]] = []
        self.listed: list[tuple[str, float]] = []
        self.links: list[_Link] = []

    def connect(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        host, port, secret = args
        self.connects.append((host, port, secret, kwargs))
        if secret in self.broken:
            raise ConnectionRefusedError(f"agent of {secret} is down")
        link = _Link()
        link.secret = secret  # type: ignore[attr-defined]
        self.links.append(link)
        return succeed(link)

    def list_processes(self, link: Any, timeout: float) -> Deferred[list[dict[str, Any]]]:
        self.listed.append((link.secret, timeout))
        count = self.running.get(link.secret, 0)
        return succeed(
            [{"pid": 1, "state": "exited"}]
            + [{"pid": 10 + i, "state": "running"} for i in range(count)]
        )


def _warnings(events: SandboxEvents, *sandboxes: Any) -> list[tuple[str, dict[str, Any]]]:
    heard: list[tuple[str, dict[str, Any]]] = []
    for sandbox in sandboxes:
        events.subscribe(
            sandbox.sandbox_id,
            lambda name, data, sid=sandbox.sandbox_id: heard.append((sid, data)),
        )
    return heard


@pytest_twisted.ensureDeferred
async def test_default_idle_warning_comes_sixty_seconds_before_removal(
    manager: SandboxManager, clock: Clock
) -> None:
    """Without ``warn_before`` the warning comes when 60 s of idleness are left: not at 60.5 s,
    and already at exactly 60 s."""
    manager.agents = _AgentsBySecret({})
    events = SandboxEvents()
    sandbox = await manager.create()
    heard = _warnings(events, sandbox)
    reaper = Reaper(manager, events)
    clock.advance(39.5)  # idle timeout 100: 60.5 s left
    await reaper.sweep()
    assert heard == []
    clock.advance(0.5)  # exactly 60 s left
    await reaper.sweep()
    assert heard == [(sandbox.sandbox_id, {"idle_for": 40.0, "remove_in": 60.0})]


@pytest_twisted.ensureDeferred
async def test_a_sandbox_found_past_its_idle_timeout_is_warned_with_zero_left_then_reaped(
    manager: SandboxManager, clock: Clock
) -> None:
    """A sweep that first sees a sandbox already past its idle timeout (the gateway was busy)
    still publishes ``idle_warning``, with ``remove_in`` 0 (never negative, never made up),
    and removes it in the same sweep."""
    manager.agents = _AgentsBySecret({})
    events = SandboxEvents()
    sandbox = await manager.create()
    heard = _warnings(events, sandbox)
    clock.advance(100.5)
    await Reaper(manager, events, warn_before=30).sweep()
    assert heard == [(sandbox.sandbox_id, {"idle_for": 100.5, "remove_in": 0.0})]
    assert sandbox.sandbox_id not in manager.registry


@pytest_twisted.ensureDeferred
async def test_paused_sandbox_is_kept_at_exactly_the_paused_timeout(
    manager: SandboxManager, clock: Clock
) -> None:
    """--paused-timeout is how long a paused sandbox is kept: removed only once it is passed."""
    manager.paused_timeout = 1000
    sandbox = await manager.create()
    await manager.pause(sandbox.sandbox_id)
    reaper = Reaper(manager)
    clock.advance(1000)
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry
    clock.advance(0.5)
    await reaper.sweep()
    assert sandbox.sandbox_id not in manager.registry


@pytest_twisted.ensureDeferred
async def test_an_attached_sandbox_is_not_asked_for_processes_even_with_a_long_warning(
    manager: SandboxManager, clock: Clock
) -> None:
    """A sandbox with a client is in use: with ``warn_before`` longer than its idle timeout,
    it is still neither asked for its processes nor warned."""
    agents = _AgentsBySecret({})
    manager.agents = agents
    events = SandboxEvents()
    sandbox = await manager.create()
    heard = _warnings(events, sandbox)
    sandbox.attach(Client(), manager.now())
    clock.advance(50)
    await Reaper(manager, events, warn_before=500).sweep()
    assert agents.connects == []
    assert heard == []


@pytest_twisted.ensureDeferred
async def test_every_sandbox_is_checked_whatever_the_one_before_it(
    manager: SandboxManager, clock: Clock
) -> None:
    """One sweep looks at every sandbox: one paused, one far from removal, and one with a
    running process before it do not keep the last one from its warning."""
    manager.paused_timeout = 10_000
    paused = await manager.create()
    fresh = await manager.create()
    busy = await manager.create()
    idle = await manager.create()
    agents = _AgentsBySecret({busy.agent_secret: 1})
    manager.agents = agents
    events = SandboxEvents()
    heard = _warnings(events, paused, fresh, busy, idle)
    await manager.pause(paused.sandbox_id)
    clock.advance(50)
    fresh.touch(manager.now())
    await Reaper(manager, events, warn_before=60).sweep()
    assert heard == [(idle.sandbox_id, {"idle_for": 50.0, "remove_in": 50.0})]
    assert busy.last_activity == manager.now()  # its running process counted as activity
    assert [secret for secret, _ in agents.listed] == [busy.agent_secret, idle.agent_secret]


@pytest_twisted.ensureDeferred
async def test_the_process_query_reaches_the_sandboxs_own_agent_with_a_bounded_wait(
    manager: SandboxManager, clock: Clock
) -> None:
    """The reaper asks the sandbox's agent (its address, secret and socket) and waits at most
    ``PROCESS_QUERY_TIMEOUT`` for the connection and for the list; its running processes
    (not its exited ones) keep it."""
    sandbox = await manager.create()
    sandbox.agent_socket = "/run/twistedgw/sockets/x/agent.sock"
    agents = _AgentsBySecret({sandbox.agent_secret: 1})
    manager.agents = agents
    clock.advance(150)
    await Reaper(manager).sweep()
    assert agents.connects == [
        (
            sandbox.agent_host,
            sandbox.agent_port,
            sandbox.agent_secret,
            {"timeout": PROCESS_QUERY_TIMEOUT, "unix_socket": sandbox.agent_socket},
        )
    ]
    assert agents.listed == [(sandbox.agent_secret, PROCESS_QUERY_TIMEOUT)]
    assert sandbox.sandbox_id in manager.registry
    assert all(link.closed for link in agents.links)


@pytest_twisted.ensureDeferred
async def test_sweep_failures_and_removals_are_logged_by_sandbox_and_reason(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock, log_messages: list[str]
) -> None:
    """What an operator reads about a sweep: Docker not answering, a failed removal, a removal
    (sandbox and reason), an agent that could not be asked (and why), an unsaved state file."""
    stuck = await manager.create()
    reaped = await manager.create()
    manager.agents = _AgentsBySecret({}, broken=frozenset({stuck.agent_secret}))

    def no_state() -> Deferred[None]:
        raise OSError("disk full")

    manager.save_state = no_state  # type: ignore[method-assign]
    reaper = Reaper(manager)
    clock.advance(150)
    runtime.available = False
    await reaper.sweep()  # no Docker: reconcile and both removals fail
    runtime.available = True
    runtime.fail_removes = 1  # the first removal (stuck's) fails again
    await reaper.sweep()
    assert "reconciliation failed; reaping from the cached registry" in log_messages
    assert f"could not remove sandbox {stuck.sandbox_id} (idle)" in log_messages
    assert f"reaped sandbox {reaped.sandbox_id} (reason: idle)" in log_messages
    assert (
        f"could not list processes of {stuck.sandbox_id}: agent of {stuck.agent_secret} is down"
        in log_messages
    )
    assert "could not save the state file" in log_messages
