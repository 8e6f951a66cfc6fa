"""Start-up recovery and reconciliation against changes made while a sweep runs, over a fake
runtime whose container listing answers only when the test releases it."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.task import Clock

from tests.test_sandbox import Client
from twistedgw.lifecycle.errors import Recovering, SandboxNotFound
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy
from twistedgw.reaper import Reaper, make_reaper_service
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import ContainerFailed, ContainerInfo, ContainerSpec
from twistedgw.sandbox import SandboxSettings, new_agent_secret, new_sandbox_id
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.testing.rest import request
from twistedgw.web.api import GatewayAPI


class SlowListRuntime(FakeRuntime):
    """Listings are taken when asked for (a snapshot) but delivered only on ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.listings: list[tuple[Deferred[list[ContainerInfo]], list[ContainerInfo]]] = []

    def list_containers(self) -> Deferred[list[ContainerInfo]]:
        d: Deferred[list[ContainerInfo]] = Deferred()
        self.listings.append((d, list(self.containers.values())))
        return d

    def release(self) -> None:
        listings, self.listings = self.listings, []
        for d, snapshot in listings:
            d.callback(snapshot)


async def _ready(info: ContainerInfo) -> None:
    return None


def _manager(runtime: FakeRuntime, clock: Clock, pool_size: int = 0) -> SandboxManager:
    return SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        policy=LifecyclePolicy(idle_timeout=100, max_sandboxes=5),
        pool_size=pool_size,
    )


def _earlier_run(runtime: FakeRuntime, clock: Clock) -> str:
    """A running container left by a gateway that was killed; returns its sandbox id."""
    sandbox_id = new_sandbox_id()
    spec = ContainerSpec(sandbox_id, clock.seconds(), new_agent_secret(), SandboxSettings(100))
    runtime.create(spec)
    return sandbox_id


async def _call(treq: StubTreq, method: str, path: str) -> tuple[int, Any, Any]:
    code, headers, body = await request(treq, method, path)
    return code, headers, json.loads(body)


@pytest.fixture
def slow() -> SlowListRuntime:
    return SlowListRuntime()


@pytest_twisted.ensureDeferred
async def test_no_false_404_or_empty_list_before_recovery(
    slow: SlowListRuntime, clock: Clock
) -> None:
    """Until the first reconcile has adopted the running sandboxes, GET /sandboxes and
    GET /sandboxes/{id} answer 503 with Retry-After (never [] or 404), creates are refused
    the same way (an idempotent retry could otherwise make a second sandbox), and /healthz
    answers, saying ready=false. Afterwards the answers are complete."""
    running = _earlier_run(slow, clock)
    manager = _manager(slow, clock)
    treq = StubTreq(GatewayAPI(manager).resource())
    manager.startService()
    for path in ("/sandboxes", f"/sandboxes/{running}", f"/sandboxes/{'0' * 32}"):
        code, headers, body = await _call(treq, "GET", path)
        assert code == 503, (path, body)
        assert headers.getRawHeaders(b"retry-after") == [b"1"]
        assert "recovering" in body["error"]
    code, headers, _ = await _call(treq, "POST", "/sandboxes")
    assert code == 503 and headers.getRawHeaders(b"retry-after") == [b"1"]
    assert slow.creates == 1  # only the earlier run's
    code, _, health = await _call(treq, "GET", "/healthz")
    assert (code, health["status"], health["ready"]) == (200, "ok", False)

    slow.release()
    code, _, listing = await _call(treq, "GET", "/sandboxes")
    assert code == 200 and [s["sandbox_id"] for s in listing] == [running]
    code, _, body = await _call(treq, "GET", f"/sandboxes/{running}")
    assert code == 200 and body["sandbox_id"] == running
    code, _, _ = await _call(treq, "GET", f"/sandboxes/{'0' * 32}")
    assert code == 404
    code, _, health = await _call(treq, "GET", "/healthz")
    assert health["ready"] is True


@pytest_twisted.ensureDeferred
async def test_recovery_retries_until_docker_answers(clock: Clock) -> None:
    """With Docker down at start-up the gateway keeps answering 503 (not an empty list), retries
    with a backoff, and serves once a reconcile succeeds, without waiting for a sweep."""
    runtime = FakeRuntime()
    running = _earlier_run(runtime, clock)
    runtime.available = False
    manager = _manager(runtime, clock)
    manager.startService()
    for _ in range(3):
        clock.advance(5)
        with pytest.raises(Recovering):
            manager.visible_to(None)
    runtime.available = True
    clock.advance(31)  # the backoff's longest wait
    assert [s.sandbox_id for s in manager.visible_to(None)] == [running]


@pytest_twisted.ensureDeferred
async def test_startup_runs_one_reconcile_at_a_time(slow: SlowListRuntime, clock: Clock) -> None:
    """The manager's start-up reconcile and the reaper's immediate first sweep share one
    listing; a later sweep lists again."""
    manager = _manager(slow, clock)
    reaper_service = make_reaper_service(Reaper(manager), 60, clock)
    manager.startService()
    reaper_service.startService()
    try:
        assert len(slow.listings) == 1
        again = ensureDeferred(manager.reconcile())
        assert len(slow.listings) == 1
        slow.release()
        assert again.called and manager.recovered
        clock.advance(60)
        assert len(slow.listings) == 1  # the next sweep: a fresh listing
        slow.release()
    finally:
        reaper_service.stopService()


@pytest_twisted.ensureDeferred
async def test_create_finishing_during_a_sweep_is_kept(slow: SlowListRuntime, clock: Clock) -> None:
    """A sandbox whose create completes after the sweep's listing was taken is not reported
    as vanished: it stays registered, its client stays attached, no tombstone is written."""
    manager = _manager(slow, clock)
    sweep = ensureDeferred(manager.reconcile())  # lists now, answers later
    sandbox = await manager.create()
    client = Client()
    sandbox.attach(client, manager.now())
    slow.release()
    await sweep
    assert manager.lookup(sandbox.sandbox_id) is sandbox
    assert client.closed == []
    assert manager.graveyard.get(sandbox.sandbox_id, manager.now()) is None


@pytest_twisted.ensureDeferred
async def test_delete_during_a_sweep_is_not_adopted_back(
    slow: SlowListRuntime, clock: Clock
) -> None:
    """A sandbox deleted after the sweep's listing (which still shows it running) stays
    deleted instead of being adopted again from the stale listing."""
    manager = _manager(slow, clock)
    sandbox = await manager.create()
    sweep = ensureDeferred(manager.reconcile())
    await manager.delete(sandbox.sandbox_id)
    slow.release()
    await sweep
    with pytest.raises(SandboxNotFound):
        manager.lookup(sandbox.sandbox_id)


@pytest_twisted.ensureDeferred
async def test_pool_fill_during_a_sweep_is_kept(slow: SlowListRuntime, clock: Clock) -> None:
    """A warm-pool container added after the sweep's listing was taken stays in the pool."""
    manager = _manager(slow, clock, pool_size=1)
    manager.startService()
    slow.release()  # start-up reconcile: the pool fills (the fake creates at once)
    assert manager.pool_status()["ready"] == 1
    sweep = ensureDeferred(manager.reconcile())
    handed = await manager.create()  # hand-out, then a refill during the sweep
    refill = [p.sandbox_id for p in manager._pool]
    assert len(refill) == 1 and refill[0] != handed.sandbox_id
    slow.release()
    await sweep
    assert [p.sandbox_id for p in manager._pool] == refill
    assert manager.lookup(handed.sandbox_id) is handed
    assert slow.creates == 2


class SlowListNoRefillRuntime(SlowListRuntime):
    """Slow listings, and pool containers refused while ``refuse_pool`` is set."""

    refuse_pool = False

    def create(self, spec: ContainerSpec) -> Deferred[ContainerInfo]:
        if spec.for_pool and self.refuse_pool:
            return fail(ContainerFailed("no room for the pool"))
        return super().create(spec)


@pytest_twisted.ensureDeferred
async def test_a_hand_out_dropped_during_a_sweep_is_not_pooled_again(clock: Clock) -> None:
    """A pool container handed out while a sweep's listing is pending, then dropped because the
    hand-out could not be recorded (its container removed), is not taken back into the pool
    by that sweep, whose listing still shows it running."""
    from tests.test_pool import UnsavableState

    runtime = SlowListNoRefillRuntime()
    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        policy=LifecyclePolicy(idle_timeout=100, max_sandboxes=5),
        pool_size=1,
        state=UnsavableState(None, clock),
    )
    manager.startService()
    try:
        runtime.release()
        (pooled,) = manager._pool
        runtime.refuse_pool = True
        sweep = ensureDeferred(manager.reconcile())
        created = await manager.create()
        assert not created.from_pool
        runtime.release()
        await sweep
        assert manager._pool == []
        assert runtime.removed.count(pooled.container_id) == 1
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_a_sandbox_destroyed_during_a_sweep_is_not_adopted_back(
    slow: SlowListRuntime, clock: Clock
) -> None:
    """A ``destroy`` event while a sweep's listing is pending forgets the sandbox; the sweep,
    whose listing still shows its container running, does not adopt it back."""
    from twistedgw.runtime.interface import ContainerEvent

    manager = _manager(slow, clock)
    manager.startService()
    try:
        slow.release()
        sandbox = await manager.create()
        sweep = ensureDeferred(manager.reconcile())
        del slow.containers[sandbox.container_id]
        slow.watchers[-1](ContainerEvent(sandbox.sandbox_id, sandbox.container_id, "destroy"))
        assert manager.registry.get(sandbox.sandbox_id) is None
        slow.release()
        await sweep
        assert manager.registry.get(sandbox.sandbox_id) is None
    finally:
        await manager.stopService()
