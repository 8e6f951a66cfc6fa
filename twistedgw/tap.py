"""twistd plugin wiring: ``Options`` and ``makeService`` (``twistd -n sandboxgw ...``).

``Options`` parses and checks the command line; ``twistedgw.config.GatewayConfig`` holds the
result; ``makeService`` only connects the parts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from twistedgw.config import GatewayConfig, agent_message_limit, is_loopback, listen_interface
from twistedgw.egress.policy import EgressPolicy, parse_cidrs, parse_patterns
from twistedgw.egress.proxy import connect_tcp, loopback_only
from twistedgw.egress.resolver import HostsResolver, resolver_from_environ
from twistedgw.egress.service import EgressProxies
from twistedgw.lease import ClusterLease, new_holder_id
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy
from twistedgw.lifecycle.resources import DEFAULT_MAXIMA, ResourcePolicy
from twistedgw.lifecycle.templates import (
    DEFAULT_TEMPLATE,
    TemplateCatalog,
    parse_pool_option,
    parse_template_option,
)
from twistedgw.logging import LOG_FORMATS, JsonLogObserver, LoggingRoot
from twistedgw.metrics import GatewayMetrics
from twistedgw.protocol import Limits
from twistedgw.proxy.agent import WebSocketAgents
from twistedgw.proxy.client import ProxyFactory, make_ws_resource
from twistedgw.proxy.files import AgentFiles
from twistedgw.proxy.ports import DEFAULT_PREVIEW_PORTS, URLSigner, load_key, parse_ports
from twistedgw.reaper import Reaper, make_reaper_service
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.docker import DockerRuntime
from twistedgw.runtime.hardening import AGENT_PORT, EGRESS_PORT, ContainerLimits, size_bytes
from twistedgw.runtime.swarm import SwarmRuntime
from twistedgw.sandbox import Resources
from twistedgw.service import ProxyService, ShutdownSignals
from twistedgw.snapshots import SnapshotStore
from twistedgw.state import ClusterState, StateFile
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator, read_tokens
from twistedgw.web.cluster import ClusterLookup
from twistedgw.web.events import SandboxEvents
from twistedgw.web.files import FileRoutes
from twistedgw.web.previews import PreviewRoutes
from twistedgw.web.site import (
    EdgePolicy,
    default_hosts,
    fit_descriptors,
    make_site,
    metrics_site,
)

__all__ = ["Options", "agent_message_limit", "edge_policy", "makeService"]

DEFAULT_IMAGE = "sandbox-websocket-image"
_log = Logger()


def _number(name: str, kind: type, allow_zero: bool, doc: str) -> Any:
    """A usage.Options coercer: a finite number of ``kind``, > 0 (or >= 0)."""

    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, not {value!r}") from None
        low_ok = number >= 0 if allow_zero else number > 0
        if not low_ok or number == float("inf"):
            raise ValueError(f"{name} must be {'0 or more' if allow_zero else 'greater than 0'}")
        return number

    coerce.coerceDoc = doc  # type: ignore[attr-defined]
    return coerce


def _positive_float(name: str) -> Any:
    return _number(name, float, False, "A number of seconds, greater than 0.")


def _non_negative_float(name: str) -> Any:
    return _number(name, float, True, "A number of seconds; 0 means none.")


def _positive_int(name: str) -> Any:
    return _number(name, int, False, "An integer greater than 0.")


def _non_negative_int(name: str) -> Any:
    return _number(name, int, True, "An integer, 0 or more.")


class Options(usage.Options):
    """Command-line options of ``twistd sandboxgw``."""

    synopsis = "[options]"
    longdesc = (
        "Sandbox gateway: creates Docker containers as sandboxes (REST on /sandboxes) and "
        "proxies WebSocket command messages to them (/ws/{sandbox_id})."
    )

    optFlags = [
        [
            "writable-root",
            None,
            "Give sandboxes a writable root filesystem (default: read-only "
            "root with sized tmpfs for /home/sandbox, /tmp and /var/tmp).",
        ],
        [
            "insecure-no-auth",
            None,
            "Allow listening beyond loopback without API tokens (anyone who reaches the port "
            "drives the gateway). Without tokens and without this flag the gateway listens on "
            "127.0.0.1 only.",
        ],
    ]

    optParameters = [
        ["port", "p", "tcp:8003", "Listening endpoint string, or a bare port number."],
        ["image", "i", DEFAULT_IMAGE, "Docker image for sandboxes."],
        [
            "idle-timeout",
            None,
            3600.0,
            "Seconds without clients or commands before a sandbox is reaped.",
            _positive_float("--idle-timeout"),
        ],
        [
            "max-idle-timeout",
            None,
            86400.0,
            "Largest 'idle_timeout' a creator may ask for, in seconds.",
            _positive_float("--max-idle-timeout"),
        ],
        [
            "default-lifetime",
            None,
            0.0,
            "Seconds a sandbox lives when its creator sets no 'max_lifetime' (0: no limit).",
            _non_negative_float("--default-lifetime"),
        ],
        [
            "max-lifetime",
            None,
            0.0,
            "Largest 'max_lifetime' (and keepalive 'extend_by') allowed, in seconds (0: no cap).",
            _non_negative_float("--max-lifetime"),
        ],
        [
            "max-sandboxes",
            None,
            200,
            "Most sandboxes this gateway runs at once; creates beyond it get 429.",
            _positive_int("--max-sandboxes"),
        ],
        ["memory", None, "1g", "Memory limit per sandbox (swap: none beyond it)."],
        [
            "cpus",
            None,
            1.0,
            "CPUs per sandbox (fractions allowed).",
            _positive_float("--cpus"),
        ],
        ["pids-limit", None, 256, "Processes per sandbox.", _positive_int("--pids-limit")],
        ["nofile", None, 1024, "Open files per process in a sandbox.", _positive_int("--nofile")],
        ["home-size", None, "256m", "Size of the writable /home/sandbox (tmpfs)."],
        [
            "max-cpus",
            None,
            None,
            "Most 'cpus' a creator may ask for (default: --cpus)",
            _number("--max-cpus", float, False, "A number of CPUs, greater than 0."),
        ],
        [
            "max-memory",
            None,
            None,
            "Most memory a creator ('memory') or a template's label may ask for "
            "(default: 2g, or --memory if larger).",
        ],
        [
            "max-disk",
            None,
            None,
            "Largest home (and /tmp) tmpfs a creator ('disk') or a template's label may ask "
            "for (default: 1g, or --home-size if larger).",
        ],
        [
            "egress-allow",
            None,
            "",
            "Server-wide egress allow-list (host[:port] and *.domain[:port] patterns, comma "
            "separated) that creators' 'egress' lists must lie within (default: any name).",
        ],
        [
            "egress-max",
            None,
            32,
            "Most egress patterns per sandbox.",
            _positive_int("--egress-max"),
        ],
        [
            "egress-allow-cidr",
            None,
            "",
            "Address ranges (comma separated) the egress proxy may connect to although they "
            "are loopback, link-local, private or multicast (default: none).",
        ],
        ["tmp-size", None, "128m", "Size of each of /tmp and /var/tmp (tmpfs)."],
        ["container-runtime", None, None, "OCI runtime for sandboxes, e.g. runsc (gVisor)."],
        [
            "tokens-file",
            None,
            None,
            "File of API tokens, one per line; also read from $TWISTEDGW_TOKENS (comma "
            "separated). Without any token the gateway is open to anyone who reaches it.",
        ],
        [
            "state-dir",
            None,
            None,
            "Directory for the state file (last activity, lifetimes) "
            "[default: $XDG_STATE_HOME/twistedgw or ~/.local/state/twistedgw].",
        ],
        [
            "reap-interval",
            None,
            60.0,
            "Seconds between idle sweeps (each also reconciles with Docker).",
            _positive_float("--reap-interval"),
        ],
        [
            "docker-threads",
            None,
            8,
            "Size of the dedicated docker SDK thread pool.",
            _positive_int("--docker-threads"),
        ],
        [
            "docker-timeout",
            None,
            30.0,
            "Seconds before a Docker call is given up as failed.",
            _positive_float("--docker-timeout"),
        ],
        ["docker-url", None, None, "Docker engine URL (default: from DOCKER_HOST, like the CLI)."],
        [
            "backend",
            None,
            "docker",
            "Where sandboxes run: docker (containers of one engine, state in a local file) or "
            "swarm (Swarm services; state in the cluster; --docker-url names a manager).",
        ],
        [
            "instance",
            None,
            "default",
            "Label value naming this gateway; it only manages containers carrying it.",
        ],
        [
            "agent-ready-timeout",
            None,
            30.0,
            "Seconds a new sandbox's agent has to become ready.",
            _positive_float("--agent-ready-timeout"),
        ],
        [
            "max-message-size",
            None,
            16 * 1024 * 1024,
            "Largest WebSocket message accepted, in bytes (close code 1009 beyond it).",
            _positive_int("--max-message-size"),
        ],
        [
            "default-timeout",
            None,
            900.0,
            "Seconds a command may run when the client sets no 'timeout'.",
            _positive_float("--default-timeout"),
        ],
        [
            "max-timeout",
            None,
            3600.0,
            "Largest 'timeout' a client may ask for, in seconds.",
            _positive_float("--max-timeout"),
        ],
        [
            "max-output",
            None,
            1024 * 1024,
            "Bytes of stdout and of stderr kept per command result (head and tail).",
            _positive_int("--max-output"),
        ],
        [
            "output-kill-limit",
            None,
            64 * 1024 * 1024,
            "Bytes on one stream after which a non-streamed command is killed.",
            _positive_int("--output-kill-limit"),
        ],
        [
            "result-retention",
            None,
            900.0,
            "Seconds a finished command's result and output log are kept for 'attach'.",
            _positive_float("--result-retention"),
        ],
        [
            "process-log-size",
            None,
            2 * 1024 * 1024,
            "Bytes of each output stream kept per process for 'attach' (oldest dropped).",
            _positive_int("--process-log-size"),
        ],
        [
            "max-background",
            None,
            32,
            "Background processes a sandbox may run at once ('too_many_commands' beyond).",
            _positive_int("--max-background"),
        ],
        [
            "open-handshake-timeout",
            None,
            10.0,
            "Seconds a client has to complete the WebSocket opening handshake.",
            _positive_float("--open-handshake-timeout"),
        ],
        [
            "max-connections",
            None,
            1000,
            "Most WebSocket clients at once; handshakes beyond it get HTTP 503.",
            _positive_int("--max-connections"),
        ],
        [
            "max-http-connections",
            None,
            1000,
            "Most plain HTTP connections at once (WebSockets count against --max-connections); "
            "connections beyond it get HTTP 503.",
            _positive_int("--max-http-connections"),
        ],
        [
            "body-timeout",
            None,
            30.0,
            "Seconds a client has to send a request body once its headers are in (HTTP 408).",
            _positive_float("--body-timeout"),
        ],
        [
            "allowed-hosts",
            None,
            "",
            "Extra Host names the gateway answers to, comma separated (besides loopback names "
            "and, when bound to all interfaces, IP addresses and this machine's names).",
        ],
        [
            "allowed-origins",
            None,
            "",
            "Browser origins (scheme://host[:port]) allowed besides the gateway's own, comma "
            "separated.",
        ],
        [
            "preview-ports",
            None,
            DEFAULT_PREVIEW_PORTS,
            "Ports of a sandbox that /sandboxes/{id}/ports/{port}/ and signed preview URLs "
            "may reach: a comma list of ports and ranges (like 3000,8000-8999). The agent's "
            f"port {AGENT_PORT} and the egress port {EGRESS_PORT} never are.",
        ],
        [
            "max-upload",
            None,
            1024 * 1024 * 1024,
            "Largest file or tar upload (PUT .../files, .../files/archive), in bytes (413 beyond).",
            _positive_int("--max-upload"),
        ],
        [
            "paused-timeout",
            None,
            86400.0,
            "Seconds a paused sandbox is kept before it is reaped (instead of its idle timeout).",
            _positive_float("--paused-timeout"),
        ],
        [
            "snapshot-dir",
            None,
            None,
            "Directory for sandbox snapshots (POST /sandboxes/{id}/snapshots) "
            "[default: snapshots/<instance> beside the state file].",
        ],
        [
            "log-format",
            None,
            "text",
            "Log lines as twistd's text ('text') or one JSON object per line on stdout "
            "('json': time, level, namespace, message, sandbox_id, request_id, owner, ...).",
        ],
        [
            "metrics-port",
            None,
            None,
            "Serve GET /metrics on this loopback-only endpoint (a port number or endpoint "
            "string), without a token, instead of on --port (where it needs a token when "
            "tokens are configured).",
        ],
        [
            "ping-interval",
            None,
            30.0,
            "Seconds between WebSocket pings to clients (dead peers are dropped).",
            _positive_float("--ping-interval"),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["templates"] = {}
        self["pool-sizes"] = {}

    def opt_template(self, value: str) -> None:
        # usage.Options shows the docstring as the option's help: one line each.
        """NAME=IMAGE: a template to choose per create (repeatable; default: --image)."""
        try:
            name, image = parse_template_option(value)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["templates"][name] = image

    def opt_pool_size(self, value: str) -> None:
        """Warm pool of started containers: N (default template) or NAME=N [default: 0]."""
        try:
            name, count = parse_pool_option(value)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["pool-sizes"][name] = count

    def postOptions(self) -> None:
        port = str(self["port"]).strip()
        if port.isdigit():
            if not 0 <= int(port) <= 65535:
                raise usage.UsageError(f"--port {port} is not a TCP port number")
            port = f"tcp:{port}"
        self["port"] = port
        if self["backend"] not in ("docker", "swarm"):
            raise usage.UsageError("--backend must be docker or swarm")
        if self["backend"] == "swarm" and self["pool-sizes"] and any(self["pool-sizes"].values()):
            raise usage.UsageError("--pool-size: the swarm backend has no warm pool yet")
        if not self["image"]:
            raise usage.UsageError("--image must not be empty")
        if self["idle-timeout"] > self["max-idle-timeout"]:
            raise usage.UsageError("--idle-timeout must not exceed --max-idle-timeout")
        if self["max-lifetime"] and self["default-lifetime"] > self["max-lifetime"]:
            raise usage.UsageError("--default-lifetime must not exceed --max-lifetime")
        if self["default-timeout"] > self["max-timeout"]:
            raise usage.UsageError("--default-timeout must not exceed --max-timeout")
        if self["output-kill-limit"] < self["max-output"]:
            raise usage.UsageError("--output-kill-limit must be at least --max-output")
        known = {DEFAULT_TEMPLATE, *self["templates"]}
        for name in self["pool-sizes"]:
            if name not in known:
                raise usage.UsageError(
                    f"--pool-size {name}=N: no such template (known: {', '.join(sorted(known))})"
                )
        self["pool-size"] = self["pool-sizes"].get(DEFAULT_TEMPLATE, 0)
        for name in ("memory", "home-size", "tmp-size"):
            if not re.fullmatch(r"[1-9][0-9]*[bkmg]?", str(self[name]).lower()):
                raise usage.UsageError(f"--{name} must be a size like 512m or 2g")
        try:
            tokens_file = Path(self["tokens-file"]) if self["tokens-file"] else None
            self["tokens"] = read_tokens(tokens_file)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"cannot use the API tokens: {e}") from None
        self["port"] = secure_port(self["port"], bool(self["tokens"]), self["insecure-no-auth"])
        self._check_egress_and_resources()
        try:
            self["preview-port-set"] = parse_ports(str(self["preview-ports"]))
        except ValueError as e:
            raise usage.UsageError(f"--preview-ports: {e}") from None
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of: {', '.join(LOG_FORMATS)}")
        if self["metrics-port"] is not None:
            self["metrics-port"] = loopback_port(str(self["metrics-port"]), "--metrics-port")
        instance = self["instance"]
        if not instance or not all(c.isalnum() or c in "-_." for c in instance):
            raise usage.UsageError("--instance may hold only letters, digits, '-', '_' and '.'")

    def _check_egress_and_resources(self) -> None:
        """``--egress-*`` and ``--max-cpus/--max-memory/--max-disk``: the one set of maxima
        for creators' resources and templates' label defaults alike."""
        try:
            allow = parse_patterns(_listed(self["egress-allow"])) or None
            cidrs = parse_cidrs(_listed(self["egress-allow-cidr"]))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["egress-policy"] = EgressPolicy(
            allow=allow, max_patterns=self["egress-max"], allow_cidrs=cidrs
        )
        for name in ("max-memory", "max-disk"):
            value = self[name]
            if value is not None and not re.fullmatch(r"[1-9][0-9]*[bkmg]?", str(value).lower()):
                raise usage.UsageError(f"--{name} must be a size like 512m or 2g")
        defaults = Resources(
            cpus=self["cpus"],
            memory=size_bytes(self["memory"]),
            disk=size_bytes(self["home-size"]),
        )
        # Unset, the maxima leave room for the python template's labels (home 1g, memory 2g),
        # and never fall below the server's own defaults.
        maxima = Resources(
            cpus=self["max-cpus"] or defaults.cpus,
            memory=size_bytes(self["max-memory"] or max(defaults.memory, DEFAULT_MAXIMA.memory)),
            disk=size_bytes(self["max-disk"] or max(defaults.disk, DEFAULT_MAXIMA.disk)),
        )
        if defaults.cpus > maxima.cpus:
            raise usage.UsageError("--cpus must not exceed --max-cpus")
        if defaults.memory > maxima.memory:
            raise usage.UsageError("--memory must not exceed --max-memory")
        if defaults.disk > maxima.disk:
            raise usage.UsageError("--home-size must not exceed --max-disk")
        if size_bytes(self["tmp-size"]) > maxima.disk:
            raise usage.UsageError("--tmp-size must not exceed --max-disk")
        self["resource-policy"] = ResourcePolicy(defaults=defaults, maxima=maxima)


def secure_port(port: str, have_tokens: bool, insecure_no_auth: bool) -> str:
    """The listening endpoint, secure by default: without tokens, a TCP or TLS endpoint that
    names no interface listens on loopback only, and one that names another interface is a
    ``UsageError`` unless ``--insecure-no-auth``."""
    kind = port.split(":", 1)[0]
    if have_tokens or insecure_no_auth or kind not in ("tcp", "tcp6", "ssl"):
        return port
    interface = listen_interface(port)
    if interface is None:
        return port + (r":interface=\:\:1" if kind == "tcp6" else ":interface=127.0.0.1")
    if not is_loopback(interface):
        raise usage.UsageError(
            f"listening on {interface} without API tokens needs --insecure-no-auth "
            "(or give tokens with --tokens-file or $TWISTEDGW_TOKENS)"
        )
    return port


def loopback_port(port: str, name: str) -> str:
    """A listening endpoint on loopback only: a bare number or an endpoint naming no
    interface gets 127.0.0.1; another interface is a ``UsageError``."""
    port = port.strip()
    if port.isdigit():
        if not 0 <= int(port) <= 65535:
            raise usage.UsageError(f"{name} {port} is not a TCP port number")
        port = f"tcp:{port}"
    kind = port.split(":", 1)[0]
    if kind == "unix":
        return port
    if kind not in ("tcp", "tcp6"):
        raise usage.UsageError(f"{name} must be a port number or a tcp/tcp6/unix endpoint")
    interface = listen_interface(port)
    if interface is None:
        return port + (r":interface=\:\:1" if kind == "tcp6" else ":interface=127.0.0.1")
    if not is_loopback(interface):
        raise usage.UsageError(f"{name} listens on loopback only, not on {interface}")
    return port


def _listed(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def makeService(options: Options) -> IService:
    """Wire the gateway: docker runtime, sandbox manager, reaper, WebSocket proxy, HTTP site."""
    from twisted.internet import reactor

    config = GatewayConfig.from_options(options)
    root = LoggingRoot(JsonLogObserver() if config.log_format == "json" else None)
    metrics = GatewayMetrics()

    limits = ContainerLimits(
        memory=config.memory,
        cpus=config.cpus,
        pids=config.pids_limit,
        nofile=config.nofile,
        read_only_root=not config.writable_root,
        home_size=config.home_size,
        tmp_size=config.tmp_size,
        runtime=config.container_runtime,
    )
    runtime_class = SwarmRuntime if config.backend == "swarm" else DockerRuntime
    runtime = runtime_class(
        reactor,
        image=config.image,
        instance=config.instance,
        docker_url=config.docker_url,
        threads=config.docker_threads,
        call_timeout=config.docker_timeout,
        socket_dir=config.socket_dir,
        limits=limits,
        metrics=metrics,
        agent_env={
            "AGENT_MAX_OUTPUT": str(config.max_output),
            "AGENT_KILL_OUTPUT": str(config.output_kill_limit),
            "AGENT_DEFAULT_TIMEOUT": str(config.default_timeout),
            "AGENT_MAX_TIMEOUT": str(config.max_timeout),
            "AGENT_RESULT_RETENTION": str(config.result_retention),
            "AGENT_LOG_SIZE": str(config.process_log_size),
            "AGENT_MAX_BACKGROUND": str(config.max_background),
        },
    )
    runtime.setName("docker-runtime")
    runtime.setServiceParent(root)

    policy = LifecyclePolicy(
        idle_timeout=config.idle_timeout,
        max_idle_timeout=config.max_idle_timeout,
        default_lifetime=config.default_lifetime,
        max_lifetime=config.max_lifetime,
        max_sandboxes=config.max_sandboxes,
        egress=config.egress,
        resources=config.resources,
        templates=(DEFAULT_TEMPLATE, *sorted(config.templates)),
    )
    templates = TemplateCatalog(
        {DEFAULT_TEMPLATE: config.image, **config.templates},
        base=limits,
        maxima=config.resources.maxima,
    )
    registry = SandboxRegistry()
    resolver = resolver_from_environ(reactor)
    # A gateway under test (a .test name table) connects to loopback only, whatever happens.
    guard = loopback_only(connect_tcp(reactor)) if isinstance(resolver, HostsResolver) else None
    egress = EgressProxies(reactor, config.egress, resolver, connect=guard)
    egress.setName("egress-proxies")
    egress.setServiceParent(root)
    registry.watch(egress.sandbox_added, egress.sandbox_removed)
    manager = SandboxManager(
        registry,
        runtime,
        reactor,
        policy=policy,
        # Swarm: no gateway-local state; it lives in service labels (twistedgw.state).
        state=(
            ClusterState(runtime, reactor)
            if isinstance(runtime, SwarmRuntime)
            else StateFile(config.state_file, reactor)
        ),
        pool_sizes=config.pool_sizes,
        templates=templates,
        agent_ready_timeout=config.agent_ready_timeout,
        max_message_size=config.agent_message_limit,
        agents=WebSocketAgents(reactor),
        paused_timeout=config.paused_timeout,
        metrics=metrics,
    )
    manager.setName("sandbox-manager")
    manager.setServiceParent(root)

    events = SandboxEvents()
    lease = None
    if isinstance(runtime, SwarmRuntime):
        # Each sandbox reaped once, whichever gateways serve it (twistedgw.lease).
        lease = ClusterLease(
            runtime, reactor, new_holder_id(), ttl=max(60.0, 4 * config.reap_interval)
        )
    reaper = Reaper(manager, events, warn_before=max(60.0, 2 * config.reap_interval), lease=lease)
    make_reaper_service(reaper, config.reap_interval, reactor).setServiceParent(root)

    authenticator = Authenticator.from_tokens(config.tokens)
    if not authenticator.enabled and not config.listens_on_loopback_only:
        _log.warn(
            "no API tokens configured and listening on {port}: anyone who can reach this port "
            "can create sandboxes and run commands in them (see --tokens-file)",
            port=config.port,
        )
    factory = ProxyFactory(
        manager,
        reactor,
        authenticator=authenticator,
        policy=Limits(config.default_timeout, config.max_timeout),
        maxMessagePayloadSize=config.max_message_size,
        maxFramePayloadSize=config.max_message_size,
        openHandshakeTimeout=config.open_handshake_timeout,
        autoPingInterval=config.ping_interval,
        autoPingTimeout=config.ping_interval,
        maxConnections=config.max_connections,
        tcpNoDelay=True,
        metrics=metrics,
    )
    ProxyService(factory, reactor).setServiceParent(root)
    ShutdownSignals(reactor).setServiceParent(root)

    files = FileRoutes(manager, authenticator, AgentFiles(reactor), max_upload=config.max_upload)
    snapshots = SnapshotStore(config.snapshot_dir, files.files, reactor)
    try:
        key = load_key(config.preview_key_file)
    except (OSError, ValueError) as e:
        raise usage.UsageError(f"cannot use the preview key: {e}") from None
    previews = PreviewRoutes(
        manager,
        authenticator,
        URLSigner(key, reactor.seconds),
        reactor,
        ports=config.preview_ports,
    )
    api = GatewayAPI(
        manager,
        make_ws_resource(factory),
        authenticator,
        events,
        clock=reactor,
        files=files,
        snapshots=snapshots,
        previews=previews,
        metrics=metrics,
        serve_metrics=config.metrics_port is None,
    )
    if config.metrics_port is not None:
        scrape = StreamServerEndpointService(
            serverFromString(reactor, config.metrics_port), metrics_site(metrics)
        )
        scrape.setName("metrics")
        scrape.setServiceParent(root)
    endpoint = serverFromString(reactor, config.port)
    site = make_site(api, policy=edge_policy(config, authenticator))
    if isinstance(runtime, SwarmRuntime):
        # Sandboxes another gateway created are looked up in the cluster, not 404.
        site.resource = ClusterLookup(site.resource, manager, reactor)
    web = StreamServerEndpointService(endpoint, site)
    web.setName("http")
    web.setServiceParent(root)
    return root


def edge_policy(config: GatewayConfig, authenticator: Authenticator | None = None) -> EdgePolicy:
    """The HTTP edge's limits and allowed hosts and origins, from the configuration."""
    hosts, any_ip = default_hosts(listen_interface(config.port), config.allowed_hosts)
    return EdgePolicy(
        authenticator=authenticator or Authenticator.from_tokens(config.tokens),
        allowed_hosts=hosts,
        any_ip_host=any_ip,
        allowed_origins=config.allowed_origins,
        header_timeout=config.open_handshake_timeout,
        body_timeout=config.body_timeout,
        max_connections=fit_descriptors(config.max_http_connections, config.max_connections),
    )
