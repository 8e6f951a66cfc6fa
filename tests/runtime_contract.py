"""One contract for every IContainerRuntime: the fake used by the fast tests and the real
DockerRuntime must behave alike, or the fast tests prove nothing.

The tests here take a ``runtime`` fixture (with an ``instance`` attribute) and a ``foreign``
fixture: ``await foreign(spec, labels)`` puts a container with exactly those labels on the same
engine, not through ``runtime``. ``tests/test_runtime_contract.py`` runs them on the fake (no
Docker), ``tests/integration/test_runtime_contract.py`` on ``DockerRuntime``.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from twistedgw.runtime.interface import ContainerSpec, IContainerRuntime, ImageMissing
from twistedgw.runtime.labels import LABEL_INSTANCE, LABEL_MANAGED, labels_for
from twistedgw.sandbox import SandboxSettings, new_agent_secret, new_sandbox_id


def spec(**settings: Any) -> ContainerSpec:
    return ContainerSpec(
        sandbox_id=new_sandbox_id(),
        created_at=1_700_000_000.5,
        agent_secret=new_agent_secret(),
        settings=SandboxSettings(idle_timeout=120, **settings),
    )


def test_provides_the_interface(runtime: Any) -> None:
    """The runtime implements IContainerRuntime completely."""
    assert verifyObject(IContainerRuntime, runtime)


@pytest_twisted.ensureDeferred
async def test_create_list_remove(runtime: Any) -> None:
    """A created container is listed, running, with what the gateway needs; removing it
    (twice) leaves nothing listed."""
    wanted = spec(metadata={"team": "a"}, owner="o1", max_lifetime=60.0)
    info = await runtime.create(wanted)
    assert info.sandbox_id == wanted.sandbox_id
    assert info.created_at == wanted.created_at
    assert info.agent_secret == wanted.agent_secret
    assert info.running
    # Reachable from this host only: a port on loopback, or a Unix socket (Swarm).
    assert (info.agent_port > 0 and info.agent_host == "127.0.0.1") or info.agent_socket
    listed = {i.sandbox_id: i for i in await runtime.list_containers()}
    assert listed[wanted.sandbox_id].settings.metadata == {"team": "a"}
    assert listed[wanted.sandbox_id].settings.owner == "o1"
    assert listed[wanted.sandbox_id].settings.max_lifetime == 60.0
    assert listed[wanted.sandbox_id].settings.idle_timeout == 120
    await runtime.remove(info.container_id, info.sandbox_id)
    await runtime.remove(info.container_id, info.sandbox_id)  # idempotent
    assert wanted.sandbox_id not in {i.sandbox_id for i in await runtime.list_containers()}


@pytest_twisted.ensureDeferred
async def test_remove_unknown_container_succeeds(runtime: Any) -> None:
    """Removing a container that does not exist is not an error."""
    await runtime.remove("0" * 64)


@pytest_twisted.ensureDeferred
async def test_pause_and_unpause(runtime: Any) -> None:
    """Pausing a running container and unpausing it succeed, twice each (idempotent); a
    missing container cannot be paused."""
    from twistedgw.runtime.interface import ContainerFailed

    info = await runtime.create(spec())
    try:
        await runtime.pause(info.container_id)
        await runtime.pause(info.container_id)
        await runtime.unpause(info.container_id)
        await runtime.unpause(info.container_id)
        failed = False
        try:
            await runtime.pause("0" * 64)
        except ContainerFailed:
            failed = True
        assert failed
    finally:
        await runtime.remove(info.container_id, info.sandbox_id)


@pytest_twisted.ensureDeferred
async def test_template_images(runtime: Any, present_image: str) -> None:
    """Templates: a present image is inspected (size, labels), a missing one is ``None``,
    and a create whose spec names a missing image fails with ImageMissing naming it, leaving
    nothing behind."""
    facts = await runtime.inspect_image(present_image)
    assert facts is not None and facts.size > 0 and facts.image_id
    missing = "twistedgw-no-such-image:never"
    assert await runtime.inspect_image(missing) is None
    wanted = attrs.evolve(spec(), image=missing)
    with pytest.raises(ImageMissing, match=missing):
        await runtime.create(wanted)
    assert wanted.sandbox_id not in {i.sandbox_id for i in await runtime.list_containers()}


@pytest_twisted.ensureDeferred
async def test_lists_only_this_instances_containers(runtime: Any, foreign: Any) -> None:
    """Only containers with both of this instance's labels are listed: not another gateway's,
    nor ones without our labels, nor ones missing either the managed or the instance label
    (a gateway must never adopt, reap or remove a sandbox that is not its own)."""
    ours = await runtime.create(spec())
    others = [spec() for _ in range(4)]
    await foreign(others[0], labels_for(others[0], runtime.instance + "-other"))
    await foreign(others[1], {})
    mine = labels_for(others[2], runtime.instance)
    await foreign(others[2], {k: v for k, v in mine.items() if k != LABEL_INSTANCE})
    mine = labels_for(others[3], runtime.instance)
    await foreign(others[3], {k: v for k, v in mine.items() if k != LABEL_MANAGED})
    listed = [info.sandbox_id for info in await runtime.list_containers()]
    assert listed == [ours.sandbox_id]


@pytest_twisted.ensureDeferred
async def test_a_container_killed_behind_its_back_is_reported_to_watchers(
    runtime: Any, kill_behind: Any
) -> None:
    """A container of ours that dies without the runtime's doing (``kill_behind``: SIGKILL
    through the engine, not through the runtime) is reported to every watcher as a ``die``
    (or ``oom``) event naming its sandbox and container, with exit code 137: what the
    manager's reconcile-on-event relies on to notice a dead sandbox at once."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    seen: list[Any] = []
    runtime.watch(seen.append)
    info = await runtime.create(spec())
    try:
        await kill_behind(info)
        for _ in range(300):
            if any(event.sandbox_id == info.sandbox_id for event in seen):
                break
            await deferLater(reactor, 0.1, lambda: None)
        ours = [event for event in seen if event.sandbox_id == info.sandbox_id]
        assert ours, f"no event for the killed container within 30 s (saw {seen})"
        assert ours[0].container_id == info.container_id
        assert ours[0].action in ("die", "oom")
        assert ours[0].exit_code == 137
    finally:
        await runtime.remove(info.container_id, info.sandbox_id)
