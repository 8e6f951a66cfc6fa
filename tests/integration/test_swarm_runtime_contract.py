"""The runtime contract (``tests/runtime_contract.py``) on ``SwarmRuntime``, against the
second, swarm-mode engine (``tests/integration/swarm.py``), plus what only Swarm shows."""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.integration.conftest import IMAGE
from tests.integration.swarm import (
    SWARM_URL,
    pytestmark_swarm,
    remove_instance_services,
    swarm_client,
)
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
from twistedgw.runtime.interface import ContainerSpec
from twistedgw.runtime.swarm import SwarmRuntime, volume_names

pytestmark = pytestmark_swarm

__all__ = [
    "swarm_client",
    "test_a_container_killed_behind_its_back_is_reported_to_watchers",
    "test_create_list_remove",
    "test_lists_only_this_instances_containers",
    "test_pause_and_unpause",
    "test_provides_the_interface",
    "test_remove_unknown_container_succeeds",
    "test_template_images",
]


@pytest_twisted.async_yield_fixture
async def runtime(swarm_client: Any) -> AsyncIterator[Any]:
    instance = f"swcontract-{secrets.token_hex(4)}"
    swarm = SwarmRuntime(reactor, IMAGE, instance=instance, docker_url=SWARM_URL, threads=2)
    swarm.startService()
    try:
        yield swarm
    finally:
        await swarm.stopService()
        remove_instance_services(swarm_client, instance)


@pytest.fixture
def foreign(
    swarm_client: Any,
) -> Iterator[Callable[[ContainerSpec, dict[str, str]], Awaitable[None]]]:
    """Services with exactly the given labels beside the runtime's, made with the SDK."""
    created: list[Any] = []

    async def add(wanted: ContainerSpec, labels: dict[str, str]) -> None:
        service = await deferToThread(
            swarm_client.services.create,
            IMAGE,
            command=["sleep", "60"],
            labels=labels,
            name=f"foreign-{secrets.token_hex(4)}",
        )
        created.append(service)

    yield add
    for service in created:
        service.remove()


@pytest.fixture
def present_image() -> str:
    return IMAGE


@pytest_twisted.ensureDeferred
async def test_swarm_sandbox_is_a_hardened_service(runtime: Any, swarm_client: Any) -> None:
    """A sandbox is a one-replica service whose container has the hardening (capabilities,
    read-only root, pids and nofile limits, memory and CPU limits and reservations), whose
    agent answers on the Unix socket in its volume, and whose volumes go with it."""
    wanted = spec()
    info = await runtime.create(wanted)
    try:
        service = swarm_client.services.get(info.container_id)
        resources = service.attrs["Spec"]["TaskTemplate"]["Resources"]
        assert resources["Limits"]["MemoryBytes"] == resources["Reservations"]["MemoryBytes"] > 0
        assert resources["Limits"]["NanoCPUs"] == resources["Reservations"]["NanoCPUs"] > 0
        assert service.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 1
        (container,) = swarm_client.containers.list(
            filters={"label": f"com.docker.swarm.service.id={info.container_id}"}
        )
        host = container.attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert sorted(host["CapAdd"]) == ["CAP_KILL", "CAP_SETGID", "CAP_SETUID"]
        assert host["PidsLimit"] == runtime.limits.pids
        assert host["Ulimits"][0]["Name"] == "nofile"
        assert info.agent_socket
        assert info.agent_socket.startswith("/var/lib/twistedgw-swarm/volumes/")
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        for _ in range(200):  # the agent starts after the task does
            try:
                sock.connect(info.agent_socket)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                await deferLater(reactor, 0.05, lambda: None)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(12).startswith(b"HTTP/1.1")
        sock.close()
    finally:
        await runtime.remove(info.container_id, info.sandbox_id)
    names = {v.name for v in swarm_client.volumes.list()}
    assert not names & set(volume_names(wanted.sandbox_id).values())


@pytest.fixture
def kill_behind(swarm_client: Any) -> Callable[[Any], Awaitable[None]]:
    """SIGKILL of the service's task container through the SDK, not through the runtime."""

    async def kill(info: Any) -> None:
        label = f"com.docker.swarm.service.id={info.container_id}"
        containers = await deferToThread(swarm_client.containers.list, filters={"label": label})
        assert containers, f"no task container for service {info.container_id}"
        for container in containers:
            await deferToThread(container.kill)

    return kill
