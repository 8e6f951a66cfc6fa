"""The gateway's Prometheus metrics (``prometheus_client``).

``GatewayMetrics`` holds one gateway's metrics in a registry of its own (never the global
one), so tests and several gateways in one process do not collide; ``twistd sandboxgw`` makes
one and hands it to the parts that count (the Docker runtime, the sandbox manager, the
WebSocket proxy). Values that are a state rather than a count (sandboxes by status, the warm
pool, WebSocket clients) are read at scrape time from the objects that hold them
(``GatewayMetrics.observe``), so they cannot drift from the truth.

Labels stay low in cardinality: no sandbox ids, owners or host names (those are in the logs).

The egress proxy's counters (issue 17) predate this and live in the default registry
(``EGRESS_DECISIONS``, ``EGRESS_BYTES``); every ``GatewayMetrics`` registry serves them too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from twistedgw.runtime.interface import ContainerFailed, ImageMissing, RuntimeUnavailable

#: Egress proxy decisions, by outcome (``allowed`` or ``refused``) and a short reason.
EGRESS_DECISIONS = Counter(
    "twistedgw_egress_decisions_total",
    "Egress proxy decisions on sandbox requests.",
    ["decision", "reason"],
)

#: Bytes carried by the egress proxy, ``up`` (sandbox to destination) and ``down``.
EGRESS_BYTES = Counter(
    "twistedgw_egress_bytes_total",
    "Bytes the egress proxy carried between sandboxes and allowed destinations.",
    ["direction"],
)

#: The exposition format's content type (text, version 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Sandbox creates take from ~50 ms (pool) to tens of seconds (a cold start on a busy host).
CREATE_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Docker calls: a list is milliseconds, a create or remove about a second.
DOCKER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Commands: from an ``echo`` (a few ms) to the hour --max-timeout allows.
COMMAND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)

#: How a foreground command ended (``outcome`` label of the command metrics).
COMMAND_OUTCOMES = ("ok", "failed", "timed_out", "cancelled", "oom", "error")

# Flags of a result, read from its tail (they follow the possibly huge output and error
# texts). Inside a JSON string every quote is escaped, so these only match the message's
# own keys.
_RETURNCODE = re.compile(rb'"returncode": ?(-?\d+)')
_TRUE_FLAG = re.compile(rb'"(timed_out|cancelled|oom_killed|output_limit_exceeded)": ?true')
_ERROR_TYPE = re.compile(rb'\{"type": ?"error"')
#: Bytes at the end of a result that hold its flags (returncode onwards, ``dropped`` too).
_TAIL = 1024


def command_outcome(payload: bytes) -> str:
    """The outcome of a command from its ``result`` (or ``error``) message, as the agent
    encodes it: ``oom``, ``timed_out``, ``cancelled``, ``ok`` (returncode 0), ``failed``
    (any other returncode, or killed for too much output), or ``error`` (not run)."""
    if _ERROR_TYPE.match(payload, 0, 32):
        return "error"
    tail = payload[-_TAIL:]
    flags = {m.group(1) for m in _TRUE_FLAG.finditer(tail)}
    if b"oom_killed" in flags:
        return "oom"
    if b"timed_out" in flags:
        return "timed_out"
    if b"cancelled" in flags:
        return "cancelled"
    returncodes = _RETURNCODE.findall(tail)
    if returncodes and int(returncodes[-1]) == 0 and b"output_limit_exceeded" not in flags:
        return "ok"
    return "failed"


class _StateCollector:
    """Gauges read at scrape time from the callbacks ``GatewayMetrics.observe`` was given."""

    def __init__(self) -> None:
        self.sandboxes: Callable[[], Iterable[Any]] | None = None
        self.pool: Callable[[], dict[str, Any]] | None = None
        self.clients: Callable[[], int] | None = None

    def describe(self) -> Iterator[Metric]:
        # Described (not collected) at registration: nothing is read before ``observe``.
        yield GaugeMetricFamily("twistedgw_sandboxes", "", labels=["status"])
        yield GaugeMetricFamily("twistedgw_pool_size", "", labels=["template"])
        yield GaugeMetricFamily("twistedgw_pool_ready", "", labels=["template"])
        yield GaugeMetricFamily("twistedgw_websocket_clients", "")

    def collect(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily(
            "twistedgw_sandboxes",
            "Sandboxes this gateway runs, by status (created: no client yet; connected; "
            "idle; paused). The warm pool is not counted.",
            labels=["status"],
        )
        counts = dict.fromkeys(("created", "connected", "idle", "paused"), 0)
        for sandbox in self.sandboxes() if self.sandboxes is not None else ():
            status = "paused" if sandbox.paused else sandbox.state
            counts[status] = counts.get(status, 0) + 1
        for status, count in counts.items():
            by_status.add_metric([status], count)
        yield by_status
        size = GaugeMetricFamily(
            "twistedgw_pool_size",
            "Warm pool size asked for (--pool-size), by template.",
            labels=["template"],
        )
        ready = GaugeMetricFamily(
            "twistedgw_pool_ready",
            "Started, agent-ready pool containers waiting for a create, by template.",
            labels=["template"],
        )
        status = self.pool() if self.pool is not None else {"templates": {}}
        for template, numbers in sorted(status["templates"].items()):
            size.add_metric([template], numbers["size"])
            ready.add_metric([template], numbers["ready"])
        yield size
        yield ready
        clients = GaugeMetricFamily(
            "twistedgw_websocket_clients", "Client WebSocket connections open now."
        )
        clients.add_metric([], self.clients() if self.clients is not None else 0)
        yield clients


class GatewayMetrics:
    """One gateway's metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.creates = Histogram(
            "twistedgw_sandbox_create_duration_seconds",
            "Sandbox creates: seconds until the sandbox's agent answered (or the create "
            "failed), by path (pool: a warm container handed out; cold: a new container) and "
            "outcome (ok, refused: over --max-sandboxes, failed).",
            ["path", "outcome"],
            buckets=CREATE_BUCKETS,
            registry=registry,
        )
        self.docker_calls = Histogram(
            "twistedgw_docker_call_duration_seconds",
            "Docker engine calls (queue wait in the Docker thread pool included), by operation.",
            ["operation"],
            buckets=DOCKER_BUCKETS,
            registry=registry,
        )
        self.docker_errors = Counter(
            "twistedgw_docker_call_errors_total",
            "Docker engine calls that failed, by operation and error (unavailable: engine "
            "unreachable or too slow; refused: an API error; image_missing; other).",
            ["operation", "error"],
            registry=registry,
        )
        self.commands_started = Counter(
            "twistedgw_commands_started_total",
            "Commands clients sent to sandboxes, by mode (foreground or background).",
            ["mode"],
            registry=registry,
        )
        self.commands_finished = Counter(
            "twistedgw_commands_finished_total",
            "Foreground commands whose result (or error reply) reached the gateway, by "
            "outcome: " + ", ".join(COMMAND_OUTCOMES) + ".",
            ["outcome"],
            registry=registry,
        )
        self.command_duration = Histogram(
            "twistedgw_command_duration_seconds",
            "Foreground commands: seconds from the gateway forwarding the command to the "
            "agent until its result came back.",
            buckets=COMMAND_BUCKETS,
            registry=registry,
        )
        self.streamed_bytes = Counter(
            "twistedgw_websocket_bytes_total",
            "Bytes of WebSocket messages the proxy carried, by direction (to_agent: client "
            "messages; to_client: agent messages, output and results).",
            ["direction"],
            registry=registry,
        )
        self.removed = Counter(
            "twistedgw_sandboxes_removed_total",
            "Sandboxes removed, by reason (deleted: by a client; idle, lifetime: reaped; "
            "exited and others: the container went away by itself).",
            ["reason"],
            registry=registry,
        )
        self.agent_connect_failures = Counter(
            "twistedgw_agent_connect_failures_total",
            "Connections to a sandbox's agent that failed (the client or file route then "
            "waits for the agent to come back, or gets an error).",
            registry=registry,
        )
        self._state = _StateCollector()
        registry.register(self._state)
        registry.register(EGRESS_DECISIONS)
        registry.register(EGRESS_BYTES)
        # Zero series from the start, so rate() has a baseline before the first event.
        for outcome in COMMAND_OUTCOMES:
            self.commands_finished.labels(outcome=outcome)
        for mode in ("foreground", "background"):
            self.commands_started.labels(mode=mode)
        #: The byte counters, bound once: they move on every proxied message.
        self.bytes_to_agent = self.streamed_bytes.labels(direction="to_agent")
        self.bytes_to_client = self.streamed_bytes.labels(direction="to_client")

    def observe(
        self,
        sandboxes: Callable[[], Iterable[Any]] | None = None,
        pool: Callable[[], dict[str, Any]] | None = None,
        clients: Callable[[], int] | None = None,
    ) -> None:
        """Where the scrape-time gauges read from: the registered sandboxes (each with
        ``state`` and ``paused``), the warm pool's status and the open WebSocket clients."""
        if sandboxes is not None:
            self._state.sandboxes = sandboxes
        if pool is not None:
            self._state.pool = pool
        if clients is not None:
            self._state.clients = clients

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


def docker_error_kind(error: BaseException | None) -> str:
    """The ``error`` label of a failed Docker call."""
    if isinstance(error, RuntimeUnavailable):
        return "unavailable"
    if isinstance(error, ImageMissing):
        return "image_missing"
    if isinstance(error, ContainerFailed):
        return "refused"
    return "other"
