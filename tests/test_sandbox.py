"""The Sandbox record and the registry."""

from __future__ import annotations

from twistedgw.registry import SandboxRegistry
from twistedgw.sandbox import (
    Graveyard,
    Sandbox,
    SandboxSettings,
    Tombstone,
    is_valid_sandbox_id,
    new_sandbox_id,
)


class Client:
    def __init__(self) -> None:
        self.closed: list[tuple[int, str]] = []

    def disconnect(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))


def make_sandbox(now: float = 100.0) -> Sandbox:
    return Sandbox(
        sandbox_id=new_sandbox_id(),
        container_id="c1",
        created_at=now,
        ip_address="172.17.0.2",
        agent_host="127.0.0.1",
        agent_port=40000,
        agent_secret="s",
        last_activity=now,
        settings=SandboxSettings(idle_timeout=100),
    )


def test_ids_have_128_bits_and_validate() -> None:
    """Sandbox ids are 32 hex digits, unique, and only that shape validates."""
    ids = {new_sandbox_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_valid_sandbox_id(i) and len(i) == 32 for i in ids)
    for bad in ["", "..", "%2e%2e", "ABCDEF" * 6, "a" * 31, "a" * 33, "é" * 32, "abcd1234"]:
        assert not is_valid_sandbox_id(bad)


def test_status_words_follow_clients() -> None:
    """The seed's words: idle before any client (as in the seed's example), connected while
    one is attached, idle after; the finer state says created before any client."""
    registry = SandboxRegistry()
    sandbox = make_sandbox()
    registry.add(sandbox)
    assert (sandbox.status, sandbox.state) == ("idle", "created")
    assert sandbox.to_json()["status"] == "idle"
    assert sandbox.to_json(details=True)["state"] == "created"
    a, b = Client(), Client()
    sandbox.attach(a, 110.0)
    sandbox.attach(b, 111.0)
    assert sandbox.status == "connected"
    sandbox.detach(a, 112.0)
    assert sandbox.status == "connected"
    assert sandbox.state == "connected"
    sandbox.detach(b, 113.0)
    assert (sandbox.status, sandbox.state) == ("idle", "idle")
    assert sandbox.last_activity == 113.0


def test_idle_for_counts_from_last_activity() -> None:
    """Idle time is zero while connected and counts from the last activity otherwise."""
    sandbox = make_sandbox(now=100.0)
    assert sandbox.idle_for(150.0) == 50.0
    client = Client()
    sandbox.attach(client, 150.0)
    assert sandbox.idle_for(1000.0) == 0.0
    sandbox.detach(client, 200.0)
    sandbox.touch(300.0)
    assert sandbox.idle_for(310.0) == 10.0
    assert sandbox.idle_for(300.0) == 0.0  # just active
    assert sandbox.idle_for(290.0) == 0.0  # a clock that stepped back: never negative


def test_seed_json_fields() -> None:
    """to_json has exactly the seed's fields."""
    sandbox = make_sandbox(now=1648371234.567)
    assert sandbox.to_json() == {
        "sandbox_id": sandbox.sandbox_id,
        "status": "idle",
        "created_at": 1648371234.567,
        "ip_address": "172.17.0.2",
    }
    assert "agent_secret" not in repr(sandbox)


def test_details_are_opt_in() -> None:
    """Extra fields appear with details, and metadata when the creator set some."""
    sandbox = make_sandbox()
    assert set(sandbox.to_json(details=True)) >= {"clients", "idle_timeout", "metadata"}
    with_meta = Sandbox(
        **{
            **{a.name: getattr(sandbox, a.name) for a in Sandbox.__attrs_attrs__ if a.init},
            "settings": SandboxSettings(100, metadata={"a": "b"}),
        }
    )
    assert with_meta.to_json()["metadata"] == {"a": "b"}


def test_timers() -> None:
    """Idle expiry needs no clients; lifetime ends regardless of clients."""
    sandbox = make_sandbox(now=0.0)
    sandbox.expires_at = 500.0
    assert not sandbox.is_idle_expired(100.0)
    assert sandbox.is_idle_expired(100.1)
    sandbox.attach(Client(), 50.0)
    assert not sandbox.is_idle_expired(10_000.0)
    assert not sandbox.is_lifetime_over(499.9)
    assert sandbox.is_lifetime_over(500.0)


def test_graveyard_is_bounded_in_size_and_age() -> None:
    """Tombstones expire after max_age and the oldest go first beyond max_entries."""
    graveyard = Graveyard(max_entries=2, max_age=10.0)
    for n in range(3):
        graveyard.bury(Tombstone(f"id{n}", "idle", removed_at=float(n)))
    assert len(graveyard) == 2
    assert graveyard.get("id0", 3.0) is None
    tombstone = graveyard.get("id1", 3.0)
    assert tombstone is not None and tombstone.reason == "idle"
    assert graveyard.get("id1", 20.0) is None


def test_detailed_json_reports_clients_restarts_lost_sessions_and_pause() -> None:
    """``?details`` shows how many clients are attached, how often the agent was restarted,
    which sessions that lost, and whether the sandbox is paused."""
    sandbox = make_sandbox()
    sandbox.attach(object(), 120.0)  # type: ignore[arg-type]
    sandbox.agent_restarts = 2
    sandbox.lost_sessions = {"s2", "s1"}
    sandbox.paused_at = 130.0
    body = sandbox.to_json(details=True)
    assert (body["clients"], body["agent_restarts"], body["lost_sessions"], body["paused"]) == (
        1,
        2,
        ["s1", "s2"],
        True,
    )


def test_a_reburied_sandbox_counts_as_the_newest_tombstone() -> None:
    """Burying a sandbox again moves it to the young end: when the graveyard is full, the
    oldest other tombstone goes first."""
    graveyard = Graveyard(max_entries=2)
    graveyard.bury(Tombstone("a", "deleted", 1.0))
    graveyard.bury(Tombstone("b", "deleted", 2.0))
    graveyard.bury(Tombstone("a", "exited", 3.0))
    graveyard.bury(Tombstone("c", "deleted", 4.0))
    assert graveyard.get("b", 5.0) is None
    assert graveyard.get("a", 5.0) == Tombstone("a", "exited", 3.0)


def test_a_tombstone_is_kept_for_exactly_its_max_age() -> None:
    """A tombstone answers up to ``max_age`` seconds after the removal, inclusive."""
    graveyard = Graveyard(max_age=100.0)
    graveyard.bury(Tombstone("a", "deleted", 10.0))
    assert graveyard.get("a", 110.0) is not None
    assert graveyard.get("a", 110.5) is None


def test_removing_an_unknown_sandbox_is_a_no_op() -> None:
    """Forgetting an id the registry does not hold (removed twice, by two paths) answers
    ``None`` instead of failing."""
    registry = SandboxRegistry()
    assert registry.remove("f" * 32) is None
    assert len(registry) == 0


def test_attaching_a_client_is_activity() -> None:
    """Attaching a client moves the last activity to that moment (a client that attaches and
    detaches at once still counts from when it came)."""
    sandbox = make_sandbox(now=100.0)
    sandbox.attach(Client(), 150.0)
    assert sandbox.last_activity == 150.0
