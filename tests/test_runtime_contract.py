"""The runtime contract (``tests/runtime_contract.py``) on ``FakeRuntime``: no Docker needed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.runtime_contract import (
    test_a_container_killed_behind_its_back_is_reported_to_watchers,
    test_create_list_remove,
    test_lists_only_this_instances_containers,
    test_pause_and_unpause,
    test_provides_the_interface,
    test_remove_unknown_container_succeeds,
    test_template_images,
)
from twistedgw.runtime.interface import ContainerInfo, ContainerSpec, ImageFacts
from twistedgw.testing.fakes import FakeRuntime

__all__ = [
    "test_a_container_killed_behind_its_back_is_reported_to_watchers",
    "test_create_list_remove",
    "test_lists_only_this_instances_containers",
    "test_pause_and_unpause",
    "test_provides_the_interface",
    "test_remove_unknown_container_succeeds",
    "test_template_images",
]


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def present_image(runtime: FakeRuntime) -> str:
    """The one image the fake engine holds."""
    runtime.images = {"fake-image": ImageFacts("sha256:fake", 1, "2026-11-26T00:00:00Z")}
    return "fake-image"


@pytest.fixture
def foreign(runtime: FakeRuntime) -> Callable[[ContainerSpec, dict[str, str]], Awaitable[None]]:
    async def add(spec: ContainerSpec, labels: dict[str, str]) -> None:
        runtime.add_foreign(spec, labels)

    return add


@pytest.fixture
def kill_behind(runtime: FakeRuntime) -> Callable[[ContainerInfo], Awaitable[None]]:
    """The fake engine's SIGKILL of a container (its ``die`` event included)."""

    async def kill(info: ContainerInfo) -> None:
        runtime.kill(info.container_id, exit_code=137, emit=True)

    return kill
