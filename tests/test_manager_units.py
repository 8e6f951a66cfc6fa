"""The sandbox manager's smaller promises, in memory (``twistedgw.lifecycle.manager``):
keepalive's arithmetic and limit, pause and resume, who may look a sandbox up, what a
failed delete leaves, the capacity refusal, and the agent connection and its recovery."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from twistedgw.agents import AgentUnavailable
from twistedgw.lifecycle.errors import CapacityExceeded, InvalidSettings, SandboxNotFound
from twistedgw.lifecycle.manager import AgentRecovery, SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy, settings_from_body
from twistedgw.protocol import CLOSE_SANDBOX_REMOVED
from twistedgw.registry import SandboxRegistry
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.web.auth import owner_id


class Link:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class ScriptedAgents:
    """``IAgents`` answering from scripts: each connect takes the next outcome."""

    def __init__(self, connects: list[Any], sessions: set[str] | None = None) -> None:
        self.connects = connects
        self.sessions = sessions or set()
        self.calls: list[tuple[Any, ...]] = []

    def wait_ready(self, *args: Any, **kwargs: Any) -> Deferred[None]:
        return succeed(None)

    def connect(
        self,
        host: str,
        port: int,
        secret: str,
        timeout: float,
        max_message_size: int = 0,
        unix_socket: str | None = None,
    ) -> Deferred[Any]:
        self.calls.append((host, port, secret, timeout, max_message_size, unix_socket))
        outcome = self.connects.pop(0) if self.connects else AgentUnavailable("no more")
        return fail(outcome) if isinstance(outcome, Exception) else succeed(outcome)

    def list_sessions(self, link: Any, timeout: float) -> Deferred[set[str]]:
        return succeed(set(self.sessions))

    def list_processes(self, link: Any, timeout: float) -> Deferred[list[dict[str, Any]]]:
        return succeed([])


async def _ready(info: Any) -> None:
    return None


def make_manager(
    runtime: FakeRuntime, clock: Clock, agents: Any = None, **policy: Any
) -> SandboxManager:
    return SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        policy=LifecyclePolicy(**{"idle_timeout": 100, "max_sandboxes": 5, **policy}),
        agents=agents,
        agent_connect_timeout=7.0,
        max_message_size=4321,
        agent_recovery_timeout=1.0,
    )


@pytest_twisted.ensureDeferred
async def test_keepalive_pushes_the_lifetime_out_but_never_in(
    runtime: FakeRuntime, clock: Clock
) -> None:
    """``extend_by`` sets the expiry to now + extend_by when that is later, keeps a later
    one, counts as activity, and may equal the server's maximum lifetime but not exceed it
    (the 400 says the maximum)."""
    manager = make_manager(runtime, clock, max_lifetime=1000)
    sandbox = await manager.create(settings_from_body(manager.policy, {"max_lifetime": 500}))
    start = clock.seconds()
    assert sandbox.expires_at == start + 500
    clock.advance(10)
    manager.keepalive(sandbox.sandbox_id, 100)
    assert sandbox.expires_at == start + 500
    assert sandbox.last_activity == start + 10
    manager.keepalive(sandbox.sandbox_id, 1000)
    assert sandbox.expires_at == start + 10 + 1000
    with pytest.raises(InvalidSettings) as refused:
        manager.keepalive(sandbox.sandbox_id, 1000.5)
    assert str(refused.value) == "'extend_by' exceeds the server maximum of 1000 s"
    manager.keepalive(sandbox.sandbox_id, None)
    assert sandbox.expires_at == start + 1010


@pytest_twisted.ensureDeferred
async def test_keepalive_without_lifetime_or_maximum(runtime: FakeRuntime, clock: Clock) -> None:
    """A sandbox without an expiry keeps none; without a server maximum any extension is
    taken."""
    manager = make_manager(runtime, clock)
    sandbox = await manager.create()
    assert sandbox.expires_at is None
    manager.keepalive(sandbox.sandbox_id, 10**9)
    assert sandbox.expires_at is None


@pytest_twisted.ensureDeferred
async def test_pause_and_resume_are_idempotent(runtime: FakeRuntime, clock: Clock) -> None:
    """Pause freezes once and records when; pausing again changes nothing; resume thaws,
    clears it, and counts as activity."""
    manager = make_manager(runtime, clock)
    sandbox = await manager.create()
    clock.advance(5)
    await manager.pause(sandbox.sandbox_id)
    paused_at = clock.seconds()
    assert sandbox.paused and sandbox.paused_at == paused_at
    clock.advance(5)
    await manager.pause(sandbox.sandbox_id)
    assert sandbox.paused_at == paused_at
    clock.advance(5)
    await manager.resume(sandbox.sandbox_id)
    assert not sandbox.paused and sandbox.paused_at is None
    assert sandbox.last_activity == clock.seconds()
    await manager.resume(sandbox.sandbox_id)
    assert not sandbox.paused


@pytest_twisted.ensureDeferred
async def test_another_owner_sees_not_found_even_for_a_tombstone(
    runtime: FakeRuntime, clock: Clock
) -> None:
    """Another owner's sandbox is not found (no tombstone), and so is its tombstone once
    deleted; the owner (or open mode) gets the tombstone with the reason."""
    manager = make_manager(runtime, clock)
    alice, bob = owner_id("token-alice-0123456789"), owner_id("token-bob-0123456789")
    sandbox = await manager.create(settings_from_body(manager.policy, None, owner=alice))
    assert manager.lookup(sandbox.sandbox_id, alice) is sandbox
    with pytest.raises(SandboxNotFound) as other:
        manager.lookup(sandbox.sandbox_id, bob)
    assert other.value.tombstone is None
    assert manager.visible_to(bob) == [] and manager.visible_to(alice) == [sandbox]
    assert manager.visible_to(None) == [sandbox]
    await manager.delete(sandbox.sandbox_id, owner=alice)
    with pytest.raises(SandboxNotFound) as hidden:
        manager.lookup(sandbox.sandbox_id, bob)
    assert hidden.value.tombstone is None
    for owner in (alice, None):
        with pytest.raises(SandboxNotFound) as shown:
            manager.lookup(sandbox.sandbox_id, owner)
        assert shown.value.tombstone is not None
        assert shown.value.tombstone.reason == "deleted"
    with pytest.raises(SandboxNotFound):
        manager.lookup("not-an-id")


@pytest_twisted.ensureDeferred
async def test_a_delete_the_runtime_fails_keeps_the_sandbox(
    runtime: FakeRuntime, clock: Clock
) -> None:
    """If removing the container fails, the sandbox stays registered and not closing; a
    successful delete marks it closing with 4000 and ``sandbox <reason>`` first."""
    manager = make_manager(runtime, clock)
    sandbox = await manager.create()
    seen: list[Any] = []

    def failing(container_id: str, sandbox_id: str = "") -> Deferred[None]:
        seen.append(sandbox.closing)
        return fail(RuntimeError("engine down"))

    original = runtime.remove
    runtime.remove = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await manager.delete(sandbox.sandbox_id, reason="idle")
    assert seen == [(CLOSE_SANDBOX_REMOVED, "sandbox idle")]
    assert sandbox.closing is None
    assert manager.lookup(sandbox.sandbox_id) is sandbox
    runtime.remove = original  # type: ignore[method-assign]
    removed = await manager.delete(sandbox.sandbox_id, reason="lifetime")
    assert removed.closing == (4000, "sandbox lifetime")
    assert sandbox.sandbox_id not in manager.registry


@pytest_twisted.ensureDeferred
async def test_capacity_refusal_names_the_maximum(runtime: FakeRuntime, clock: Clock) -> None:
    """Creating at the maximum is refused saying the maximum, and is timed as ``refused``;
    the sandbox below it is made."""
    manager = make_manager(runtime, clock, max_sandboxes=2)
    await manager.create()
    await manager.create()
    with pytest.raises(CapacityExceeded) as refused:
        await manager.create()
    assert str(refused.value) == "this gateway already runs its maximum of 2 sandboxes"
    histogram = manager.metrics.creates
    assert histogram.labels(path="cold", outcome="refused")._sum.get() == 0.0
    samples = {
        (s.labels.get("path"), s.labels.get("outcome")): s.value
        for m in histogram.collect()
        for s in m.samples
        if s.name.endswith("_count")
    }
    assert samples == {("cold", "ok"): 2.0, ("cold", "refused"): 1.0}


@pytest_twisted.ensureDeferred
async def test_open_agent_connects_with_the_sandboxs_address_and_limits(
    runtime: FakeRuntime, clock: Clock
) -> None:
    """A client's agent connection goes to the sandbox's agent address with its secret, the
    connect timeout and the agent leg's message limit."""
    link = Link()
    agents = ScriptedAgents([link])
    manager = make_manager(runtime, clock, agents)
    sandbox = await manager.create()
    assert await manager.open_agent(sandbox) is link
    assert agents.calls == [
        (
            sandbox.agent_host,
            sandbox.agent_port,
            sandbox.agent_secret,
            7.0,
            4321,
            sandbox.agent_socket,
        )
    ]
    assert manager.metrics.agent_connect_failures._value.get() == 0


@pytest_twisted.ensureDeferred
async def test_a_failed_connect_waits_for_the_agent_and_tries_again(
    runtime: FakeRuntime, clock: Clock
) -> None:
    """A failed connect is counted, the agent is waited for (its lost sessions found), and
    the connect tried once more."""
    probe, link = Link(), Link()
    agents = ScriptedAgents([AgentUnavailable("down"), probe, link], sessions={"kept"})
    manager = make_manager(runtime, clock, agents)
    sandbox = await manager.create()
    sandbox.sessions |= {"kept", "gone"}
    assert await manager.open_agent(sandbox) is link
    assert manager.metrics.agent_connect_failures._value.get() == 1
    assert probe.closed == 1
    assert sandbox.sessions == {"kept"} and sandbox.lost_sessions == {"gone"}
    assert sandbox.agent_restarts == 1
    assert agents.calls[1][3] == 1.0  # the recovery probe: at most the time left
    assert not manager.recovering(sandbox)


@pytest_twisted.ensureDeferred
async def test_an_agent_that_stays_away_fails_the_connect(
    runtime: FakeRuntime, clock: Clock
) -> None:
    """If the agent does not come back within the recovery timeout, the client's connect
    fails with ``AgentUnavailable`` (no second try), and the failed connect is counted."""
    agents = ScriptedAgents([])
    manager = make_manager(runtime, clock, agents)
    sandbox = await manager.create()
    opening = Deferred.fromCoroutine(manager.open_agent(sandbox))
    failures: list[Any] = []
    opening.addErrback(failures.append)
    assert manager.recovering(sandbox)
    for _ in range(30):
        clock.advance(0.05)
    assert len(failures) == 1 and failures[0].check(AgentUnavailable)
    assert manager.metrics.agent_connect_failures._value.get() == 1
    assert not manager.recovering(sandbox)


@pytest_twisted.ensureDeferred
async def test_recovery_of_a_removed_sandbox_says_so(runtime: FakeRuntime, clock: Clock) -> None:
    """Waiting for the agent of a sandbox no longer registered ends at once: not back,
    ``sandbox removed``."""
    manager = make_manager(runtime, clock, ScriptedAgents([]))
    sandbox = await manager.create()
    await manager.delete(sandbox.sandbox_id)
    recovery = await manager.agent_lost(sandbox)
    assert recovery == AgentRecovery(False, detail="sandbox removed")


@pytest_twisted.ensureDeferred
async def test_concurrent_waits_share_one_recovery(runtime: FakeRuntime, clock: Clock) -> None:
    """Two callers waiting for one agent share one recovery and one result."""
    agents = ScriptedAgents([AgentUnavailable("down"), Link()])
    manager = make_manager(runtime, clock, agents)
    sandbox = await manager.create()
    first = manager.agent_lost(sandbox)
    second = manager.agent_lost(sandbox)
    results: list[Any] = []
    first.addCallback(results.append)
    second.addCallback(results.append)
    clock.advance(0.05)
    assert len(results) == 2 and results[0] == results[1] == AgentRecovery(True, ())
    assert len(agents.calls) == 2
