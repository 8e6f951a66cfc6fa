"""Lifetimes a creator did not ask for: the operator's default and maximum apply, to cold
creates and to warm-pool hand-outs alike, and show in ``expires_at``."""

from __future__ import annotations

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from twistedgw.lifecycle.errors import InvalidSettings
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy, settings_from_body
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import ContainerInfo
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.testing.rest import call
from twistedgw.web.api import GatewayAPI


async def _ready(info: ContainerInfo) -> None:
    return None


def manager_with(policy: LifecyclePolicy, clock: Clock, pool_size: int = 0) -> SandboxManager:
    return SandboxManager(
        SandboxRegistry(), FakeRuntime(), clock, wait_ready=_ready, policy=policy,
        pool_size=pool_size,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "body", "lifetime"),
    [
        (LifecyclePolicy(), {}, None),
        (LifecyclePolicy(max_lifetime=600), {}, 600.0),
        (LifecyclePolicy(default_lifetime=60, max_lifetime=600), {}, 60.0),
        (LifecyclePolicy(default_lifetime=60), {}, 60.0),
        (LifecyclePolicy(default_lifetime=60, max_lifetime=600), {"max_lifetime": 300}, 300.0),
        (LifecyclePolicy(max_lifetime=600), {"max_lifetime": 600}, 600.0),
        (LifecyclePolicy(), {"max_lifetime": 5}, 5.0),
    ],
    ids=[
        "no-limits",
        "server-max-is-the-default",
        "server-default",
        "server-default-without-max",
        "creator-choice",
        "creator-choice-at-the-max",
        "creator-choice-without-limits",
    ],
)
def test_lifetime_defaults_to_the_server_default_then_maximum(
    policy: LifecyclePolicy, body: dict[str, float], lifetime: float | None
) -> None:
    """A creation without ``max_lifetime`` gets the server default, else the server maximum,
    else no limit; a creator's own choice stands when within the maximum."""
    assert settings_from_body(policy, body).max_lifetime == lifetime


def test_lifetime_above_the_server_maximum_is_refused() -> None:
    """A ``max_lifetime`` above the server's maximum is a 400, not silently capped."""
    with pytest.raises(InvalidSettings, match="server maximum of 600 s"):
        settings_from_body(LifecyclePolicy(max_lifetime=600), {"max_lifetime": 601})


@pytest_twisted.ensureDeferred
async def test_sandbox_without_lifetime_expires_at_the_server_maximum(clock: Clock) -> None:
    """Over REST: a sandbox created with an empty body expires ``max_lifetime`` after its
    creation (``expires_at`` in the details), and is gone once that passes."""
    manager = manager_with(LifecyclePolicy(max_lifetime=600), clock)
    treq = StubTreq(GatewayAPI(manager).resource())
    code, created = await call(treq, "POST", "/sandboxes", json={})
    assert code == 200
    code, body = await call(treq, "GET", f"/sandboxes/{created['sandbox_id']}?details=true")
    assert code == 200
    assert body["expires_at"] == pytest.approx(clock.seconds() + 600)
    assert body["expires_at"] == body["created_at"] + 600


@pytest_twisted.ensureDeferred
async def test_sandbox_without_any_limit_never_expires(clock: Clock) -> None:
    """With neither a server default nor a maximum, ``expires_at`` is null."""
    manager = manager_with(LifecyclePolicy(), clock)
    sandbox = await manager.create(settings_from_body(manager.policy, {}))
    assert sandbox.expires_at is None


@pytest_twisted.ensureDeferred
async def test_pool_hand_out_expires_like_a_cold_create(clock: Clock) -> None:
    """A sandbox handed out from the warm pool gets the same lifetime as a cold one: the
    creator's, else the server default or maximum, counted from the hand-out."""
    manager = manager_with(LifecyclePolicy(default_lifetime=120, max_lifetime=600), clock, 2)
    manager.startService()
    try:
        await manager.reconcile()
        assert manager.pool_status()["ready"] == 2
        clock.advance(50)  # the pool container waited a while before anyone asked
        default = await manager.create(settings_from_body(manager.policy, {}))
        chosen = await manager.create(settings_from_body(manager.policy, {"max_lifetime": 300}))
        assert default.from_pool and chosen.from_pool
        assert default.expires_at == clock.seconds() + 120
        assert chosen.expires_at == clock.seconds() + 300
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_pool_hand_out_without_any_limit_never_expires(clock: Clock) -> None:
    """A hand-out with no lifetime anywhere has none (``expires_at`` null)."""
    manager = manager_with(LifecyclePolicy(), clock, 1)
    manager.startService()
    try:
        await manager.reconcile()
        handed = await manager.create(settings_from_body(manager.policy, {}))
        assert handed.from_pool and handed.expires_at is None
    finally:
        await manager.stopService()
