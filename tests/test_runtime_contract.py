"""The runtime contract (``tests/runtime_contract.py``) on ``FakeRuntime``: no Docker needed."""

from __future__ import annotations

import pytest

from tests.runtime_contract import (
    test_create_list_remove,
    test_pause_and_unpause,
    test_provides_the_interface,
    test_remove_unknown_container_succeeds,
)
from twistedgw.testing.fakes import FakeRuntime

__all__ = [
    "test_create_list_remove",
    "test_pause_and_unpause",
    "test_provides_the_interface",
    "test_remove_unknown_container_succeeds",
]


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()
