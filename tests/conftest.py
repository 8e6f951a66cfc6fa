"""Shared fixtures for the fast, in-memory tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.interface import ContainerInfo
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.web.api import GatewayAPI

# The scenario helpers shared by the fast and the integration tests assert inside: rewrite
# their asserts like a test module's (registered before anything imports them).
pytest.register_assert_rewrite("tests.scenarios")

# Timing-based deadlines make property tests flaky on a loaded 2-core CI machine.
settings.register_profile("gateway", deadline=None)
settings.load_profile("gateway")


async def _ready_at_once(info: ContainerInfo) -> None:
    return None


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)  # a plausible epoch, so created_at looks real
    return clock


@pytest.fixture
def log_messages() -> Iterator[list[str]]:
    """Every message logged (``twisted.logger``) while the test runs, formatted as an operator
    reads it in the gateway's log."""
    messages: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield messages
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def manager(runtime: FakeRuntime, clock: Clock) -> SandboxManager:
    """A manager over the fake runtime whose agents are 'ready' at once."""
    return SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready_at_once,
        policy=LifecyclePolicy(idle_timeout=100, max_sandboxes=5, max_lifetime=10_000),
    )


@pytest.fixture
def treq(manager: SandboxManager) -> StubTreq:
    """The REST API over ``manager``, in memory (calls: ``twistedgw.testing.rest``)."""
    return StubTreq(GatewayAPI(manager).resource())


def pytest_addoption(parser: Any) -> None:
    parser.addoption(
        "--serial",
        choices=("all", "skip", "only"),
        default="all",
        help="tests marked `serial` (they must run alone: timing figures, a restart of the "
        "shared engine): run them with the rest (all, the default), leave them out (skip: "
        "the parallel phase of tests/run.sh), or run only them (only: its second phase)",
    )


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    # Integration tests live in tests/integration and carry the marker automatically. Slow:
    # what starts real processes (the agent's black-box and fuzz suites, twistd) and the
    # hypothesis property tests, most of the fast suite's time; `-m "not integration and not
    # slow"` is the quick loop, the fast suite still runs them.
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
        if (
            item.fspath.basename in _SLOW_FILES
            or getattr(item, "originalname", item.name) in _SLOW_TESTS
            or getattr(getattr(item, "obj", None), "is_hypothesis_test", False)
        ):
            item.add_marker(pytest.mark.slow)
    _select_serial(config, items)


def _select_serial(config: Any, items: list[Any]) -> None:
    """Apply ``--serial``: deselect the serial tests (skip) or all others (only)."""
    mode = config.getoption("serial")
    if mode == "all":
        return
    keep, drop = [], []
    for item in items:
        serial = item.get_closest_marker("serial") is not None
        (keep if serial == (mode == "only") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_SLOW_FILES = {
    "test_blackbox.py",
    "test_fuzz.py",
    "test_build_mirror.py",
    # A gateway in front of real agent processes on the host (tests/hostgw.py).
    "test_hostgw_client.py",
    "test_hostgw_files.py",
    "test_hostgw_previews.py",
    "test_hostagents.py",
}
_SLOW_TESTS = {
    "test_twistd_finds_the_plugin_without_pythonpath",
    # Those that wait on real time or real processes for 0.3 s or more (measured with
    # --durations), leaving the quick loop to what runs in memory:
    "test_a_client_that_stalls_mid_body_does_not_fill_the_proxy",
    "test_a_hundred_parallel_requests_all_complete",
    "test_a_pty_nobody_keeps_up_with_blocks_its_writer_until_the_reader_leaves",
    "test_a_login_shell_echoes_input_resizes_and_interrupts",
    "test_forwarder_stops_reading_while_the_user_does_not",
    "test_saturated_docker_pool_does_not_mark_the_engine_down",
    "test_unanswered_ping_marks_the_engine_down",
    "test_a_spawner_that_never_answers_costs_at_most_the_timeout_then_the_wrapper_runs_it",
    "test_yield_after_returns_the_output_so_far_and_attach_completes_it",
    "test_two_watchers_each_get_the_live_output",
    "test_finished_results_are_forgotten_after_the_retention",
    "test_a_dropped_connection_no_longer_kills_its_command",
    "test_agent_death_closes_client_with_reason",
    "test_client_arriving_during_a_restart_waits_for_the_agent",
    "test_backpressure_pauses_a_streamed_command_until_resumed",
}
