"""The runtime contract (``tests/runtime_contract.py``) on the real ``DockerRuntime`` (the fast
suite runs it on the fake), plus what only Docker can show."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.integration.conftest import IMAGE, remove_instance_containers
from tests.runtime_contract import (
    spec,
    test_a_container_killed_behind_its_back_is_reported_to_watchers,
    test_create_list_remove,
    test_lists_only_this_instances_containers,
    test_pause_and_unpause,
    test_provides_the_interface,
    test_remove_unknown_container_succeeds,
    test_template_images,
)
from twistedgw.runtime.docker import DockerRuntime
from twistedgw.runtime.interface import ContainerSpec, ImageMissing

__all__ = [
    "test_a_container_killed_behind_its_back_is_reported_to_watchers",
    "test_create_list_remove",
    "test_lists_only_this_instances_containers",
    "test_pause_and_unpause",
    "test_provides_the_interface",
    "test_remove_unknown_container_succeeds",
    "test_template_images",
]


@pytest_twisted.async_yield_fixture
async def runtime(docker_client: Any) -> AsyncIterator[Any]:
    instance = f"contract-{secrets.token_hex(4)}"
    docker = DockerRuntime(reactor, IMAGE, instance=instance, threads=2)
    docker.startService()
    try:
        yield docker
    finally:
        await docker.stopService()
        remove_instance_containers(docker_client, instance)


@pytest.fixture
def foreign(
    docker_client: Any,
) -> Iterator[Callable[[ContainerSpec, dict[str, str]], Awaitable[None]]]:
    """Containers with exactly the given labels, created (not started) beside the runtime's
    with the Docker SDK; removed by id afterwards."""
    created: list[Any] = []

    async def add(wanted: ContainerSpec, labels: dict[str, str]) -> None:
        container = await deferToThread(
            docker_client.containers.create, IMAGE, command=["true"], labels=labels
        )
        created.append(container)

    yield add
    for container in created:
        container.remove(force=True)


@pytest_twisted.ensureDeferred
async def test_missing_image(docker_client: Any) -> None:
    """The Docker runtime reports a missing image as ImageMissing at once (no registry pull)
    and leaves nothing behind."""
    instance = f"contract-{secrets.token_hex(4)}"
    docker = DockerRuntime(reactor, "twistedgw-no-such-image:never", instance=instance)
    docker.startService()
    try:
        with pytest.raises(ImageMissing):
            await docker.create(spec())
        assert await docker.list_containers() == []
    finally:
        await docker.stopService()
        remove_instance_containers(docker_client, instance)


@pytest.fixture
def present_image() -> str:
    return IMAGE


@pytest.fixture
def kill_behind(docker_client: Any) -> Callable[[Any], Awaitable[None]]:
    """``docker kill`` of the container through the SDK, not through the runtime."""

    async def kill(info: Any) -> None:
        container = await deferToThread(docker_client.containers.get, info.container_id)
        await deferToThread(container.kill)

    return kill
