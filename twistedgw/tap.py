"""twistd plugin wiring: ``Options`` and ``makeService`` (``twistd -n sandboxgw ...``)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage

from twistedgw.api import GatewayAPI, make_site
from twistedgw.auth import Authenticator, read_tokens
from twistedgw.manager import LifecyclePolicy, SandboxManager
from twistedgw.protocol import Limits
from twistedgw.proxy import CLOSE_GOING_AWAY, ProxyFactory, make_ws_resource
from twistedgw.reaper import Reaper, make_reaper_service
from twistedgw.runtime import ContainerLimits, DockerRuntime
from twistedgw.sandbox import SandboxRegistry
from twistedgw.state import StateFile

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
            "pool-size",
            None,
            0,
            "Warm pool: started, agent-ready containers kept for instant creates.",
            _non_negative_int("--pool-size"),
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
            "ping-interval",
            None,
            30.0,
            "Seconds between WebSocket pings to clients (dead peers are dropped).",
            _positive_float("--ping-interval"),
        ],
    ]

    def postOptions(self) -> None:
        port = str(self["port"]).strip()
        if port.isdigit():
            if not 0 <= int(port) <= 65535:
                raise usage.UsageError(f"--port {port} is not a TCP port number")
            port = f"tcp:{port}"
        self["port"] = port
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
        for name in ("memory", "home-size", "tmp-size"):
            if not re.fullmatch(r"[1-9][0-9]*[bkmg]?", str(self[name]).lower()):
                raise usage.UsageError(f"--{name} must be a size like 512m or 2g")
        try:
            tokens_file = Path(self["tokens-file"]) if self["tokens-file"] else None
            self["tokens"] = read_tokens(tokens_file)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"cannot use the API tokens: {e}") from None
        instance = self["instance"]
        if not instance or not all(c.isalnum() or c in "-_." for c in instance):
            raise usage.UsageError("--instance may hold only letters, digits, '-', '_' and '.'")


def agent_message_limit(max_message_size: int, max_output: int) -> int:
    """Largest message accepted from an agent.

    A result carries up to ``max_output`` bytes of stdout and of stderr, and JSON may spell a
    byte as six characters (``\\u0000``), so the agent leg admits that much, and never less
    than what clients may send.
    """
    return max(max_message_size, 2 * 6 * max_output + 64 * 1024)


def state_path(options: Options) -> Path:
    """Where this instance keeps its state file."""
    if options["state-dir"]:
        base = Path(options["state-dir"])
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".local" / "state") / "twistedgw"
    return base / f"{options['instance']}.json"


def makeService(options: Options) -> IService:
    """Wire the gateway: docker runtime, sandbox manager, reaper, WebSocket proxy, HTTP site."""
    from twisted.internet import reactor

    root = MultiService()

    runtime = DockerRuntime(
        reactor,
        image=options["image"],
        instance=options["instance"],
        docker_url=options["docker-url"],
        threads=options["docker-threads"],
        call_timeout=options["docker-timeout"],
        socket_dir=state_path(options).parent / "sockets" / options["instance"],
        limits=ContainerLimits(
            memory=options["memory"],
            cpus=options["cpus"],
            pids=options["pids-limit"],
            nofile=options["nofile"],
            read_only_root=not options["writable-root"],
            home_size=options["home-size"],
            tmp_size=options["tmp-size"],
            runtime=options["container-runtime"],
        ),
        agent_env={
            "AGENT_MAX_OUTPUT": str(options["max-output"]),
            "AGENT_KILL_OUTPUT": str(options["output-kill-limit"]),
            "AGENT_DEFAULT_TIMEOUT": str(options["default-timeout"]),
            "AGENT_MAX_TIMEOUT": str(options["max-timeout"]),
        },
    )
    runtime.setName("docker-runtime")
    runtime.setServiceParent(root)

    policy = LifecyclePolicy(
        idle_timeout=options["idle-timeout"],
        max_idle_timeout=options["max-idle-timeout"],
        default_lifetime=options["default-lifetime"] or None,
        max_lifetime=options["max-lifetime"] or None,
        max_sandboxes=options["max-sandboxes"],
    )
    manager = SandboxManager(
        SandboxRegistry(),
        runtime,
        reactor,
        policy=policy,
        state=StateFile(state_path(options), reactor),
        pool_size=options["pool-size"],
        agent_ready_timeout=options["agent-ready-timeout"],
        max_message_size=agent_message_limit(options["max-message-size"], options["max-output"]),
    )
    manager.setName("sandbox-manager")
    manager.setServiceParent(root)

    reaper = Reaper(manager)
    make_reaper_service(reaper, options["reap-interval"], reactor).setServiceParent(root)

    authenticator = Authenticator.from_tokens(options["tokens"])
    if (
        not authenticator.enabled
        and "127.0.0.1" not in options["port"]
        and "::1" not in options["port"]
    ):
        _log.warn(
            "no API tokens configured and listening on {port}: anyone who can reach this port "
            "can create sandboxes and run commands in them (see --tokens-file)",
            port=options["port"],
        )
    factory = ProxyFactory(
        manager,
        reactor,
        authenticator=authenticator,
        policy=Limits(options["default-timeout"], options["max-timeout"]),
        maxMessagePayloadSize=options["max-message-size"],
        maxFramePayloadSize=options["max-message-size"],
        openHandshakeTimeout=options["open-handshake-timeout"],
        autoPingInterval=options["ping-interval"],
        autoPingTimeout=options["ping-interval"],
        maxConnections=options["max-connections"],
        tcpNoDelay=True,
    )
    ProxyService(factory, reactor).setServiceParent(root)
    ShutdownSignals(reactor).setServiceParent(root)

    api = GatewayAPI(manager, make_ws_resource(factory), authenticator)
    endpoint = serverFromString(reactor, options["port"])
    web = StreamServerEndpointService(
        endpoint, make_site(api, header_timeout=options["open-handshake-timeout"])
    )
    web.setName("http")
    web.setServiceParent(root)
    return root


class ProxyService(Service):
    """Starts the WebSocket factory (``Site`` does not); on shutdown closes every client with
    1001 (going away) and waits, boundedly, for the closing handshakes."""

    def __init__(self, factory: ProxyFactory, clock: Any, close_timeout: float = 3.0) -> None:
        self.factory = factory
        self._clock = clock
        self._close_timeout = close_timeout

    def startService(self) -> None:
        super().startService()
        self.factory.doStart()

    async def _stop(self) -> None:
        self.factory.close_all(CLOSE_GOING_AWAY, "gateway shutting down")
        deadline = self._clock.seconds() + self._close_timeout
        while self.factory.clients and self._clock.seconds() < deadline:
            await deferLater(self._clock, 0.05, lambda: None)
        self.factory.doStop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


class ShutdownSignals(Service):
    """SIGTERM and SIGINT stop the gateway cleanly and exit 0.

    twistd's own handlers stop the reactor too, but then re-raise the signal at exit, so a
    clean, complete shutdown would look like a kill to supervisors and scripts.
    """

    _log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        # After reactor start-up, which is when twistd installs its handlers.
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self._log.info("received {signal}, shutting down", signal=signal.Signals(signum).name)
        self._reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # a second signal while already stopping
