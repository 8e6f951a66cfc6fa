"""What ``/metrics`` exposes (``twistedgw.metrics``): each metric family's name, HELP text,
TYPE and label names, the scrape-time gauges, and the Docker error labels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from twistedgw.metrics import (
    COMMAND_BUCKETS,
    CREATE_BUCKETS,
    DOCKER_BUCKETS,
    EGRESS_BYTES,
    EGRESS_DECISIONS,
    GatewayMetrics,
    docker_error_kind,
)
from twistedgw.runtime.interface import ContainerFailed, ImageMissing, RuntimeUnavailable

#: name (as exposed, with ``_total`` for counters) -> (TYPE, HELP, label names)
FAMILIES = {
    "twistedgw_sandbox_create_duration_seconds": (
        "histogram",
        "Sandbox creates: seconds until the sandbox's agent answered (or the create failed), "
        "by path (pool: a warm container handed out; cold: a new container) and outcome (ok, "
        "refused: over --max-sandboxes, failed).",
        {"path", "outcome"},
    ),
    "twistedgw_docker_call_duration_seconds": (
        "histogram",
        "Docker engine calls (queue wait in the Docker thread pool included), by operation.",
        {"operation"},
    ),
    "twistedgw_docker_call_errors_total": (
        "counter",
        "Docker engine calls that failed, by operation and error (unavailable: engine "
        "unreachable or too slow; refused: an API error; image_missing; other).",
        {"operation", "error"},
    ),
    "twistedgw_commands_started_total": (
        "counter",
        "Commands clients sent to sandboxes, by mode (foreground or background).",
        {"mode"},
    ),
    "twistedgw_commands_finished_total": (
        "counter",
        "Foreground commands whose result (or error reply) reached the gateway, by outcome: "
        "ok, failed, timed_out, cancelled, oom, error.",
        {"outcome"},
    ),
    "twistedgw_command_duration_seconds": (
        "histogram",
        "Foreground commands: seconds from the gateway forwarding the command to the agent "
        "until its result came back.",
        set(),
    ),
    "twistedgw_websocket_bytes_total": (
        "counter",
        "Bytes of WebSocket messages the proxy carried, by direction (to_agent: client "
        "messages; to_client: agent messages, output and results).",
        {"direction"},
    ),
    "twistedgw_sandboxes_removed_total": (
        "counter",
        "Sandboxes removed, by reason (deleted: by a client; idle, lifetime: reaped; exited "
        "and others: the container went away by itself).",
        {"reason"},
    ),
    "twistedgw_agent_connect_failures_total": (
        "counter",
        "Connections to a sandbox's agent that failed (the client or file route then waits "
        "for the agent to come back, or gets an error).",
        set(),
    ),
    "twistedgw_sandboxes": (
        "gauge",
        "Sandboxes this gateway runs, by status (created: no client yet; connected; idle; "
        "paused). The warm pool is not counted.",
        {"status"},
    ),
    "twistedgw_pool_size": (
        "gauge",
        "Warm pool size asked for (--pool-size), by template.",
        {"template"},
    ),
    "twistedgw_pool_ready": (
        "gauge",
        "Started, agent-ready pool containers waiting for a create, by template.",
        {"template"},
    ),
    "twistedgw_websocket_clients": ("gauge", "Client WebSocket connections open now.", set()),
    "twistedgw_egress_decisions_total": (
        "counter",
        "Egress proxy decisions on sandbox requests.",
        {"decision", "reason"},
    ),
    "twistedgw_egress_bytes_total": (
        "counter",
        "Bytes the egress proxy carried between sandboxes and allowed destinations.",
        {"direction"},
    ),
}


def heads(text: str) -> dict[str, tuple[str, str]]:
    """``# HELP`` and ``# TYPE`` of each family, ``_created`` gauges left out."""
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            types[name] = kind
    return {name: (types[name], helps[name]) for name in helps if not name.endswith("_created")}


def used_metrics() -> GatewayMetrics:
    """A registry with a sample in every family."""
    metrics = GatewayMetrics()
    metrics.creates.labels(path="pool", outcome="ok").observe(0.2)
    metrics.docker_calls.labels(operation="create").observe(1.0)
    metrics.docker_errors.labels(operation="create", error="other").inc()
    metrics.command_duration.observe(0.01)
    metrics.removed.labels(reason="idle").inc()
    EGRESS_DECISIONS.labels(decision="allowed", reason="listed").inc(0)
    EGRESS_BYTES.labels(direction="up").inc(0)
    metrics.observe(
        sandboxes=lambda: [
            SimpleNamespace(state="connected", paused=False),
            SimpleNamespace(state="idle", paused=True),
            SimpleNamespace(state="idle", paused=False),
            SimpleNamespace(state="idle", paused=False),
        ],
        pool=lambda: {
            "templates": {"python": {"size": 2, "ready": 1}, "default": {"size": 3, "ready": 0}}
        },
        clients=lambda: 4,
    )
    return metrics


def test_every_family_has_its_name_type_and_help() -> None:
    """/metrics lists exactly these families, each with its TYPE and HELP text."""
    exposed = heads(used_metrics().exposition().decode())
    assert exposed == {name: (kind, text) for name, (kind, text, _) in FAMILIES.items()}


def test_every_family_has_its_label_names() -> None:
    """Each family's samples carry exactly its documented labels (histogram ``le`` aside)."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(used_metrics().exposition().decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            base = sample.name
            for suffix in ("_bucket", "_count", "_sum"):
                if family.type == "histogram" and base.endswith(suffix):
                    base = base[: -len(suffix)]
            labels.setdefault(base, set()).update(set(sample.labels) - {"le"})
    assert labels == {name: names for name, (_, _, names) in FAMILIES.items()}


def test_scrape_time_gauges_read_the_observed_objects() -> None:
    """Sandboxes are counted by status (a paused one as ``paused``), the pool per template,
    and the open clients, at scrape time."""
    text = used_metrics().exposition().decode()
    for line in (
        'twistedgw_sandboxes{status="created"} 0.0',
        'twistedgw_sandboxes{status="connected"} 1.0',
        'twistedgw_sandboxes{status="idle"} 2.0',
        'twistedgw_sandboxes{status="paused"} 1.0',
        'twistedgw_pool_size{template="default"} 3.0',
        'twistedgw_pool_size{template="python"} 2.0',
        'twistedgw_pool_ready{template="default"} 0.0',
        'twistedgw_pool_ready{template="python"} 1.0',
        "twistedgw_websocket_clients 4.0",
    ):
        assert line in text.splitlines()
    assert text.index('template="default"') < text.index('template="python"')


def test_unobserved_gauges_are_zero_and_counters_have_baselines() -> None:
    """Before ``observe`` the gauges read zero; command counters have zero series for each
    outcome and mode from the start."""
    lines = GatewayMetrics().exposition().decode().splitlines()
    assert "twistedgw_websocket_clients 0.0" in lines
    assert 'twistedgw_sandboxes{status="idle"} 0.0' in lines
    assert not [line for line in lines if line.startswith("twistedgw_pool_size{")]
    for outcome in ("ok", "failed", "timed_out", "cancelled", "oom", "error"):
        assert f'twistedgw_commands_finished_total{{outcome="{outcome}"}} 0.0' in lines
    for mode in ("foreground", "background"):
        assert f'twistedgw_commands_started_total{{mode="{mode}"}} 0.0' in lines
    for direction in ("to_agent", "to_client"):
        assert f'twistedgw_websocket_bytes_total{{direction="{direction}"}} 0.0' in lines


def test_bound_byte_counters_count_their_direction() -> None:
    """``bytes_to_agent`` and ``bytes_to_client`` are the two directions of one counter."""
    metrics = GatewayMetrics()
    metrics.bytes_to_agent.inc(5)
    metrics.bytes_to_client.inc(7)
    lines = metrics.exposition().decode().splitlines()
    assert 'twistedgw_websocket_bytes_total{direction="to_agent"} 5.0' in lines
    assert 'twistedgw_websocket_bytes_total{direction="to_client"} 7.0' in lines


def test_histogram_buckets() -> None:
    """Each histogram has its own buckets (from a pool create's milliseconds to an hour)."""
    text = used_metrics().exposition().decode()
    for name, buckets in (
        ("twistedgw_sandbox_create_duration_seconds", CREATE_BUCKETS),
        ("twistedgw_docker_call_duration_seconds", DOCKER_BUCKETS),
        ("twistedgw_command_duration_seconds", COMMAND_BUCKETS),
    ):
        found = [
            float(s.labels["le"])
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name + "_bucket"
        ]
        assert found == [*buckets, float("inf")]
    assert CREATE_BUCKETS[0] == 0.025 and CREATE_BUCKETS[-1] == 60.0
    assert DOCKER_BUCKETS[0] == 0.005 and DOCKER_BUCKETS[-1] == 30.0
    assert COMMAND_BUCKETS[0] == 0.005 and COMMAND_BUCKETS[-1] == 3600.0


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RuntimeUnavailable("down"), "unavailable"),
        (ImageMissing("img"), "image_missing"),
        (ContainerFailed("409"), "refused"),
        (ValueError("x"), "other"),
        (None, "other"),
    ],
)
def test_docker_error_kinds(error: BaseException | None, kind: str) -> None:
    """A failed Docker call's ``error`` label says what kind of failure it was."""
    assert docker_error_kind(error) == kind
