"""Prometheus metrics (``twistedgw.metrics``): what moves them, and ``GET /metrics``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import docker.errors
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import Clock

from tests.proxygw import Gateway, proxy_gateway
from twistedgw import protocol
from twistedgw.lifecycle.errors import CapacityExceeded
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy
from twistedgw.metrics import GatewayMetrics, command_outcome
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.docker import DockerRuntime
from twistedgw.runtime.interface import ContainerFailed
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.testing.rest import request
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator


def samples(metrics: GatewayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by name and labels (parsed from the text exposition)."""
    text = metrics.exposition().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


NOW = datetime(2026, 11, 26)


@pytest.mark.parametrize(
    ("message", "outcome"),
    [
        (protocol.result_message("r", "true", 0, now=NOW), "ok"),
        (protocol.result_message("r", "false", 1, now=NOW), "failed"),
        (protocol.result_message("r", "sleep 9", -9, timed_out=True, now=NOW), "timed_out"),
        (protocol.result_message("r", "sleep 9", -9, cancelled=True, now=NOW), "cancelled"),
        (protocol.result_message("r", "x", -9, now=NOW, oom_killed=True), "oom"),
        (protocol.result_message("r", "yes", 0, now=NOW, output_limit_exceeded=True), "failed"),
        (protocol.command_error("r", "x", "bad", "invalid_timeout", now=NOW), "error"),
        # Flags spelled inside the output are text, not the result's own keys.
        (
            protocol.result_message("r", "x", 0, '"timed_out": true, "oom_killed": true', now=NOW),
            "ok",
        ),
        (protocol.result_message("r", "x", 0, "y" * 100_000, now=NOW, pid=4), "ok"),
    ],
)
def test_command_outcome_reads_the_result_as_the_agent_encodes_it(
    message: dict[str, Any], outcome: str
) -> None:
    """The outcome label comes from the result's flags and returncode (from its tail)."""
    assert command_outcome(protocol.encode(message)) == outcome


def test_each_gateway_has_its_own_registry() -> None:
    """Two ``GatewayMetrics`` count apart (no global registry), and both serve the egress
    counters of the default registry."""
    a, b = GatewayMetrics(), GatewayMetrics()
    a.removed.labels(reason="idle").inc()
    assert value(a, "twistedgw_sandboxes_removed_total", reason="idle") == 1
    assert value(b, "twistedgw_sandboxes_removed_total", reason="idle") == 0
    assert b"twistedgw_egress_bytes_total" in b.exposition()


def _manager(runtime: FakeRuntime, clock: Clock, max_sandboxes: int = 5) -> SandboxManager:
    async def ready(info: Any) -> None:
        clock.advance(0.25)  # the agent "answers" a quarter second later

    return SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=ready,
        policy=LifecyclePolicy(idle_timeout=100, max_sandboxes=max_sandboxes),
    )


@pytest_twisted.ensureDeferred
async def test_creates_are_timed_by_path_and_outcome_and_removals_counted(
    runtime: FakeRuntime, clock: Clock
) -> None:
    """A cold create is observed as (cold, ok) with its duration; one over --max-sandboxes as
    (cold, refused); a delete counts under reason=deleted; sandboxes by status follow."""
    manager = _manager(runtime, clock, max_sandboxes=1)
    metrics = manager.metrics
    sandbox = await manager.create()
    name = "twistedgw_sandbox_create_duration_seconds"
    assert value(metrics, name + "_count", path="cold", outcome="ok") == 1
    assert value(metrics, name + "_sum", path="cold", outcome="ok") == pytest.approx(0.25)
    assert value(metrics, "twistedgw_sandboxes", status="created") == 1
    with pytest.raises(CapacityExceeded):
        await manager.create()
    assert value(metrics, name + "_count", path="cold", outcome="refused") == 1
    await manager.delete(sandbox.sandbox_id)
    assert value(metrics, "twistedgw_sandboxes_removed_total", reason="deleted") == 1
    assert value(metrics, "twistedgw_sandboxes", status="created") == 0


@pytest_twisted.ensureDeferred
async def test_docker_calls_are_timed_and_failures_counted_by_operation() -> None:
    """``DockerRuntime._defer`` (every engine call) observes a latency per operation and
    counts a refused call under error=refused."""
    runtime = DockerRuntime(reactor, image="twistedgw-test-none")
    runtime._pool.start()
    try:

        def _thd_create() -> None:
            raise docker.errors.APIError("no such network")

        def _thd_list() -> list[Any]:
            return []

        with pytest.raises(ContainerFailed):
            await runtime._defer(_thd_create)
        await runtime._defer(_thd_list)
    finally:
        runtime._pool.stop()
    metrics = runtime.metrics
    assert (
        value(metrics, "twistedgw_docker_call_errors_total", operation="create", error="refused")
        == 1
    )
    assert value(metrics, "twistedgw_docker_call_duration_seconds_count", operation="create") == 1
    assert value(metrics, "twistedgw_docker_call_duration_seconds_count", operation="list") == 1
    assert (
        value(metrics, "twistedgw_docker_call_errors_total", operation="list", error="refused") == 0
    )


@pytest_twisted.async_yield_fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with proxy_gateway(max_message_size=64 * 1024) as gw:
        yield gw


@pytest_twisted.ensureDeferred
async def test_commands_clients_and_bytes_are_counted(gateway: Gateway) -> None:
    """Through the real proxy: commands started and finished (ok, failed), their latency,
    bytes both ways and the WebSocket clients gauge."""
    metrics = gateway.factory.metrics
    assert metrics is gateway.manager.metrics
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    assert value(metrics, "twistedgw_websocket_clients") == 1
    ok = await client.command("echo hi")
    failed = await client.command("fail")
    assert (ok["returncode"], failed["returncode"]) == (0, 1)
    assert value(metrics, "twistedgw_commands_started_total", mode="foreground") == 2
    assert value(metrics, "twistedgw_commands_finished_total", outcome="ok") == 1
    assert value(metrics, "twistedgw_commands_finished_total", outcome="failed") == 1
    assert value(metrics, "twistedgw_command_duration_seconds_count") == 2
    assert value(metrics, "twistedgw_websocket_bytes_total", direction="to_agent") > 0
    assert value(metrics, "twistedgw_websocket_bytes_total", direction="to_client") > len(
        json.dumps(ok)
    )
    assert value(metrics, "twistedgw_sandboxes", status="connected") == 1


@pytest_twisted.ensureDeferred
async def test_metrics_route_needs_a_token_when_tokens_are_configured(
    manager: SandboxManager,
) -> None:
    """``GET /metrics``: 401 without the token, the text exposition with it."""
    api = GatewayAPI(manager, authenticator=Authenticator.from_tokens(["s3cret"]))
    treq = StubTreq(api.resource())
    code, _, _ = await request(treq, "GET", "/metrics")
    assert code == 401
    code, headers, body = await request(treq, "GET", "/metrics", token="s3cret")
    assert code == 200
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert b'twistedgw_sandboxes{status="idle"} 0.0' in body


@pytest_twisted.ensureDeferred
async def test_metrics_route_is_open_without_tokens_and_404_with_a_metrics_port(
    manager: SandboxManager,
) -> None:
    """Without tokens /metrics is open (as the API); with --metrics-port the API port does
    not serve it (a JSON 404)."""
    code, _, body = await request(StubTreq(GatewayAPI(manager).resource()), "GET", "/metrics")
    assert code == 200
    assert b'twistedgw_sandboxes{status="idle"}' in body
    api = GatewayAPI(manager, serve_metrics=False)
    code, _, body = await request(StubTreq(api.resource()), "GET", "/metrics")
    assert code == 404
    assert "metrics-port" in json.loads(body)["error"]


@pytest_twisted.ensureDeferred
async def test_metrics_site_serves_the_registry() -> None:
    """The --metrics-port site answers GET /metrics from the gateway's registry."""
    from twistedgw.web.site import metrics_site

    metrics = GatewayMetrics()
    metrics.agent_connect_failures.inc(3)
    code, _, body = await request(StubTreq(metrics_site(metrics).resource), "GET", "/metrics")
    assert code == 200
    assert b"twistedgw_agent_connect_failures_total 3.0" in body


@pytest_twisted.ensureDeferred
async def test_a_create_from_the_warm_pool_is_counted_as_pool(clock: Clock) -> None:
    """With a warm pool, a create that takes a pooled container is observed under
    path=pool, and the pool gauges show the size asked for and what is ready."""

    async def ready(info: Any) -> None:
        return None

    runtime = FakeRuntime()
    manager = SandboxManager(SandboxRegistry(), runtime, clock, wait_ready=ready, pool_size=1)
    manager.startService()
    try:
        await manager.reconcile()
        metrics = manager.metrics
        assert value(metrics, "twistedgw_pool_size", template="default") == 1
        assert value(metrics, "twistedgw_pool_ready", template="default") == 1
        sandbox = await manager.create()
        assert sandbox.from_pool
        name = "twistedgw_sandbox_create_duration_seconds_count"
        assert value(metrics, name, path="pool", outcome="ok") == 1
        assert value(metrics, name, path="cold", outcome="ok") == 0
    finally:
        await manager.stopService()
