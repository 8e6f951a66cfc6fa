"""Lifecycle rules over the fake runtime, driven by a Clock: options, limits, idempotency,
lifetimes, removal reasons, events, and state across restarts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tests.test_sandbox import Client
from twistedgw.lifecycle.errors import CapacityExceeded, InvalidSettings, SandboxNotFound
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy, settings_from_body
from twistedgw.reaper import Reaper
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import ContainerInfo, ContainerSpec
from twistedgw.state import StateFile
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.testing.rest import BASE, call


@pytest.mark.parametrize(
    "body",
    [
        {"idle_timeout": 0},
        {"idle_timeout": "60"},
        {"idle_timeout": 10**9},
        {"max_lifetime": 20_000},
        {"max_lifetime": True},
        {"env": {"1BAD": "x"}},
        {"env": {"OK": 5}},
        {"metadata": {"": "x"}},
        {"metadata": {"k": "x" * 300}},
        {"metadata": {f"k{i}": "v" for i in range(40)}},
        {"colour": "blue"},
    ],
)
def test_invalid_settings(manager: SandboxManager, body: dict[str, Any]) -> None:
    """Malformed options and options beyond the server maxima are refused."""
    with pytest.raises(InvalidSettings):
        settings_from_body(manager.policy, body)


@pytest_twisted.ensureDeferred
async def test_options_are_applied_and_echoed(
    treq: StubTreq, manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """Per-request options within maxima are applied; metadata is echoed; details on request."""
    code, created = await call(
        treq,
        "POST",
        "/sandboxes",
        json={
            "idle_timeout": 50,
            "max_lifetime": 600,
            "env": {"A": "1"},
            "metadata": {"team": "x"},
        },
    )
    assert code == 200
    sandbox_id = created["sandbox_id"]
    code, info = await call(treq, "GET", f"/sandboxes/{sandbox_id}")
    assert info["metadata"] == {"team": "x"}
    assert "idle_timeout" not in info
    code, info = await call(treq, "GET", f"/sandboxes/{sandbox_id}?details=true")
    assert info["idle_timeout"] == 50
    assert info["expires_at"] == pytest.approx(clock.seconds() + 600)
    settings = next(iter(runtime.containers.values())).settings
    assert settings.env == {"A": "1"}
    code, error = await call(treq, "POST", "/sandboxes", json={"idle_timeout": -1})
    assert code == 400 and "idle_timeout" in error["error"]


@pytest_twisted.ensureDeferred
async def test_capacity_is_429(treq: StubTreq, runtime: FakeRuntime) -> None:
    """Creates beyond --max-sandboxes get 429 JSON with Retry-After; nothing is created."""
    for _ in range(5):
        code, _ = await call(treq, "POST", "/sandboxes")
        assert code == 200
    response = await treq.post(BASE + "/sandboxes")
    assert response.code == 429
    assert response.headers.getRawHeaders(b"retry-after") == [b"5"]
    assert "maximum" in json.loads(await response.content())["error"]
    assert runtime.creates == 5


@pytest_twisted.ensureDeferred
async def test_idempotent_create(treq: StubTreq, runtime: FakeRuntime) -> None:
    """The same Idempotency-Key returns the same sandbox; another key makes another."""
    headers = {"Idempotency-Key": "abc"}
    _, first = await call(treq, "POST", "/sandboxes", headers=headers)
    _, again = await call(treq, "POST", "/sandboxes", headers=headers)
    _, other = await call(treq, "POST", "/sandboxes", headers={"Idempotency-Key": "xyz"})
    assert first == again
    assert other["sandbox_id"] != first["sandbox_id"]
    assert runtime.creates == 2


class SlowRuntime(FakeRuntime):
    """Creates wait until released, so concurrent requests overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[Deferred[ContainerInfo], ContainerSpec]] = []

    def create(self, spec: ContainerSpec) -> Deferred[ContainerInfo]:
        d: Deferred[ContainerInfo] = Deferred()
        self.waiting.append((d, spec))
        return d

    def release(self) -> None:
        for d, spec in self.waiting:
            FakeRuntime.create(self, spec).chainDeferred(d)
        self.waiting = []


@pytest_twisted.ensureDeferred
async def test_concurrent_identical_retries_create_one_container(clock: Clock) -> None:
    """Concurrent creates with one key share a single container, even if a caller gives up."""
    runtime = SlowRuntime()
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready)
    settings = settings_from_body(manager.policy, None, "same-key")
    calls = [manager.create(settings) for _ in range(5)]
    calls[0].cancel()  # a client went away mid-create
    calls[0].addErrback(lambda f: None)
    assert len(runtime.waiting) == 1
    runtime.release()
    sandboxes = [await d for d in calls[1:]]
    assert len({s.sandbox_id for s in sandboxes}) == 1
    assert len(manager.registry) == 1


async def _ready(info: ContainerInfo) -> None:
    return None


@pytest_twisted.ensureDeferred
async def test_removal_reasons_are_reported(
    treq: StubTreq, manager: SandboxManager, clock: Clock
) -> None:
    """After deletion, idle reaping or lifetime expiry, GET says 404 with when and why."""
    deleted = await manager.create()
    await manager.delete(deleted.sandbox_id)
    idle = await manager.create()
    aged = await manager.create(
        settings_from_body(manager.policy, {"max_lifetime": 50, "idle_timeout": 1000})
    )
    watcher = Client()
    aged.attach(watcher, manager.now())
    clock.advance(101)
    await Reaper(manager).sweep()
    for sandbox, reason in ((deleted, "deleted"), (idle, "idle"), (aged, "lifetime")):
        code, body = await call(treq, "GET", f"/sandboxes/{sandbox.sandbox_id}")
        assert code == 404
        assert (body["status"], body["reason"]) == ("removed", reason)
        assert body["removed_at"] <= clock.seconds()
    assert watcher.closed == [(4000, "sandbox lifetime")]


@pytest_twisted.ensureDeferred
async def test_keepalive_extends(treq: StubTreq, manager: SandboxManager, clock: Clock) -> None:
    """keepalive counts as activity and pushes the lifetime out, within the server maximum."""
    sandbox = await manager.create(
        settings_from_body(manager.policy, {"max_lifetime": 100, "idle_timeout": 1000})
    )
    clock.advance(90)
    code, body = await call(
        treq, "POST", f"/sandboxes/{sandbox.sandbox_id}/keepalive", json={"extend_by": 200}
    )
    assert code == 200
    assert body["expires_at"] == pytest.approx(clock.seconds() + 200)
    assert body["last_activity"] == clock.seconds()
    clock.advance(150)
    await Reaper(manager).sweep()
    assert sandbox.sandbox_id in manager.registry
    code, _ = await call(
        treq, "POST", f"/sandboxes/{sandbox.sandbox_id}/keepalive", json={"extend_by": 10**6}
    )
    assert code == 400
    code, _ = await call(treq, "POST", f"/sandboxes/{'0' * 32}/keepalive")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_container_death_event(manager: SandboxManager, runtime: FakeRuntime) -> None:
    """A die event forgets the sandbox at once, closes clients with 1011 and a reason, records
    'exited' with the exit code, and removes the dead container."""
    manager.startService()
    sandbox = await manager.create()
    client = Client()
    sandbox.attach(client, manager.now())
    runtime.kill(sandbox.container_id, exit_code=137, emit=True)
    assert sandbox.sandbox_id not in manager.registry
    assert client.closed == [(1011, "sandbox exited: container exited with code 137")]
    with pytest.raises(SandboxNotFound) as info:
        manager.lookup(sandbox.sandbox_id)
    assert info.value.tombstone is not None and info.value.tombstone.reason == "exited"
    assert sandbox.container_id in runtime.removed


@pytest_twisted.ensureDeferred
async def test_delete_twice_at_once(manager: SandboxManager, runtime: FakeRuntime) -> None:
    """Two concurrent deletes remove once; the other gets not-found."""
    sandbox = await manager.create()
    first = Deferred.fromCoroutine(manager.delete(sandbox.sandbox_id))
    with pytest.raises(SandboxNotFound):
        await manager.delete(sandbox.sandbox_id)
    await first
    assert runtime.removed == [sandbox.container_id]


@pytest_twisted.ensureDeferred
async def test_capacity_counts_creates_in_flight(clock: Clock) -> None:
    """Creates in flight count towards the limit, so a burst cannot overshoot it."""
    from twistedgw.lifecycle.options import LifecyclePolicy

    runtime = SlowRuntime()
    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        policy=LifecyclePolicy(max_sandboxes=3),
    )
    calls = [manager.create() for _ in range(5)]
    results = []
    runtime.release()
    for d in calls:
        try:
            results.append(await d)
        except CapacityExceeded:
            results.append(None)
    assert sum(r is not None for r in results) == 3


@pytest_twisted.ensureDeferred
async def test_state_survives_restart(
    tmp_path: Path, runtime: FakeRuntime, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown saves the state file through the real save path (last activity, that a client
    attached, the lifetime as extended by keepalive, fsynced with its directory), and a
    restarted manager resumes idle clocks and lifetime extensions from it."""
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_mode)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "state" / "default.json"
    state = StateFile(path, clock, in_thread=False)
    first = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready, state=state)
    first.startService()
    sandbox = await first.create(settings_from_body(first.policy, {"max_lifetime": 100}))
    client = Client()
    sandbox.attach(client, first.now())
    clock.advance(30)
    first.keepalive(sandbox.sandbox_id, 500)
    sandbox.detach(client, first.now())
    assert not path.exists()
    await first.stopService()  # shutdown saves
    saved = json.loads(path.read_text())["sandboxes"][sandbox.sandbox_id]
    assert saved == {
        "last_activity": sandbox.last_activity,
        "ever_connected": True,
        "expires_at": clock.seconds() + 500,
    }
    assert [stat.S_ISREG(m) for m in synced] == [True, False]  # the file, then its directory
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left

    clock.advance(1000)  # the gateway was down for a while
    second = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready, state=state)
    second.startService()
    await second.reconcile()
    adopted = second.lookup(sandbox.sandbox_id)
    assert adopted.last_activity == sandbox.last_activity
    assert adopted.status == "idle" and adopted.state == "idle"
    assert adopted.expires_at == sandbox.expires_at
    assert adopted.idle_for(clock.seconds()) == pytest.approx(1000)


@pytest_twisted.ensureDeferred
async def test_warm_pool_hands_out_and_refills(runtime: FakeRuntime, clock: Clock) -> None:
    """A started manager fills its pool; a plain create takes a pooled container (no new
    container on the request path), never twice, and the pool refills. Pool containers are
    neither listed nor counted; options the pool cannot honour create cold."""
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=_ready, pool_size=2)
    manager.startService()
    await manager.reconcile()
    assert manager.pool_status()["ready"] == 2
    assert len(manager.registry) == 0
    pooled_ids = {s.sandbox_id for s in manager._pool}
    first = await manager.create(settings_from_body(manager.policy, {"idle_timeout": 50}))
    second = await manager.create()
    assert {first.sandbox_id, second.sandbox_id} == pooled_ids
    assert first.settings.idle_timeout == 50 and first.from_pool
    assert first.created_at == clock.seconds()
    assert manager.pool_status()["ready"] == 2  # refilled (the fake creates at once)
    cold = await manager.create(settings_from_body(manager.policy, {"env": {"A": "1"}}))
    assert cold.sandbox_id not in pooled_ids and not cold.from_pool
    assert runtime.creates == 5
    await manager.delete(first.sandbox_id)
    assert first.sandbox_id not in {s.sandbox_id for s in manager._pool}


@pytest_twisted.ensureDeferred
async def test_pool_survives_restart_and_assignments_stick(
    tmp_path: Path, runtime: FakeRuntime, clock: Clock
) -> None:
    """After a restart, unassigned pool containers go back to the pool and handed-out ones come
    back as their owners' sandboxes (never pooled again)."""
    state = StateFile(tmp_path / "state.json", clock, in_thread=False)
    first = SandboxManager(
        SandboxRegistry(), runtime, clock, wait_ready=_ready, pool_size=2, state=state
    )
    first.startService()
    await first.reconcile()
    given = await first.create(settings_from_body(first.policy, None, owner="owner-1"))
    second = SandboxManager(
        SandboxRegistry(), runtime, clock, wait_ready=_ready, pool_size=2, state=state
    )
    second.startService()
    await second.reconcile()
    adopted = second.lookup(given.sandbox_id, "owner-1")
    assert adopted.from_pool and adopted.settings.owner == "owner-1"
    assert given.sandbox_id not in {s.sandbox_id for s in second._pool}
    assert second.pool_status()["ready"] == 2


def test_network_option(manager: SandboxManager) -> None:
    """network is bridge by default, none on request, and nothing else."""
    assert settings_from_body(manager.policy, None).network == "bridge"
    assert settings_from_body(manager.policy, {"network": "none"}).network == "none"
    with pytest.raises(InvalidSettings):
        settings_from_body(manager.policy, {"network": "host"})


class FailingState(StateFile):
    """A state file whose writes fail (a full disk, say)."""

    def save(self, sandboxes: Any) -> Deferred[None]:
        from twisted.internet.defer import fail

        return fail(OSError("disk full"))


@pytest_twisted.ensureDeferred
async def test_unrecorded_hand_out_falls_back_to_cold(
    tmp_path: Path, runtime: FakeRuntime, clock: Clock
) -> None:
    """If a pool hand-out cannot be recorded, that container is dropped (it could otherwise be
    pooled again after a restart) and the create is made cold."""
    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        pool_size=1,
        state=FailingState(tmp_path / "s.json", clock),
    )
    manager.startService()
    await manager.reconcile()
    pooled = manager._pool[0]
    sandbox = await manager.create()
    assert sandbox.sandbox_id != pooled.sandbox_id and not sandbox.from_pool
    assert pooled.container_id in runtime.removed
    assert [s.sandbox_id for s in manager.registry] == [sandbox.sandbox_id]


@pytest_twisted.ensureDeferred
async def test_idempotency_key_with_other_options_is_422(
    treq: StubTreq, runtime: FakeRuntime
) -> None:
    """An Idempotency-Key reused with a different body is a 422, not the first sandbox."""
    headers = {"Idempotency-Key": "same-key", "Content-Type": "application/json"}
    code, first = await call(treq, "POST", "/sandboxes", json={"idle_timeout": 60}, headers=headers)
    assert code == 200
    code, again = await call(treq, "POST", "/sandboxes", json={"idle_timeout": 60}, headers=headers)
    assert (code, again["sandbox_id"]) == (200, first["sandbox_id"])
    code, error = await call(treq, "POST", "/sandboxes", json={"idle_timeout": 90}, headers=headers)
    assert code == 422 and "Idempotency-Key" in error["error"]
    assert len(runtime.containers) == 1


@pytest_twisted.ensureDeferred
async def test_a_handed_out_pool_sandbox_keeps_its_own_facts_across_restart(
    tmp_path: Path, runtime: FakeRuntime, clock: Clock
) -> None:
    """A sandbox handed out from the pool and adopted after a restart keeps the creation time
    of its hand-out (not its container's, made earlier for the pool), hence its expiry, and the
    resources its container was made with (the labels'), with the owner's other settings."""
    state = StateFile(tmp_path / "state.json", clock, in_thread=False)
    policy = LifecyclePolicy(idle_timeout=100, max_lifetime=1000)

    async def started() -> SandboxManager:
        """A gateway (one of two runs) over the same engine and state file."""
        manager = SandboxManager(
            SandboxRegistry(), runtime, clock, wait_ready=_ready, pool_size=1, state=state,
            policy=policy,
        )  # fmt: skip
        manager.startService()
        await manager.reconcile()
        return manager

    first = await started()
    container_made = clock.seconds()
    clock.advance(30)
    given = await first.create(settings_from_body(policy, {"idle_timeout": 50}, owner="o"))
    assert given.from_pool and given.created_at == container_made + 30
    await first.stopService()
    second = await started()
    adopted = second.lookup(given.sandbox_id, "o")
    assert adopted.created_at == given.created_at
    assert adopted.expires_at == given.expires_at == given.created_at + 1000
    assert adopted.settings.idle_timeout == 50
    assert adopted.settings.resources == given.settings.resources
    assert adopted.settings.resources is not None
    await second.stopService()
