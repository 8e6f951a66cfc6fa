"""Swarm mode's cluster state, without a cluster: the reaper's lease (compare-and-swap on a
fake label store, clock injected), ``ClusterState``'s writes and merges, the reaper honouring
a lease held elsewhere and another gateway's newer activity, and ``ClusterLookup``'s paths."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from tests.test_sandbox import Client
from twistedgw.lease import ClusterLease, Lease, claim, encode_lease
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.reaper import Reaper
from twistedgw.runtime.labels import (
    LABEL_REAPER_LEASE,
    LABEL_STATE,
    saved_from_label,
    state_label,
)
from twistedgw.sandbox import SandboxSettings
from twistedgw.state import ClusterState, SavedSandbox, merge_saved
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.web.cluster import named_sandbox


class FakeLabels:
    """``IClusterLabels`` in memory: a version per container, bumped by every write."""

    def __init__(self) -> None:
        self.labels: dict[str, dict[str, str]] = {}
        self.versions: dict[str, int] = {}
        self.writes = 0
        #: Called between a caller's read and its write (to simulate another writer).
        self.between: Callable[[str], None] | None = None

    def read_labels(self, container_id: str) -> Deferred[tuple[int, dict[str, str]]]:
        version = self.versions.setdefault(container_id, 1)
        labels = dict(self.labels.setdefault(container_id, {}))
        if self.between is not None:
            self.between(container_id)
        return succeed((version, labels))

    def write_labels(
        self, container_id: str, version: int, changes: Mapping[str, str | None]
    ) -> Deferred[bool]:
        if self.versions.get(container_id, 1) != version:
            return succeed(False)
        labels = self.labels.setdefault(container_id, {})
        for key, value in changes.items():
            if value is None:
                labels.pop(key, None)
            else:
                labels[key] = value
        self.versions[container_id] = version + 1
        self.writes += 1
        return succeed(True)

    def bump(self, container_id: str) -> None:
        self.versions[container_id] = self.versions.get(container_id, 1) + 1


def test_claim_rules() -> None:
    """A free, expired or own lease may be (re)written; another holder's live one may not."""
    assert claim(None, "a", 100.0, 60.0) == Lease("a", 160.0)
    assert claim(Lease("b", 150.0), "a", 100.0, 60.0) is None
    assert claim(Lease("b", 100.0), "a", 100.0, 60.0) == Lease("a", 160.0)  # expired
    assert claim(Lease("a", 150.0), "a", 100.0, 60.0) == Lease("a", 160.0)  # renewed


@pytest_twisted.ensureDeferred
async def test_two_gateways_one_lease_until_it_expires(manager: SandboxManager) -> None:
    """Of two holders on one store, the first gets the lease, the second not until the
    lease's ttl has passed on the injected clock; then the first has lost it."""
    sandbox = await manager.create()
    store, clock = FakeLabels(), Clock()
    clock.advance(1000)
    a = ClusterLease(store, clock, "gw-a", ttl=30.0)
    b = ClusterLease(store, clock, "gw-b", ttl=30.0)
    assert (await a.try_acquire(sandbox))[0] is True
    assert (await b.try_acquire(sandbox))[0] is False
    clock.advance(29)
    assert (await b.try_acquire(sandbox))[0] is False
    clock.advance(2)
    assert (await b.try_acquire(sandbox))[0] is True
    assert (await a.try_acquire(sandbox))[0] is False
    lease = json.loads(store.labels[sandbox.container_id][LABEL_REAPER_LEASE])
    assert lease == {"holder": "gw-b", "expires": 1061.0}


@pytest_twisted.ensureDeferred
async def test_lost_race_is_not_granted(manager: SandboxManager) -> None:
    """A free lease whose service another gateway wrote between read and write (the
    version moved) is not granted: compare-and-swap, not last-writer-wins."""
    sandbox = await manager.create()
    store, clock = FakeLabels(), Clock()
    store.between = store.bump
    assert (await ClusterLease(store, clock, "gw-a").try_acquire(sandbox))[0] is False
    assert LABEL_REAPER_LEASE not in store.labels[sandbox.container_id]


@pytest_twisted.ensureDeferred
async def test_reaper_leaves_a_sandbox_leased_by_another_gateway(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """An idle sandbox whose lease another gateway holds is not removed by this reaper;
    once that lease has expired, it is."""
    sandbox = await manager.create()
    store = FakeLabels()
    store.labels[sandbox.container_id] = {
        LABEL_REAPER_LEASE: encode_lease(Lease("gw-other", clock.seconds() + 500))
    }
    reaper = Reaper(manager, lease=ClusterLease(store, clock, "gw-me", ttl=30.0))
    clock.advance(200)  # past the idle timeout
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry
    clock.advance(400)
    await reaper.sweep()
    assert sandbox.sandbox_id not in manager.registry
    assert runtime.containers == {}


@pytest_twisted.ensureDeferred
async def test_reaper_spares_a_sandbox_busy_on_another_gateway(
    manager: SandboxManager, clock: Clock
) -> None:
    """Idle here but active on another gateway (its newer activity is in the cluster's state
    label, read with the lease): not removed."""
    sandbox = await manager.create()
    store = FakeLabels()
    reaper = Reaper(manager, lease=ClusterLease(store, clock, "gw-me", ttl=30.0))
    clock.advance(200)
    store.labels[sandbox.container_id] = {
        LABEL_STATE: state_label(SavedSandbox(clock.seconds() - 1, True, None))
    }
    await reaper.sweep()
    assert sandbox.sandbox_id in manager.registry
    assert sandbox.ever_connected


@pytest_twisted.ensureDeferred
async def test_cluster_state_writes_changes_only(manager: SandboxManager, clock: Clock) -> None:
    """``ClusterState.save`` writes a sandbox's state label once, not again while nothing
    changed, again when it did; an attached client is saved as activity now."""
    sandbox = await manager.create()
    store = FakeLabels()
    state = ClusterState(store, clock)
    await state.save([sandbox])
    assert store.writes == 1
    saved = saved_from_label(store.labels[sandbox.container_id])
    assert saved is not None and saved.last_activity == sandbox.last_activity
    await state.save([sandbox])
    assert store.writes == 1
    sandbox.attach(Client(), manager.now())
    clock.advance(50)
    await state.save([sandbox])
    assert store.writes == 2
    saved = saved_from_label(store.labels[sandbox.container_id])
    assert saved is not None and saved.last_activity == clock.seconds() and saved.ever_connected


@pytest_twisted.ensureDeferred
async def test_cluster_state_keeps_the_other_gateways_later_facts(
    manager: SandboxManager, clock: Clock
) -> None:
    """A save merges with what another gateway wrote: the later activity and the later
    expiry survive, whoever writes last."""
    sandbox = await manager.create()
    store = FakeLabels()
    theirs = SavedSandbox(sandbox.last_activity + 40, True, 9e9)
    store.labels[sandbox.container_id] = {LABEL_STATE: state_label(theirs)}
    await ClusterState(store, clock).save([sandbox])
    saved = saved_from_label(store.labels[sandbox.container_id])
    assert saved == SavedSandbox(sandbox.last_activity + 40, True, 9e9)


def test_merge_saved() -> None:
    """Merging two views keeps the later activity, any connection, the later expiry."""
    a = SavedSandbox(10.0, False, None)
    b = SavedSandbox(5.0, True, 100.0)
    assert merge_saved(a, b) == SavedSandbox(10.0, True, 100.0)
    assert merge_saved(b, SavedSandbox(1.0, False, 200.0)).expires_at == 200.0


@pytest_twisted.ensureDeferred
async def test_reconcile_merges_cluster_state_into_known_sandboxes(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """A listing that brings newer saved facts (another gateway's) moves a known sandbox's
    idle clock forward, never into the future."""
    import attrs

    sandbox = await manager.create()
    clock.advance(100)
    info = runtime.containers[sandbox.container_id]
    later = SavedSandbox(clock.seconds() - 5, True, None)
    runtime.containers[sandbox.container_id] = attrs.evolve(info, saved=later)
    await manager.reconcile()
    assert sandbox.last_activity == clock.seconds() - 5 and sandbox.ever_connected
    future = SavedSandbox(clock.seconds() + 500, True, None)
    runtime.containers[sandbox.container_id] = attrs.evolve(info, saved=future)
    await manager.reconcile()
    assert sandbox.last_activity == clock.seconds()


def test_cluster_lookup_paths() -> None:
    """Only sandbox routes with a well-formed id trigger a cluster lookup."""
    sid = "0123456789abcdef0123456789abcdef"
    assert named_sandbox(f"/sandboxes/{sid}".encode()) == sid
    assert named_sandbox(f"/sandboxes/{sid}/files?path=x".encode()) == sid
    assert named_sandbox(f"/ws/{sid}".encode()) == sid
    assert named_sandbox(b"/sandboxes") is None
    assert named_sandbox(b"/sandboxes/../etc") is None
    assert named_sandbox(b"/healthz") is None


class FailingLabels(FakeLabels):
    """A label store that fails every read of the containers in ``broken``."""

    def __init__(self, broken: set[str]) -> None:
        super().__init__()
        self.broken = broken
        self.reads: list[str] = []

    def read_labels(self, container_id: str) -> Deferred[tuple[int, dict[str, str]]]:
        self.reads.append(container_id)
        if container_id in self.broken:
            return fail(RuntimeError("engine said no"))
        return super().read_labels(container_id)


def _saved(store: FakeLabels, container_id: str) -> SavedSandbox | None:
    return saved_from_label(store.labels.get(container_id, {}))


@pytest_twisted.ensureDeferred
async def test_cluster_state_saves_the_expiry_and_the_activity_as_it_was(
    manager: SandboxManager, clock: Clock
) -> None:
    """A sandbox without clients is saved with its own last activity (not "now") and its
    expiry; with a client attached, its activity is saved as "now"."""
    sandbox = await manager.create()
    sandbox.expires_at = 5000.0
    clock.advance(30)
    store = FakeLabels()
    await ClusterState(store, clock).save([sandbox])
    assert _saved(store, sandbox.container_id) == SavedSandbox(sandbox.last_activity, False, 5000.0)
    assert sandbox.last_activity != clock.seconds()


@pytest_twisted.ensureDeferred
async def test_cluster_state_writes_again_for_each_kind_of_change(
    manager: SandboxManager, clock: Clock
) -> None:
    """Each fact alone makes a new write: activity moved by exactly the resolution, a first
    connection, a new expiry; activity moved by less than the resolution does not."""
    sandbox = await manager.create()
    store = FakeLabels()
    state = ClusterState(store, clock, resolution=10.0)
    await state.save([sandbox])
    assert store.writes == 1
    sandbox.last_activity += 9.5
    await state.save([sandbox])
    assert store.writes == 1
    sandbox.last_activity += 0.5  # 10 s after the written value: exactly the resolution
    await state.save([sandbox])
    assert store.writes == 2
    sandbox.ever_connected = True
    await state.save([sandbox])
    assert store.writes == 3
    sandbox.expires_at = 7000.0
    await state.save([sandbox])
    assert store.writes == 4
    assert _saved(store, sandbox.container_id) == SavedSandbox(sandbox.last_activity, True, 7000.0)


@pytest_twisted.ensureDeferred
async def test_cluster_state_goes_on_past_unchanged_written_and_failing_sandboxes(
    manager: SandboxManager, clock: Clock, log_messages: list[str]
) -> None:
    """One save walks every sandbox: one unchanged since the last save, one written, one
    whose store fails (counted in one warning) do not stop the others from being written."""
    unchanged, written, broken, last = [await manager.create() for _ in range(4)]
    store = FailingLabels({broken.container_id})
    state = ClusterState(store, clock)
    await state.save([unchanged])
    assert [m for m in log_messages if "could not save" in m] == []
    unchanged_writes = store.writes
    await state.save([unchanged, written, broken, last])
    assert store.writes == unchanged_writes + 2
    for sandbox in (unchanged, written, last):
        assert _saved(store, sandbox.container_id) is not None
    assert _saved(store, broken.container_id) is None
    assert [m for m in log_messages if "could not save" in m] == [
        f"could not save {broken.sandbox_id}'s state in the cluster: engine said no",
        "could not save the state of 1 sandboxes in the cluster",
    ]


@pytest_twisted.ensureDeferred
async def test_cluster_state_retries_a_lost_race_once_then_gives_up(
    manager: SandboxManager, clock: Clock
) -> None:
    """A write that loses the compare-and-swap (another gateway wrote between read and write)
    is tried once more on the new version, and not a third time: two reads, no write."""
    sandbox = await manager.create()
    store = FailingLabels(set())
    store.between = store.bump  # every read is followed by another gateway's write
    await ClusterState(store, clock).save([sandbox])
    assert store.reads == [sandbox.container_id] * 2
    assert store.writes == 0


def test_merge_saved_keeps_ours_where_theirs_says_nothing() -> None:
    """Our expiry stands when theirs has none; of two expiries the later one wins, whichever
    side has it; our pool assignment and creation time are kept."""
    assigned = SandboxSettings(idle_timeout=42.0)
    ours = SavedSandbox(10.0, False, 300.0, assigned=assigned, created_at=1.0)
    assert merge_saved(ours, SavedSandbox(5.0, False, None)) == ours
    merged = merge_saved(ours, SavedSandbox(20.0, False, 100.0))
    assert merged.expires_at == 300.0 and merged.last_activity == 20.0
    assert (merged.assigned, merged.created_at) == (assigned, 1.0)


@pytest_twisted.ensureDeferred
async def test_reaper_goes_on_past_a_sandbox_leased_elsewhere(
    manager: SandboxManager, runtime: FakeRuntime, clock: Clock
) -> None:
    """Of idle sandboxes, one whose lease another gateway holds is skipped and the sweep goes
    on: the others, before and after it, are removed in the same sweep."""
    first, leased, last = [await manager.create() for _ in range(3)]
    store = FakeLabels()
    store.labels[leased.container_id] = {
        LABEL_REAPER_LEASE: encode_lease(Lease("gw-other", clock.seconds() + 500))
    }
    reaper = Reaper(manager, lease=ClusterLease(store, clock, "gw-me", ttl=30.0))
    clock.advance(200)
    await reaper.sweep()
    assert [s.sandbox_id for s in manager.registry] == [leased.sandbox_id]
    assert first.sandbox_id not in manager.registry and last.sandbox_id not in manager.registry


@pytest_twisted.ensureDeferred
async def test_merging_saved_facts_extends_a_lifetime_and_never_invents_one(
    manager: SandboxManager,
) -> None:
    """Another gateway's later expiry (a keepalive there) extends this one's; an earlier or
    absent one changes nothing; a sandbox without a lifetime does not gain one."""
    sandbox = await manager.create()
    sandbox.expires_at = 1000.0
    manager.merge_saved(sandbox, SavedSandbox(0.0, False, 2000.0))
    assert sandbox.expires_at == 2000.0
    manager.merge_saved(sandbox, SavedSandbox(0.0, False, 1500.0))
    assert sandbox.expires_at == 2000.0
    manager.merge_saved(sandbox, SavedSandbox(0.0, False, None))
    assert sandbox.expires_at == 2000.0
    sandbox.expires_at = None
    manager.merge_saved(sandbox, SavedSandbox(0.0, False, 3000.0))
    assert sandbox.expires_at is None


def test_the_state_label_format_is_fixed() -> None:
    """The state label is what gateways of different versions in one cluster exchange: keys
    sorted, JSON; a label without ``ever_connected`` reads as never connected."""
    assert state_label(SavedSandbox(1.5, True, None)) == (
        '{"ever_connected": true, "expires_at": null, "last_activity": 1.5}'
    )
    assert saved_from_label({LABEL_STATE: '{"last_activity": 2}'}) == SavedSandbox(2.0, False, None)


@pytest_twisted.ensureDeferred
async def test_cluster_state_resolution_defaults_to_one_second(
    manager: SandboxManager, clock: Clock
) -> None:
    """By default an activity one second newer than the written one is written again."""
    sandbox = await manager.create()
    store = FakeLabels()
    state = ClusterState(store, clock)
    await state.save([sandbox])
    sandbox.last_activity += 1.0
    await state.save([sandbox])
    assert store.writes == 2


@pytest_twisted.ensureDeferred
async def test_cluster_state_does_not_rewrite_what_a_listing_showed(
    manager: SandboxManager, clock: Clock
) -> None:
    """Facts a listing showed for a sandbox (``seen``) count as written: saving the same
    facts writes nothing."""
    sandbox = await manager.create()
    store = FakeLabels()
    state = ClusterState(store, clock)
    state.seen(sandbox.sandbox_id, SavedSandbox(sandbox.last_activity, False, None))
    await state.save([sandbox])
    assert store.writes == 0


@pytest_twisted.ensureDeferred
async def test_cluster_state_counts_every_failed_sandbox_in_its_warning(
    manager: SandboxManager, clock: Clock, log_messages: list[str]
) -> None:
    """Two sandboxes whose store fails are counted as two in the one warning."""
    a, b = await manager.create(), await manager.create()
    store = FailingLabels({a.container_id, b.container_id})
    await ClusterState(store, clock).save([a, b])
    assert "could not save the state of 2 sandboxes in the cluster" in log_messages


@pytest_twisted.ensureDeferred
async def test_a_reconcile_records_the_cluster_facts_it_lists(
    runtime: FakeRuntime, clock: Clock
) -> None:
    """Facts a listing brings for a sandbox (another gateway's save) are recorded as written
    by reconcile: the next save of those same facts writes nothing."""
    import attrs

    from twistedgw.lifecycle.options import LifecyclePolicy
    from twistedgw.registry import SandboxRegistry

    store = FakeLabels()
    state = ClusterState(store, clock)

    async def ready(_: object) -> None:
        return None

    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=ready,
        policy=LifecyclePolicy(idle_timeout=100),
        state=state,
    )
    sandbox = await manager.create()
    facts = SavedSandbox(sandbox.last_activity, True, None)
    info = runtime.containers[sandbox.container_id]
    runtime.containers[sandbox.container_id] = attrs.evolve(info, saved=facts)
    await manager.reconcile()
    assert sandbox.ever_connected
    await state.save([sandbox])
    assert store.writes == 0
