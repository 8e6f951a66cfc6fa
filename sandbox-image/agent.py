#!/usr/bin/env python3
"""twistedgw sandbox agent: runs shell commands for the gateway over a WebSocket.

Runs inside the sandbox container (as the unprivileged ``sandbox`` user, under tini) and
serves, on TCP ``0.0.0.0:$AGENT_PORT`` (default 8765):

* ``GET /healthz``  -> ``200 ok`` (no auth), for readiness probes;
* ``/agent``        -> a WebSocket.  The opening handshake must carry
  ``Authorization: Bearer $SANDBOX_AGENT_SECRET``, else it is refused with HTTP 401.

Every WebSocket text message is a JSON object ``{"request_id": str, "command": str}``.  The
command runs as ``bash -c COMMAND`` (``sh`` when bash is missing) in its own session and
process group, with stdin closed and a small clean environment.  When it ends, one JSON text
message is sent back::

    {"request_id", "command", "success", "output", "error", "returncode", "timestamp",
     "duration_ms", "truncated"}

Several commands may run at once on one connection; their results are sent in completion
order.  stdout and stderr are each capped at ``$AGENT_MAX_OUTPUT`` bytes (default 4 MiB):
the first and the last half of the cap are kept and ``truncated`` is set.  When the WebSocket
closes, commands still running are killed (SIGKILL to their process groups).

Only the standard library, Twisted and Autobahn are used, in the versions Debian bookworm
packages (Twisted 22.4, Autobahn 22.7, Python 3.11).

Environment:
    SANDBOX_AGENT_SECRET  required; removed from the environment once read
    AGENT_PORT            TCP port to listen on (default 8765)
    AGENT_MAX_OUTPUT      cap in bytes for each of stdout / stderr (default 4194304)
    AGENT_LOG_LEVEL       debug | info | warn | error (default info); per-command lines are debug
"""

from __future__ import annotations

import datetime
import hmac
import json
import os
import pwd
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import error as ierror
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    FilteringLogObserver,
    InvalidLogLevelError,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

log = Logger(namespace="agent")

DEFAULT_PORT = 8765
DEFAULT_MAX_OUTPUT = 4 * 1024 * 1024
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_CONFIG = 2

# Each command gets its own session (and so its own process group, pgid == pid) so that the
# whole tree it starts can be killed with one killpg().  reactor.spawnProcess has no preexec
# hook, so a helper does the setsid() between fork and exec:
# * /usr/bin/setsid from util-linux.  util-linux is Essential in Debian bookworm, so it is in
#   both debian:bookworm-slim and a debootstrap minbase (checked: /usr/bin/setsid exists in
#   the built image).  Our child is never a process-group leader (Twisted does not call
#   setpgrp/setsid without a PTY), so setsid(1) does not fork: it calls setsid() and execs,
#   and the pid we hold is the group id.
# * otherwise a tiny Python shim doing the same (slower: one interpreter start per command).
SETSID_CANDIDATES = ("/usr/bin/setsid", "/bin/setsid")
PY_SETSID_SHIM = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """The agent's environment is unusable; the message says why."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs, read once from the environment at start-up."""

    port: int
    secret: bytes
    max_output: int
    shell: str
    setsid: str | None
    cwd: str
    child_env: dict[str, str] = field(repr=False)
    log_level: LogLevel = LogLevel.info

    def __repr__(self) -> str:  # never show the secret
        return (
            f"AgentConfig(port={self.port}, max_output={self.max_output}, shell={self.shell!r}, "
            f"setsid={self.setsid!r}, cwd={self.cwd!r})"
        )

    def argv_for(self, command: str) -> list[str]:
        """The argv that runs ``command`` through the shell in a new session."""
        inner = [self.shell, "-c", command]
        if self.setsid:
            return [self.setsid, *inner]
        return [sys.executable, "-c", PY_SETSID_SHIM, *inner]

    @classmethod
    def from_environ(cls, environ: os._Environ[str] | dict[str, str]) -> AgentConfig:
        """Read (and scrub) the configuration; raise ConfigError on bad values."""
        secret = environ.pop("SANDBOX_AGENT_SECRET", "")
        if not secret:
            raise ConfigError("SANDBOX_AGENT_SECRET is not set (or empty); refusing to start")
        port = _int_env(environ, "AGENT_PORT", DEFAULT_PORT, 0, 65535)
        max_output = _int_env(environ, "AGENT_MAX_OUTPUT", DEFAULT_MAX_OUTPUT, 0, 1 << 34)
        level_name = environ.get("AGENT_LOG_LEVEL", "info").strip().lower() or "info"
        try:
            level = LogLevel.levelWithName(level_name)
        except InvalidLogLevelError:
            raise ConfigError(f"AGENT_LOG_LEVEL={level_name!r} is not a log level") from None

        try:
            pw = pwd.getpwuid(os.getuid())
            user, home = pw.pw_name, pw.pw_dir
        except KeyError:
            user, home = str(os.getuid()), environ.get("HOME", "/")
        cwd = home if os.path.isdir(home) else "/"
        shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
        setsid = next((p for p in SETSID_CANDIDATES if os.access(p, os.X_OK)), None)
        child_env = {
            "HOME": home,
            "USER": user,
            "LOGNAME": user,
            "PATH": SAFE_PATH,
            "LANG": "C.UTF-8",
            "SHELL": shell,
        }
        return cls(
            port=port,
            secret=secret.encode("utf-8"),
            max_output=max_output,
            shell=shell,
            setsid=setsid,
            cwd=cwd,
            child_env=child_env,
            log_level=level,
        )


def _int_env(environ: Any, name: str, default: int, low: int, high: int) -> int:
    """An integer from the environment, within [low, high]."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is out of range [{low}, {high}]")
    return value


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def make_result(
    request_id: str | None,
    command: str | None,
    returncode: int,
    output: str = "",
    error: str = "",
    duration_ms: float = 0.0,
    truncated: bool = False,
) -> dict[str, Any]:
    """A result message (the seed contract's keys plus duration_ms and truncated)."""
    return {
        "request_id": request_id,
        "command": command,
        "success": returncode == 0,
        "output": output,
        "error": error,
        "returncode": returncode,
        "timestamp": datetime.datetime.now().isoformat(),
        "duration_ms": duration_ms,
        "truncated": truncated,
    }


def error_result(request_id: str | None, command: str | None, message: str) -> dict[str, Any]:
    """A result for a request that was not run (bad message, spawn failure...)."""
    return make_result(request_id, command, returncode=-1, error=message)


# --------------------------------------------------------------------------------------------
# output capture
# --------------------------------------------------------------------------------------------


class OutputBuffer:
    """Bytes of one output stream, capped at ``cap`` while reading.

    The first ``cap // 2`` bytes are kept as they come (the head); after that only the last
    ``cap - cap // 2`` bytes are kept (the tail, trimmed from the front as data arrives).  At no
    time are more than ``cap`` bytes held.  ``truncated`` tells whether anything was dropped.
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(0, cap)
        self._head_cap = self.cap // 2
        self._tail_cap = self.cap - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def write(self, data: bytes) -> None:
        """Take one chunk of output."""
        if not data:
            return
        self.total += len(data)
        view = memoryview(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += view[:room]
            view = view[room:]
        if not view or self._tail_cap == 0:
            return
        if len(view) >= self._tail_cap:
            self._tail[:] = view[len(view) - self._tail_cap :]
            return
        excess = len(self._tail) + len(view) - self._tail_cap
        if excess > 0:
            del self._tail[:excess]  # cheap in CPython: moves the start of the buffer
        self._tail += view

    @property
    def kept(self) -> int:
        """How many bytes are held."""
        return len(self._head) + len(self._tail)

    @property
    def truncated(self) -> bool:
        """Whether some bytes were dropped."""
        return self.total > self.kept

    def getvalue(self) -> bytes:
        """Head and tail, joined (the dropped middle is simply missing)."""
        return bytes(self._head) + bytes(self._tail)

    def text(self) -> str:
        """The kept bytes as text (UTF-8, undecodable bytes become U+FFFD)."""
        return self.getvalue().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# one command
# --------------------------------------------------------------------------------------------


def returncode_from(reason: Failure) -> int:
    """Exit status like subprocess: the exit code, or minus the signal number."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig is not None:
        return -int(sig)
    code = getattr(value, "exitCode", None)
    if code is not None:
        return int(code)
    return -1


class CommandRun(ProcessProtocol):
    """One request: a shell command in its own process group, and its captured output.

    ``on_done(run, result)`` is called once, when the process has exited and its pipes are
    closed.  Later additions (timeout, streaming, stdin, cancel) hang off this object.
    """

    def __init__(
        self,
        request_id: str,
        command: str,
        max_output: int,
        on_done: Callable[[CommandRun, dict[str, Any]], None],
    ) -> None:
        self.request_id = request_id
        self.command = command
        self.stdout = OutputBuffer(max_output)
        self.stderr = OutputBuffer(max_output)
        self.on_done = on_done
        self.pid: int | None = None
        self.started = 0.0
        self.finished = False
        self.killed = False

    def start(self, reactor: Any, config: AgentConfig) -> None:
        """Spawn the process (raises if spawning fails in this process)."""
        self.started = time.monotonic()
        argv = config.argv_for(self.command)
        reactor.spawnProcess(self, argv[0], argv, env=dict(config.child_env), path=config.cwd)
        self.pid = self.transport.pid

    # ProcessProtocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Close stdin at once: the command reads EOF."""
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Buffer stdout (fd 1) and stderr (fd 2)."""
        if childFD == 1:
            self.stdout.write(data)
        elif childFD == 2:
            self.stderr.write(data)

    def processEnded(self, reason: Failure) -> None:
        """Build the result and hand it over."""
        self.finished = True
        returncode = returncode_from(reason)
        result = make_result(
            self.request_id,
            self.command,
            returncode,
            output=self.stdout.text(),
            error=self.stderr.text(),
            duration_ms=round((time.monotonic() - self.started) * 1000.0, 3),
            truncated=self.stdout.truncated or self.stderr.truncated,
        )
        try:
            self.on_done(self, result)
        except Exception:
            log.failure(
                "result handler failed for request {request_id}", request_id=self.request_id
            )

    # control -----------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the command's whole process group (no-op once it has ended)."""
        if self.finished or self.pid is None:
            return
        self.killed = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # no such group (yet/anymore): fall through to the pid itself
        except OSError as e:
            log.warn("killpg({pid}) failed: {e}", pid=self.pid, e=e)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# the WebSocket
# --------------------------------------------------------------------------------------------


class AgentProtocol(WebSocketServerProtocol):
    """One gateway connection: runs the commands it sends, replies with their results."""

    factory: AgentFactory

    def __init__(self) -> None:
        super().__init__()
        # Careful with names: Autobahn's protocol already uses e.g. is_open / is_closed
        # (Deferreds) and Twisted's uses connected.
        self.runs: dict[str, CommandRun] = {}
        self.agent_open = False
        self.peer_label = "?"

    # handshake / lifecycle ---------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> None:
        """Check ``Authorization: Bearer <secret>``; deny with 401 otherwise."""
        self.peer_label = str(request.peer)
        try:
            presented = request.headers.get("authorization", "")
            expected = b"Bearer " + self.factory.config.secret
            ok = hmac.compare_digest(presented.strip().encode("utf-8", "replace"), expected)
        except Exception:
            log.failure("error while checking the agent secret")
            ok = False
        if not ok:
            log.info("refused WebSocket from {peer}: bad agent secret", peer=self.peer_label)
            raise ConnectionDeny(401, "bad agent secret")
        return None

    def onOpen(self) -> None:
        """Register the connection."""
        self.agent_open = True
        self.factory.connections.add(self)
        log.info("connection open from {peer}", peer=self.peer_label)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Kill whatever is still running for this connection."""
        try:
            was_open, self.agent_open = self.agent_open, False
            self.factory.connections.discard(self)
            running = list(self.runs.values())
            self.runs.clear()
            for run in running:
                run.kill()
            if was_open:  # refused handshakes were logged in onConnect already
                log.info(
                    "connection closed from {peer} (code={code}, clean={clean}), killed {n}",
                    peer=self.peer_label,
                    code=code,
                    clean=wasClean,
                    n=len(running),
                )
        except Exception:
            log.failure("error while closing connection from {peer}", peer=self.peer_label)

    # messages ----------------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Validate one request and start it; never raise."""
        try:
            self._handle_message(payload, isBinary)
        except Exception:
            log.failure("error while handling a message from {peer}", peer=self.peer_label)
            self.send_result(error_result(None, None, "internal agent error handling the message"))

    def _handle_message(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.send_result(
                error_result(None, None, "binary messages are not supported; send JSON text")
            )
            return
        try:
            msg = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            self.send_result(error_result(None, None, f"message is not valid JSON: {e}"))
            return
        if not isinstance(msg, dict):
            self.send_result(error_result(None, None, "message must be a JSON object"))
            return

        request_id = msg.get("request_id")
        command = msg.get("command")
        if request_id is not None and not isinstance(request_id, str):
            self.send_result(
                error_result(
                    None,
                    command if isinstance(command, str) else None,
                    "'request_id' must be a string",
                )
            )
            return
        if "command" not in msg:
            self.send_result(error_result(request_id, None, "'command' is missing"))
            return
        if not isinstance(command, str):
            self.send_result(error_result(request_id, None, "'command' must be a string"))
            return
        if request_id is None:
            request_id = uuid.uuid4().hex
        if request_id in self.runs:
            self.send_result(
                error_result(request_id, command, f"request_id {request_id!r} is already running")
            )
            return
        self.start_command(request_id, command)

    def start_command(self, request_id: str, command: str) -> None:
        """Spawn one command; its result is sent when it ends."""
        config = self.factory.config
        run = CommandRun(request_id, command, config.max_output, self._command_done)
        self.runs[request_id] = run
        try:
            run.start(self.factory.reactor, config)
        except Exception as e:
            self.runs.pop(request_id, None)
            log.failure("could not start request {request_id}", request_id=request_id)
            self.send_result(error_result(request_id, command, f"could not start command: {e}"))
            return
        log.debug(
            "started {request_id} pid={pid}: {command!r}",
            request_id=request_id,
            pid=run.pid,
            command=command[:200],
        )

    def _command_done(self, run: CommandRun, result: dict[str, Any]) -> None:
        if self.runs.get(run.request_id) is run:
            del self.runs[run.request_id]
        log.debug(
            "finished {request_id} rc={rc} in {ms:.1f} ms (out={out}B err={err}B truncated={t})",
            request_id=run.request_id,
            rc=result["returncode"],
            ms=result["duration_ms"],
            out=run.stdout.total,
            err=run.stderr.total,
            t=result["truncated"],
        )
        if self.agent_open:
            self.send_result(result)

    def send_result(self, result: dict[str, Any]) -> None:
        """Send one JSON text message, if the connection is still open."""
        if not self.agent_open:
            return
        try:
            data = json.dumps(result, ensure_ascii=False).encode("utf-8")
            self.sendMessage(data, isBinary=False)
        except Exception:
            log.failure(
                "could not send result for {request_id}", request_id=result.get("request_id")
            )


class AgentFactory(WebSocketServerFactory):
    """Builds AgentProtocols; holds the config, the reactor and the open connections."""

    protocol = AgentProtocol

    def __init__(self, config: AgentConfig, reactor: Any) -> None:
        super().__init__()  # no URL: no Host/port check (the host port is a published one)
        self.config = config
        self.reactor = reactor
        self.connections: set[AgentProtocol] = set()
        # Results can be large (two 4 MiB buffers, JSON-escaped); no payload limits here.
        self.setProtocolOptions(maxFramePayloadSize=0, maxMessagePayloadSize=0)

    def kill_all(self) -> None:
        """Kill every running command (at reactor shutdown)."""
        for conn in list(self.connections):
            for run in list(conn.runs.values()):
                run.kill()


# --------------------------------------------------------------------------------------------
# HTTP side
# --------------------------------------------------------------------------------------------


class Healthz(Resource):
    """``GET /healthz`` -> 200 ``ok``."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return b"ok"


class QuietSite(Site):
    """A Site without access logging (health probes would flood the log)."""

    def log(self, request: Request) -> None:
        pass


def build_site(factory: AgentFactory) -> Site:
    """Root resource with /healthz and /agent."""
    root = Resource()
    root.putChild(b"healthz", Healthz())
    root.putChild(b"agent", WebSocketResource(factory))
    site = QuietSite(root)
    site.noisy = False
    return site


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def start_logging(level: LogLevel) -> None:
    """twisted.logger to stderr, at ``level`` and above."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main() -> int:
    """Start the agent; returns the process exit code."""
    try:
        config = AgentConfig.from_environ(os.environ)
    except ConfigError as e:
        print(f"agent: configuration error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG

    start_logging(config.log_level)

    from twisted.internet import reactor

    factory = AgentFactory(config, reactor)
    site = build_site(factory)
    try:
        reactor.listenTCP(config.port, site, interface="0.0.0.0")
    except ierror.CannotListenError as e:
        print(f"agent: cannot listen on port {config.port}: {e}", file=sys.stderr, flush=True)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", factory.kill_all)
    log.info("agent listening on 0.0.0.0:{port} ({config!r})", port=config.port, config=config)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
