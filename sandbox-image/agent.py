#!/usr/bin/env python3
"""twistedgw sandbox agent: runs shell commands for the gateway over a WebSocket.

Runs inside the sandbox container under its supervisor (``supervise``, under tini), as the
user ``agent`` with only the SETUID, SETGID and KILL capabilities, and starts every command and
session shell as the unprivileged user ``sandbox`` (see ``spawn``).  It serves, on TCP
``0.0.0.0:$AGENT_PORT`` (default 8765):

* ``GET /healthz``  -> ``200 ok`` (no auth), for readiness probes;
* ``/agent``        -> a WebSocket.  The opening handshake must carry
  ``Authorization: Bearer $SANDBOX_AGENT_SECRET``, else it is refused with HTTP 401.

Only the standard library, Twisted and Autobahn are used, in the versions Debian bookworm
packages (Twisted 22.4, Autobahn 22.7, Python 3.11).

Protocol (gateway -> agent)
===========================

Every WebSocket message is one JSON object (text frame).  The gateway validates what clients
send, but the agent validates everything again and answers every malformed message with JSON;
it never drops a connection because of a message.  Unknown extra keys are ignored, and a key
whose value is ``null`` counts as absent.

Command: no ``type``, or ``"type": "command"``::

    {"request_id": str, "command": str,
     "timeout"?: number > 0, "cwd"?: str, "env"?: {str: str}, "stdin"?: str,
     "stream"?: bool, "interactive"?: bool, "session"?: str}

The command runs as ``bash -c COMMAND`` (``sh`` when bash is missing) in its own session and
process group, with a small clean environment, in ``$HOME``.  A missing ``request_id`` is
replaced by a fresh one.

* ``timeout`` (seconds, may be fractional): on expiry the whole process group is SIGKILLed and
  the result has ``timed_out: true`` (``returncode`` -9, output so far kept).  Default
  ``$AGENT_DEFAULT_TIMEOUT``; larger values are clamped to ``$AGENT_MAX_TIMEOUT``.
* ``cwd``: directory to run in, relative to ``$HOME`` unless absolute; it must exist.
* ``env``: merged over the base environment (keys non-empty, without ``=`` or NUL).
* ``stdin``: text written (UTF-8) to the command's stdin, which is then closed.  Without it
  (and without ``interactive``) stdin is at EOF.
* ``stream: true``: output is sent while the command runs, as
  ``{"type": "output", "request_id", "stream": "stdout"|"stderr", "data": str}`` messages, in
  order per stream (UTF-8 decoded incrementally, undecodable bytes become U+FFFD).  Small reads
  are coalesced: a stream's pending bytes go out at 64 KiB or 5 ms after the first unsent byte,
  and always before the result.  The result then has ``output: ""``, ``error: ""`` and
  ``truncated: false``.  No output cap applies; instead, when the WebSocket's send buffer is
  full (the gateway does not read), the agent stops reading the pipes of the connection's
  streamed commands until it drains, so the commands block and the agent's memory stays flat.
* ``interactive: true``: stdin stays open and is fed by ``stdin`` messages (``stdin`` text, if
  given, is written first).  Input the command has not read yet is buffered in the agent
  (there is no flow control towards the gateway for stdin).
* ``session: NAME`` (1-64 of ``[A-Za-z0-9_.-]``): run in the persistent shell NAME (below).

Control messages:

* ``{"type": "cancel", "request_id"}``: SIGKILL that command's process group (a session command
  gets the session's kill procedure; a queued one is dropped).  Its result arrives with
  ``cancelled: true``.
* ``{"type": "stdin", "request_id", "data"?: str, "eof"?: bool}``: write ``data`` to an
  interactive command's stdin, then close it when ``eof`` is true.  No reply on success.
* ``{"type": "list_sessions", "request_id"?}`` ->
  ``{"type": "sessions", "request_id", "sessions": [{"session", "busy", "queued", "pid",
  "created_at", "cwd"}]}`` (``cwd`` best effort, from /proc; ``null`` when unknown).
* ``{"type": "close_session", "session", "request_id"?}``: kill the session's shell (whole
  process group), fail its running and queued commands (``cancelled: true``) and reply
  ``{"type": "session_closed", "session", "request_id"}``.

Replies (agent -> gateway)
==========================

Result of a command, one per command, in completion order (several commands may run at once on
one connection)::

    {"type": "result", "request_id", "command", "success", "output", "error", "returncode",
     "timestamp", "duration_ms", "truncated", "timed_out", "cancelled"}

plus ``"session": NAME`` for a session command, ``"output_limit_exceeded": true`` and
``"session_restarted": true`` only when they apply.  ``success`` is ``returncode == 0`` and
not timed out / cancelled / over the output limit; ``returncode`` is minus the signal number
when the command was killed by a signal (-9 whenever the agent killed it), and -1 for a queued
session command that never started.  ``timestamp`` is ISO 8601 local time.

A command message that cannot be run gets an error in the seed's result shape::

    {"type": "error", "request_id", "command", "success": false, "output": "", "error",
     "returncode": -1, "timestamp", "error_code", "duration_ms": 0.0, "truncated": false}

with ``error_code`` one of ``binary_message``, ``invalid_json``, ``invalid_message``,
``invalid_request_id``, ``missing_command``, ``invalid_command``, ``invalid_timeout``,
``invalid_cwd``, ``invalid_env``, ``invalid_stdin``, ``invalid_stream``,
``invalid_interactive``, ``invalid_session``, ``unsupported`` (``interactive`` with
``session``), ``duplicate_request_id``, ``too_many_commands``, ``too_many_sessions``,
``spawn_failed``, ``internal_error``.  A control message that fails gets the short form
``{"type": "error", "request_id", "error", "error_code"}`` with ``error_code`` one of
``unknown_type``, ``invalid_request_id``, ``unknown_request``, ``not_interactive``,
``invalid_stdin``, ``stdin_closed``, ``invalid_session``, ``unknown_session``.

Output limits (non-streamed commands)
=====================================

stdout and stderr are each capped at ``$AGENT_MAX_OUTPUT`` bytes while reading: the first and
the last half of the cap are kept and ``truncated`` is set.  When one stream passes
``$AGENT_KILL_OUTPUT`` bytes the process group is SIGKILLed (``truncated`` and
``output_limit_exceeded``), so ``yes`` ends by itself.  When the command's main process has
exited but something it started in the background still holds the pipes open, the agent waits
at most 0.5 s more, then stops reading and closes its ends of the pipes and sends the result
(``sleep 100 & echo x`` answers at once); the background processes are not killed.

Sessions
========

A session is a long-lived ``bash --noprofile --norc`` (no PTY, its own process group, base
environment, cwd ``$HOME``) started on first use of its name and shared by all connections of
the agent; it survives the WebSocket that started it and ends with ``close_session``, when it
exits by itself (``exit``), or with the agent.  At most ``$AGENT_MAX_SESSIONS`` exist at once.
Its commands run one at a time, in arrival order (a queued command's timeout starts when it
starts), in the shell itself: ``cd``, ``export``, variables and functions persist.  The agent
writes ``{ cd ... && export ... && eval 'COMMAND'; } < /dev/null`` (or ``<`` a temporary file
holding ``stdin``) to the shell, then prints an end marker with a fresh random nonce to stdout
(with ``$?``) and to stderr, and strips both markers from the output.  So, in a session:

* ``cwd`` and ``env`` are applied with ``cd`` and ``export`` in the shell and persist for later
  commands, like typing them in a terminal; ``env`` keys must be shell variable names.
* ``interactive`` is not supported (``error_code: "unsupported"``): the shell's stdin carries
  the agent's own input.
* Background jobs started in a session keep running; their output, when it arrives while a
  later command of the session runs, is counted as that command's output.
* Timeout, cancel and the output limit SIGKILL every process of the shell's session / process
  group and every descendant of the shell (but not the shell), every 100 ms for up to 1 s while
  waiting for the markers.  If they arrive, the session lives on.  If not (a loop of builtins
  running in the shell itself, or a command that redirected the shell's own stdout/stderr),
  the shell's whole process group is killed, a fresh shell is started under the same name
  (state lost) and the result has ``session_restarted: true``.
* When the shell exits by itself, the running command's result carries the shell's exit
  status; the next command for that name starts a new shell.

When a connection closes, its non-session commands are killed (their process groups get
SIGKILL).  Its session commands (running or queued) are left to run in their shells, but their
results are dropped.

A command killed by SIGKILL that the agent did not send, while the container's memory cgroup
counted a new OOM kill, gets ``"oom_killed": true`` and a note at the end of ``error``.

Environment:
    SANDBOX_AGENT_SECRET   required; removed from the environment once read
    SANDBOX_COMMAND_ENV    JSON object of variables every command gets (the sandbox creator's
                           ``env``); removed from the environment once read
    AGENT_PORT             TCP port to listen on (default 8765)
    AGENT_UNIX_SOCKET      listen on this Unix socket instead (sandboxes without a network)
    AGENT_MAX_OUTPUT       head+tail cap in bytes for each of stdout / stderr (default 1048576)
    AGENT_KILL_OUTPUT      kill a non-streamed command when one of its streams passes this many
                           bytes (default 67108864; 0 = never)
    AGENT_DEFAULT_TIMEOUT  seconds, for commands without ``timeout`` (default 900)
    AGENT_MAX_TIMEOUT      seconds, upper bound for ``timeout`` (default 86400)
    AGENT_MAX_RUNNING      commands running or queued per connection (default 64)
    AGENT_MAX_SESSIONS     sessions per agent (default 16; 0 = no sessions)
    AGENT_LOG_LEVEL        debug | info | warn | error (default info); per-command lines are debug
    AGENT_SPAWN            ``fork`` to start commands with Twisted's fork+exec (and setsid(1))
                           instead of posix_spawn
"""

from __future__ import annotations

import sys

# The agent speaks plain WebSocket (TCP on loopback-published ports, or a Unix socket); it
# never uses TLS. Twisted and Autobahn import pyOpenSSL eagerly when it is installed, which
# costs about 85 ms of every sandbox's start-up here; without it they simply leave TLS out.
sys.modules.setdefault("OpenSSL", None)  # type: ignore[arg-type]

import codecs
import datetime
import errno
import hmac
import json
import math
import os
import pwd
import re
import secrets
import signal
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import error as ierror
from twisted.internet import main as twisted_main
from twisted.internet import process as twisted_process
from twisted.internet.interfaces import IPushProducer
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
from zope.interface import implementer

log = Logger(namespace="agent")

DEFAULT_PORT = 8765
DEFAULT_MAX_OUTPUT = 1024 * 1024
DEFAULT_KILL_OUTPUT = 64 * 1024 * 1024
DEFAULT_TIMEOUT = 900.0
DEFAULT_MAX_TIMEOUT = 86400.0
DEFAULT_MAX_RUNNING = 64
DEFAULT_MAX_SESSIONS = 16
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_CONFIG = 2

#: Streamed output: flush a stream's pending bytes at this size, or this long after the first
#: unsent byte.
STREAM_FLUSH_BYTES = 64 * 1024
STREAM_FLUSH_DELAY = 0.005
#: After the main process exits, how long background holders may keep the pipes open.
PIPE_GRACE = 0.5
#: Session kill procedure: kill the shell's children every KILL_TICK s, for KILL_WINDOW s.
SESSION_KILL_TICK = 0.1
SESSION_KILL_WINDOW = 1.0
SESSION_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SHELL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KILLED_RETURNCODE = -int(signal.SIGKILL)
#: Largest WebSocket message the agent accepts.
AGENT_MAX_MESSAGE = 64 * 1024 * 1024

#: Where the kernel counts OOM kills in this container's memory cgroup (v1, then v2).
OOM_COUNTERS = ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events")


def oom_kill_count() -> int | None:
    """How many processes the kernel has OOM-killed in this container so far (None: unknown)."""
    for path in OOM_COUNTERS:
        try:
            with open(path) as counters:
                for line in counters:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


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


#: Bytes read from a command's pipe at a time (Twisted's ProcessReader reads 8 KiB, which
#: makes a fast producer cost one reactor turn per 8 KiB).
PIPE_READ_SIZE = 64 * 1024


class LargeReadProcessReader(twisted_process.ProcessReader):
    """A ProcessReader that reads up to ``PIPE_READ_SIZE`` bytes per wake-up."""

    def doRead(self) -> Any:
        try:
            output = os.read(self.fd, PIPE_READ_SIZE)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return None
            return twisted_main.CONNECTION_LOST
        if not output:
            return twisted_main.CONNECTION_DONE
        self.dataReceived(output)
        return None


class SpawnedProcess(twisted_process.Process):
    """A Twisted process started with ``posix_spawn`` (setsid included) instead of fork+exec.

    fork() of a ~50 MiB Python process costs milliseconds of page-table copying per command;
    posix_spawn (vfork-like in glibc) does not, and its ``setsid`` flag saves exec'ing
    setsid(1) as well. Twisted 22.4 (Debian bookworm's) always forks, so this overrides its
    ``_fork``; reading, writing, pausing and reaping stay Twisted's own. Every fd the agent
    opens is close-on-exec (PEP 446), so the child gets only the pipes mapped here.
    """

    processReaderFactory = LargeReadProcessReader

    def _fork(
        self,
        path: Any,
        uid: Any,
        gid: Any,
        executable: Any,
        args: Any,
        environment: Any,
        fdmap: dict[int, int],
    ) -> None:
        actions = [(os.POSIX_SPAWN_DUP2, parent, child) for child, parent in fdmap.items()]
        previous = os.getcwd()
        # posix_spawn has no chdir action before Python 3.13: change ours around the call
        # (the agent is single-threaded, so nothing else sees it).
        os.chdir(path)
        try:
            self.pid = os.posix_spawn(
                executable, list(args), environment, file_actions=actions, setsid=True
            )
        finally:
            os.chdir(previous)
        self.status = -1


def posix_spawn_works() -> bool:
    """Whether SpawnedProcess can be used here (and its pipe fds cannot clash with 0-2)."""
    return (
        hasattr(os, "posix_spawn")
        and hasattr(twisted_process, "Process")
        and all(_fd_open(fd) for fd in (0, 1, 2))
    )


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


#: The user that runs commands and session shells. When the agent has a uid of its own (the
#: image's ``agent``, set up by its supervisor with the SETUID, SETGID and KILL capabilities),
#: every user process is started through setpriv, which changes to this user's uid and gid,
#: drops the supplementary groups and clears the inheritable and ambient capabilities before
#: it execs the command: user code runs with no capability at all and cannot signal, ptrace
#: or read the /proc entries of the agent.
SANDBOX_USER = "sandbox"
SETPRIV_CANDIDATES = ("/usr/bin/setpriv", "/bin/setpriv")
#: oom_score_adj of user processes (the agent keeps its own, normally 0): when the sandbox
#: hits its memory limit, the kernel's OOM killer picks user code, not the agent.
USER_OOM_SCORE_ADJ = 500
OOM_SCORE_ADJ_PATH = "/proc/self/oom_score_adj"
#: Capability bits (linux/capability.h) the agent needs to start processes as another user.
CAP_SETGID, CAP_SETUID = 6, 7


@dataclass(frozen=True)
class UserSpawn:
    """How user processes are started: as whom (an argv prefix) and how OOM-killable."""

    #: ``setpriv ... --`` when user processes change uid; empty when they run as the agent's.
    prefix: tuple[str, ...] = ()
    #: Given to user processes: the agent raises its own for the moment of the spawn (no
    #: capability needed to raise it, nor to go back down to where it started), and the
    #: child inherits it.
    oom_score_adj: int | None = USER_OOM_SCORE_ADJ
    #: The agent's own value, restored after each spawn.
    agent_oom_score_adj: int = 0
    #: The user's uid and gid, when they are not the agent's.
    uid: int | None = None
    gid: int | None = None

    def readlink(self, path: str) -> str:
        """``os.readlink`` with the user's filesystem uid and gid, for the /proc links of
        user processes (``/proc/PID/cwd``), which another uid may not read."""
        if self.uid is None or self.gid is None:
            return os.readlink(path)
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        old_gid = libc.setfsgid(self.gid)
        old_uid = libc.setfsuid(self.uid)
        try:
            return os.readlink(path)
        finally:
            libc.setfsuid(old_uid)
            libc.setfsgid(old_gid)

    @classmethod
    def detect(cls) -> tuple[UserSpawn, pwd.struct_passwd | None]:
        """The spawn settings for this process, and the user that user processes run as.

        Raises ConfigError when the agent runs under another uid than ``sandbox`` but cannot
        change to it (no setpriv, or no SETUID/SETGID capability).
        """
        oom = _read_oom_score_adj()
        try:
            sandbox = pwd.getpwnam(SANDBOX_USER)
        except KeyError:
            sandbox = None
        if sandbox is None or sandbox.pw_uid == os.getuid():
            try:
                own = pwd.getpwuid(os.getuid())
            except KeyError:
                own = None
            return cls(agent_oom_score_adj=oom or 0, oom_score_adj=_raised(oom)), own
        setpriv = next((p for p in SETPRIV_CANDIDATES if os.access(p, os.X_OK)), None)
        if setpriv is None:
            raise ConfigError(f"setpriv is missing: cannot start processes as {SANDBOX_USER}")
        if not _has_capabilities(CAP_SETUID, CAP_SETGID):
            raise ConfigError(
                f"the agent (uid {os.getuid()}) lacks CAP_SETUID/CAP_SETGID to start processes "
                f"as {SANDBOX_USER}; start the image as root (its supervisor drops privileges)"
            )
        prefix = (
            setpriv,
            f"--reuid={sandbox.pw_uid}",
            f"--regid={sandbox.pw_gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--",
        )
        return cls(prefix, _raised(oom), oom or 0, sandbox.pw_uid, sandbox.pw_gid), sandbox


def _read_oom_score_adj() -> int | None:
    try:
        with open(OOM_SCORE_ADJ_PATH) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _raised(agent_value: int | None) -> int | None:
    """What user processes get: USER_OOM_SCORE_ADJ, never less than the agent's own."""
    if agent_value is None:
        return None
    return max(USER_OOM_SCORE_ADJ, agent_value)


def _write_oom_score_adj(value: int) -> bool:
    try:
        with open(OOM_SCORE_ADJ_PATH, "w") as f:
            f.write(str(value))
        return True
    except OSError:
        return False


def _has_capabilities(*bits: int) -> bool:
    """Whether this process has these capabilities in its effective set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    effective = int(line.split()[1], 16)
                    return all(effective & (1 << bit) for bit in bits)
    except (OSError, ValueError, IndexError):
        pass
    return False


def spawn(
    reactor: Any,
    proto: Any,
    argv: list[str],
    env: dict[str, str],
    path: str,
    use_posix_spawn: bool,
    user: UserSpawn | None = None,
) -> Any:
    """Start ``argv`` as a user process, in a new session, with ``proto`` attached; returns
    the transport.

    Every process the agent starts for the user (commands, session shells) comes through
    here: ``user`` says as whom (see UserSpawn) and with which oom_score_adj.
    """
    user = user or UserSpawn(oom_score_adj=None)
    if user.prefix:
        argv = [*user.prefix, *argv]
    raised = user.oom_score_adj is not None and _write_oom_score_adj(user.oom_score_adj)
    try:
        if use_posix_spawn:
            return SpawnedProcess(reactor, argv[0], argv, env, path, proto)
        return reactor.spawnProcess(proto, argv[0], argv, env=env, path=path)
    finally:
        if raised:
            _write_oom_score_adj(user.agent_oom_score_adj)


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
    kill_output: int = DEFAULT_KILL_OUTPUT
    default_timeout: float = DEFAULT_TIMEOUT
    max_timeout: float = DEFAULT_MAX_TIMEOUT
    max_running: int = DEFAULT_MAX_RUNNING
    max_sessions: int = DEFAULT_MAX_SESSIONS
    unix_socket: str | None = None
    use_posix_spawn: bool = False
    user_spawn: UserSpawn = field(default_factory=UserSpawn)

    def __repr__(self) -> str:  # never show the secret
        return (
            f"AgentConfig(port={self.port}, max_output={self.max_output}, "
            f"kill_output={self.kill_output}, default_timeout={self.default_timeout}, "
            f"max_timeout={self.max_timeout}, max_running={self.max_running}, "
            f"max_sessions={self.max_sessions}, shell={self.shell!r}, "
            f"setsid={self.setsid!r}, cwd={self.cwd!r})"
        )

    @property
    def home(self) -> str:
        """The directory relative ``cwd`` values are resolved against."""
        return self.cwd

    def _in_new_session(self, inner: list[str]) -> list[str]:
        if self.use_posix_spawn:
            return inner  # spawn() does the setsid
        if self.setsid:
            return [self.setsid, *inner]
        return [sys.executable, "-c", PY_SETSID_SHIM, *inner]

    def argv_for(self, command: str) -> list[str]:
        """The argv that runs ``command`` through the shell in a new session."""
        return self._in_new_session([self.shell, "-c", command])

    def session_argv(self) -> list[str]:
        """The argv of a persistent session shell (reads its commands from stdin)."""
        if os.path.basename(self.shell) == "bash":
            return self._in_new_session([self.shell, "--noprofile", "--norc"])
        return self._in_new_session([self.shell])

    @classmethod
    def from_environ(cls, environ: os._Environ[str] | dict[str, str]) -> AgentConfig:
        """Read (and scrub) the configuration; raise ConfigError on bad values."""
        secret = environ.pop("SANDBOX_AGENT_SECRET", "")
        if not secret:
            raise ConfigError("SANDBOX_AGENT_SECRET is not set (or empty); refusing to start")
        port = _int_env(environ, "AGENT_PORT", DEFAULT_PORT, 0, 65535)
        max_output = _int_env(environ, "AGENT_MAX_OUTPUT", DEFAULT_MAX_OUTPUT, 0, 1 << 34)
        kill_output = _int_env(environ, "AGENT_KILL_OUTPUT", DEFAULT_KILL_OUTPUT, 0, 1 << 40)
        max_timeout = _float_env(environ, "AGENT_MAX_TIMEOUT", DEFAULT_MAX_TIMEOUT, 1e-3, 1e9)
        default_timeout = min(
            _float_env(environ, "AGENT_DEFAULT_TIMEOUT", DEFAULT_TIMEOUT, 1e-3, 1e9), max_timeout
        )
        max_running = _int_env(environ, "AGENT_MAX_RUNNING", DEFAULT_MAX_RUNNING, 1, 1 << 20)
        max_sessions = _int_env(environ, "AGENT_MAX_SESSIONS", DEFAULT_MAX_SESSIONS, 0, 1 << 16)
        level_name = environ.get("AGENT_LOG_LEVEL", "info").strip().lower() or "info"
        try:
            level = LogLevel.levelWithName(level_name)
        except InvalidLogLevelError:
            raise ConfigError(f"AGENT_LOG_LEVEL={level_name!r} is not a log level") from None

        user_spawn, pw = UserSpawn.detect()
        if pw is not None:
            user, home = pw.pw_name, pw.pw_dir
        else:
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
        # The sandbox creator's environment for every command (set by the gateway).
        raw_env = environ.pop("SANDBOX_COMMAND_ENV", "")
        if raw_env:
            try:
                creator_env = json.loads(raw_env)
            except ValueError:
                raise ConfigError("SANDBOX_COMMAND_ENV is not JSON") from None
            if not isinstance(creator_env, dict) or not all(
                isinstance(k, str)
                and k
                and "=" not in k
                and "\x00" not in k
                and isinstance(v, str)
                and "\x00" not in v
                for k, v in creator_env.items()
            ):
                raise ConfigError("SANDBOX_COMMAND_ENV must be an object of strings")
            child_env.update(creator_env)
        return cls(
            port=port,
            secret=secret.encode("utf-8"),
            max_output=max_output,
            shell=shell,
            setsid=setsid,
            cwd=cwd,
            child_env=child_env,
            log_level=level,
            kill_output=kill_output,
            default_timeout=default_timeout,
            max_timeout=max_timeout,
            max_running=max_running,
            max_sessions=max_sessions,
            unix_socket=environ.get("AGENT_UNIX_SOCKET") or None,
            use_posix_spawn=posix_spawn_works() and environ.get("AGENT_SPAWN") != "fork",
            user_spawn=user_spawn,
        )


def _number_env(environ: Any, name: str, default: Any, low: Any, high: Any, kind: type) -> Any:
    """A finite number of ``kind`` from the environment, within [low, high]."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name}={raw!r} is not {what}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{name}={value} is out of range [{low}, {high}]")
    return value


def _int_env(environ: Any, name: str, default: int, low: int, high: int) -> int:
    """An integer from the environment, within [low, high]."""
    return int(_number_env(environ, name, default, low, high, int))


def _float_env(environ: Any, name: str, default: float, low: float, high: float) -> float:
    """A finite number from the environment, within [low, high]."""
    return float(_number_env(environ, name, default, low, high, float))


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------


def now_iso() -> str:
    """The result timestamp (local time, ISO 8601, as the seed had it)."""
    return datetime.datetime.now().isoformat()


def make_result(
    request_id: str | None,
    command: str | None,
    returncode: int,
    output: str = "",
    error: str = "",
    duration_ms: float = 0.0,
    truncated: bool = False,
    timed_out: bool = False,
    cancelled: bool = False,
) -> dict[str, Any]:
    """A result message: the seed contract's keys plus our additive ones."""
    return {
        "type": "result",
        "request_id": request_id,
        "command": command,
        "success": returncode == 0 and not timed_out and not cancelled,
        "output": output,
        "error": error,
        "returncode": returncode,
        "timestamp": now_iso(),
        "duration_ms": duration_ms,
        "truncated": truncated,
        "timed_out": timed_out,
        "cancelled": cancelled,
    }


def error_result(
    request_id: str | None, command: str | None, message: str, code: str
) -> dict[str, Any]:
    """The reply to a command that was not run, in the seed's result shape."""
    return {
        "type": "error",
        "request_id": request_id,
        "command": command,
        "success": False,
        "output": "",
        "error": message,
        "returncode": -1,
        "timestamp": now_iso(),
        "error_code": code,
        # the previous agent built these with make_result(): keep its keys
        "duration_ms": 0.0,
        "truncated": False,
    }


def control_error(request_id: Any, message: str, code: str) -> dict[str, Any]:
    """The reply to a control message (cancel, stdin, sessions) that failed."""
    return {
        "type": "error",
        "request_id": request_id if isinstance(request_id, str) else None,
        "error": message,
        "error_code": code,
    }


def encode_message(message: dict[str, Any]) -> bytes:
    """JSON for a text frame; always valid UTF-8 (lone surrogates are escaped)."""
    try:
        return json.dumps(message, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A string echoed from the request held a lone surrogate ("\ud800" in the JSON);
        # ASCII-only JSON keeps it as an escape instead of producing invalid UTF-8.
        return json.dumps(message, ensure_ascii=True).encode("ascii")


class MessageError(Exception):
    """A command message that cannot be run; carries what is known of it for the reply."""

    def __init__(
        self, code: str, message: str, request_id: str | None = None, command: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.command = command


@dataclass
class CommandSpec:
    """A validated command message."""

    request_id: str
    command: str
    timeout: float
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    stream: bool = False
    interactive: bool = False
    session: str | None = None


def _is_text(value: str) -> bool:
    """Whether ``value`` encodes to UTF-8 (no lone surrogates) and has no NUL."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_command(msg: dict[str, Any], config: AgentConfig) -> CommandSpec:
    """Validate one command message; raise MessageError for anything that cannot run."""
    request_id = msg.get("request_id")
    command = msg.get("command")
    echo_command = command if isinstance(command, str) else None
    if request_id is not None and not isinstance(request_id, str):
        raise MessageError(
            "invalid_request_id", "'request_id' must be a string", None, echo_command
        )
    if command is None:
        raise MessageError("missing_command", "'command' is missing", request_id)
    if not isinstance(command, str):
        raise MessageError("invalid_command", "'command' must be a string", request_id)
    if not _is_text(command):
        raise MessageError(
            "invalid_command",
            "'command' must not contain NUL characters or lone surrogates",
            request_id,
            command,
        )
    if request_id is None:
        request_id = uuid.uuid4().hex

    def fail(code: str, message: str) -> MessageError:
        return MessageError(code, message, request_id, command)

    timeout = msg.get("timeout")
    if timeout is None:
        timeout_s = config.default_timeout
    elif (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or (isinstance(timeout, float) and not math.isfinite(timeout))
        or timeout <= 0
    ):
        raise fail("invalid_timeout", "'timeout' must be a finite number of seconds > 0")
    else:
        timeout_s = float(min(timeout, config.max_timeout))  # min() first: huge ints

    session = msg.get("session")
    if session is not None and not (
        isinstance(session, str) and SESSION_NAME_RE.fullmatch(session)
    ):
        raise fail("invalid_session", "'session' must be 1-64 characters of [A-Za-z0-9_.-]")

    flags = {}
    for name in ("stream", "interactive"):
        value = msg.get(name)
        if value is not None and not isinstance(value, bool):
            raise fail(f"invalid_{name}", f"'{name}' must be a boolean")
        flags[name] = bool(value)
    if flags["interactive"] and session is not None:
        raise fail("unsupported", "'interactive' is not supported for session commands")

    stdin = msg.get("stdin")
    if stdin is not None:
        if not isinstance(stdin, str):
            raise fail("invalid_stdin", "'stdin' must be a string")
        try:
            stdin_bytes: bytes | None = stdin.encode("utf-8")
        except UnicodeEncodeError:
            raise fail("invalid_stdin", "'stdin' must not contain lone surrogates") from None
    else:
        stdin_bytes = None

    env = msg.get("env")
    env_out: dict[str, str] = {}
    if env is not None:
        if not isinstance(env, dict):
            raise fail("invalid_env", "'env' must be an object of strings")
        for key, value in env.items():
            if not (isinstance(key, str) and key and "=" not in key and _is_text(key)):
                raise fail("invalid_env", "'env' keys must be non-empty, without '=' or NUL")
            if session is not None and not SHELL_NAME_RE.fullmatch(key):
                raise fail("invalid_env", "in a session, 'env' keys must be shell variable names")
            if not (isinstance(value, str) and _is_text(value)):
                raise fail("invalid_env", f"'env' value of {key!r} must be a string without NUL")
            env_out[key] = value

    cwd = msg.get("cwd")
    cwd_out: str | None = None
    if cwd is not None:
        if not (isinstance(cwd, str) and cwd and _is_text(cwd)):
            raise fail("invalid_cwd", "'cwd' must be a non-empty string without NUL")
        cwd_out = os.path.normpath(os.path.join(config.home, cwd))
        if not os.path.isdir(cwd_out):
            raise fail("invalid_cwd", f"cwd {cwd!r} is not an existing directory")
        if not os.access(cwd_out, os.X_OK):
            raise fail("invalid_cwd", f"cwd {cwd!r} is not accessible")

    return CommandSpec(
        request_id=request_id,
        command=command,
        timeout=timeout_s,
        cwd=cwd_out,
        env=env_out,
        stdin=stdin_bytes,
        stream=flags["stream"],
        interactive=flags["interactive"],
        session=session,
    )


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


class ChunkStream:
    """Bytes of one output stream, sent out as text chunks while the command runs.

    Reads are coalesced: pending bytes are decoded and handed to ``emit(name, text)`` when they
    reach STREAM_FLUSH_BYTES, STREAM_FLUSH_DELAY after the first pending byte, or on ``flush``.
    An incremental decoder keeps a multi-byte character split across reads whole.
    """

    def __init__(self, name: str, emit: Callable[[str, str], None], reactor: Any) -> None:
        self.name = name
        self.emit = emit
        self.reactor = reactor
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = bytearray()
        self._timer: Any = None

    def write(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= STREAM_FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self.reactor.callLater(STREAM_FLUSH_DELAY, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self, final: bool = False) -> None:
        """Send what is pending (and, when ``final``, any incomplete character as U+FFFD)."""
        self.cancel()
        data = bytes(self._pending)
        self._pending.clear()
        text = self._decoder.decode(data, final)
        if text:
            self.emit(self.name, text)

    def cancel(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class StreamCapture:
    """One of a command's output streams: capped and buffered, or streamed as chunks."""

    def __init__(
        self,
        name: str,
        config: AgentConfig,
        on_limit: Callable[[], None],
        emit: Callable[[str, str], None] | None = None,
        reactor: Any = None,
    ) -> None:
        self.name = name
        self.total = 0
        self._kill_at = config.kill_output
        self._on_limit = on_limit
        self.limit_hit = False
        self.chunks = ChunkStream(name, emit, reactor) if emit is not None else None
        self.buffer = OutputBuffer(config.max_output) if emit is None else None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        if self.chunks is not None:
            self.chunks.write(data)
            return
        assert self.buffer is not None
        self.buffer.write(data)
        if self._kill_at and self.total > self._kill_at and not self.limit_hit:
            self.limit_hit = True
            self._on_limit()

    def finish(self) -> None:
        """Send the last chunk (streamed output)."""
        if self.chunks is not None:
            self.chunks.flush(final=True)

    def cancel(self) -> None:
        if self.chunks is not None:
            self.chunks.cancel()

    def text(self) -> str:
        return self.buffer.text() if self.buffer is not None else ""

    @property
    def truncated(self) -> bool:
        return self.buffer.truncated if self.buffer is not None else False


# --------------------------------------------------------------------------------------------
# process helpers
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


def kill_group(pgid: int | None, leader_alive: bool = True) -> None:
    """SIGKILL a process group and its leader (quietly, if they are gone).

    Once the leader has been reaped (``leader_alive`` false) only the group is signalled: its
    pid may belong to another process by now, but not while the group still has members.
    """
    if not pgid or pgid <= 1:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # no such group (yet/anymore): fall through to the pid itself
    except OSError as e:
        log.warn("killpg({pid}) failed: {e}", pid=pgid, e=e)
    if not leader_alive:
        return
    try:
        os.kill(pgid, signal.SIGKILL)
    except OSError:
        pass


def force_close_pipes(transport: Any) -> None:
    """Close our ends of a child's pipes now, without waiting for EOF or pending writes.

    ``closeChildFD`` would wait for EOF (readers) or for buffered stdin to drain (writer);
    here the process has exited and something else holds the pipes.  Closing goes through
    each pipe's ``connectionLost`` so that Twisted's bookkeeping (and ``processEnded``)
    happens as for a normal EOF.
    """
    pipes = getattr(transport, "pipes", None)
    if not isinstance(pipes, dict):
        try:
            transport.loseConnection()
        except Exception:
            log.failure("could not close a child's pipes")
        return
    for fd in list(pipes):
        pipe = pipes.get(fd)
        if pipe is None:
            continue
        try:
            pipe.stopReading()
            pipe.stopWriting()
            pipe.connectionLost(Failure(ierror.ConnectionDone("closed by the agent")))
        except Exception:
            log.failure("could not close child fd {fd}", fd=fd)


def _read_proc_stat(pid: str) -> tuple[int, int, int] | None:
    """(ppid, pgrp, session) of a process, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return int(fields[1]), int(fields[2]), int(fields[3])
    except (OSError, ValueError, IndexError):
        return None


def shell_descendants(shell_pid: int) -> set[int]:
    """Every process of the shell's session/process group, or below the shell, but the shell.

    /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN, which is missing on some kernels,
    so /proc/*/stat is scanned (a container has few processes).  Orphans re-parented to tini
    are still found through their process group / session.
    """
    procs: dict[int, tuple[int, int, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return set()
    for name in names:
        if name.isdigit():
            stat = _read_proc_stat(name)
            if stat is not None:
                procs[int(name)] = stat
    found = {
        pid
        for pid, (_ppid, pgrp, sid) in procs.items()
        if pid != shell_pid and (pgrp == shell_pid or sid == shell_pid)
    }
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pgrp, _sid) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen = {shell_pid}
    todo = [shell_pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                found.add(child)
                todo.append(child)
    return found


def kill_shell_descendants(shell_pid: int | None) -> int:
    """SIGKILL all of ``shell_descendants``; returns how many were signalled."""
    if not shell_pid:
        return 0
    count = 0
    for pid in shell_descendants(shell_pid):
        try:
            os.kill(pid, signal.SIGKILL)
            count += 1
        except OSError:
            pass
    return count


def shell_quote(text: str) -> str:
    """Single-quote ``text`` for bash/sh."""
    return "'" + text.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------------
# runs: what a command has in common, plain or in a session
# --------------------------------------------------------------------------------------------


class RunOwner:
    """What a run needs from its connection (AgentProtocol implements it)."""

    output_paused = False

    def send_message(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def run_done(self, run: RunBase, message: dict[str, Any]) -> None:
        raise NotImplementedError


class RunBase:
    """One request: its options, output capture, timers and final result."""

    def __init__(self, spec: CommandSpec, owner: RunOwner, reactor: Any, config: AgentConfig):
        self.spec = spec
        self.request_id = spec.request_id
        self.command = spec.command
        self.owner: RunOwner | None = owner
        self.reactor = reactor
        self.config = config
        emit = self._emit_chunk if spec.stream else None
        self.stdout = StreamCapture("stdout", config, self._output_limit, emit, reactor)
        self.stderr = StreamCapture("stderr", config, self._output_limit, emit, reactor)
        self.started = time.monotonic()
        self.finished = False
        self.killed = False
        self.timed_out = False
        self.cancelled = False
        self.output_limit_exceeded = False
        self.session_restarted = False
        self._timeout_call: Any = None
        self._oom_kills_before: int | None = None

    # lifecycle -----------------------------------------------------------------------------

    def _begin(self) -> None:
        """The command starts now: start its clock and its timeout."""
        self.started = time.monotonic()
        self._oom_kills_before = oom_kill_count()
        if self.spec.timeout > 0:
            self._timeout_call = self.reactor.callLater(self.spec.timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timeout_call = None
        if not self.finished:
            self.timed_out = True
            self.interrupt()

    def _output_limit(self) -> None:
        if not self.finished:
            self.output_limit_exceeded = True
            self.interrupt()

    def cancel(self) -> None:
        """Client asked to cancel."""
        if not self.finished:
            self.cancelled = True
            self.interrupt()

    def interrupt(self) -> None:
        """Kill the command (timeout, cancel, output limit)."""
        raise NotImplementedError

    def set_paused(self, paused: bool) -> None:
        """The connection's send buffer is full (True) or drained (False)."""

    def detach(self) -> None:
        """The connection closed: drop output and result from now on."""
        self.owner = None
        self.set_paused(False)

    # output --------------------------------------------------------------------------------

    def capture(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.stdout.write(data)
        elif fd == 2:
            self.stderr.write(data)

    def _emit_chunk(self, stream: str, text: str) -> None:
        if self.owner is not None:
            self.owner.send_message(
                {"type": "output", "request_id": self.request_id, "stream": stream, "data": text}
            )

    def _stop_timers(self) -> None:
        if self._timeout_call is not None:
            if self._timeout_call.active():
                self._timeout_call.cancel()
            self._timeout_call = None

    def finish(self, returncode: int) -> None:
        """Build the result (flushing streamed output first) and hand it to the owner."""
        if self.finished:
            return
        self.finished = True
        self._stop_timers()
        try:
            self.stdout.finish()
            self.stderr.finish()
        except Exception:
            log.failure("could not flush output of {request_id}", request_id=self.request_id)
        if self.killed:
            returncode = KILLED_RETURNCODE
        result = make_result(
            self.request_id,
            self.command,
            returncode,
            output=self.stdout.text(),
            error=self.stderr.text(),
            duration_ms=round((time.monotonic() - self.started) * 1000.0, 3),
            truncated=self.stdout.truncated or self.stderr.truncated or self.output_limit_exceeded,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
        )
        if self.output_limit_exceeded:
            result["output_limit_exceeded"] = True
            result["success"] = False
        if not self.killed and returncode == KILLED_RETURNCODE:
            # SIGKILL that we did not send: the kernel's OOM killer if its count went up.
            after = oom_kill_count()
            if after is not None and self._oom_kills_before is not None:
                if after > self._oom_kills_before:
                    result["oom_killed"] = True
                    result["error"] += "\n[killed: out of memory (sandbox memory limit)]\n"
        if self.spec.session is not None:
            result["session"] = self.spec.session
        if self.session_restarted:
            result["session_restarted"] = True
        log.debug(
            "finished {request_id} rc={rc} in {ms:.1f} ms (out={out}B err={err}B truncated={t})",
            request_id=self.request_id,
            rc=returncode,
            ms=result["duration_ms"],
            out=self.stdout.total,
            err=self.stderr.total,
            t=result["truncated"],
        )
        self._hand_over(result)

    def fail(self, message: str, code: str) -> None:
        """The command could not be started: reply an error result instead."""
        if self.finished:
            return
        self.finished = True
        self._stop_timers()
        self.stdout.cancel()
        self.stderr.cancel()
        reply = error_result(self.request_id, self.command, message, code)
        if self.spec.session is not None:
            reply["session"] = self.spec.session
        self._hand_over(reply)

    def _hand_over(self, message: dict[str, Any]) -> None:
        owner = self.owner
        if owner is None:
            return
        try:
            owner.run_done(self, message)
        except Exception:
            log.failure("result handler failed for {request_id}", request_id=self.request_id)


# --------------------------------------------------------------------------------------------
# a plain command
# --------------------------------------------------------------------------------------------


class CommandRun(RunBase, ProcessProtocol):
    """A shell command in its own process group, and its captured output.

    The result is handed over once the process has exited and its pipes are closed, or
    PIPE_GRACE after it exited while background processes still hold the pipes.
    """

    def __init__(
        self, spec: CommandSpec, owner: RunOwner, reactor: Any, config: AgentConfig
    ) -> None:
        super().__init__(spec, owner, reactor, config)
        self.pid: int | None = None
        self.exited = False
        self.stdin_open = True
        self._reading_paused = False
        self._grace_call: Any = None

    def start(self) -> None:
        """Spawn the process (raises if spawning fails in this process)."""
        config = self.config
        argv = config.argv_for(self.command)
        env = dict(config.child_env)
        env.update(self.spec.env)
        self._begin()
        cwd = self.spec.cwd or config.cwd
        spawn(self.reactor, self, argv, env, cwd, config.use_posix_spawn, config.user_spawn)
        self.pid = self.transport.pid
        if self.owner is not None and self.owner.output_paused:
            self.set_paused(True)

    # ProcessProtocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Feed ``stdin``; close stdin unless the command is interactive."""
        if self.spec.stdin:
            self.transport.write(self.spec.stdin)
        if not self.spec.interactive:
            self.close_stdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Capture stdout (fd 1) and stderr (fd 2)."""
        self.capture(childFD, data)

    def processExited(self, reason: Failure) -> None:
        """The main process is gone; give holders of its pipes PIPE_GRACE to let go."""
        self.exited = True
        if not self.finished and self._grace_call is None:
            self._grace_call = self.reactor.callLater(PIPE_GRACE, self._grace_expired)

    def _grace_expired(self) -> None:
        self._grace_call = None
        if self.finished:
            return
        if self._reading_paused:  # the gateway is not reading: do not drop unread output
            self._grace_call = self.reactor.callLater(PIPE_GRACE, self._grace_expired)
            return
        log.debug("{request_id}: pipes still open after exit, closing", request_id=self.request_id)
        force_close_pipes(self.transport)

    def processEnded(self, reason: Failure) -> None:
        """Build the result and hand it over."""
        if self._grace_call is not None:
            if self._grace_call.active():
                self._grace_call.cancel()
            self._grace_call = None
        self.finish(returncode_from(reason))

    # control -----------------------------------------------------------------------------

    def write_stdin(self, data: bytes) -> None:
        if self.stdin_open and data:
            self.transport.write(data)

    def close_stdin(self) -> None:
        if self.stdin_open:
            self.stdin_open = False
            self.transport.closeStdin()

    def set_paused(self, paused: bool) -> None:
        want = paused and self.spec.stream and not self.killed and not self.finished
        if want == self._reading_paused or self.transport is None:
            return
        self._reading_paused = want
        try:
            if want:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()
        except Exception:
            log.failure("could not pause/resume {request_id}", request_id=self.request_id)

    def interrupt(self) -> None:
        self.kill()

    def kill(self) -> None:
        """SIGKILL the command's whole process group (no-op once it has ended)."""
        if self.finished or self.pid is None:
            return
        self.killed = True
        kill_group(self.pid, leader_alive=not self.exited)
        # Read what is left (at most a pipe buffer each) so that the result comes promptly.
        self.set_paused(False)


# --------------------------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------------------------


class MarkerScanner:
    """Finds and strips the end-of-command marker in one of a session shell's streams.

    The marker is ``prefix`` (``\\x1eTGW:NONCE\\x1e`` on stderr), or ``prefix`` + digits +
    ``\\x1e`` (``prefix`` = ``\\x1eTGW:NONCE:``) on stdout.  A marker may be split across reads,
    so a tail that could be its beginning is held back until the next read.
    """

    MAX_CODE_CHARS = 12

    def __init__(self, prefix: bytes, with_code: bool) -> None:
        self.prefix = prefix
        self.with_code = with_code
        self.held = b""
        self.found = False
        self.code: int | None = None

    def feed(self, data: bytes) -> bytes:
        """Take one read; return the bytes that belong to the command's output."""
        if self.found:
            return b""  # after the marker: output of background jobs, between commands
        buf = self.held + data if self.held else data
        self.held = b""
        i = buf.find(self.prefix)
        if i >= 0:
            if not self.with_code:
                self.found = True
                return buf[:i]
            start = i + len(self.prefix)
            j = buf.find(b"\x1e", start)
            if j < 0 and len(buf) - start <= self.MAX_CODE_CHARS:
                self.held = buf[i:]
                return buf[:i]
            try:
                self.code = int(buf[start:j]) if j >= 0 else -1
            except ValueError:
                self.code = -1
            self.found = True
            return buf[:i]
        k = buf.find(b"\x1e", max(0, len(buf) - len(self.prefix) + 1))
        while k >= 0:
            if self.prefix.startswith(buf[k:]):
                self.held = buf[k:]
                return buf[:k]
            k = buf.find(b"\x1e", k + 1)
        return buf

    def take_held(self) -> bytes:
        held, self.held = self.held, b""
        return held


class SessionRun(RunBase):
    """A command run by a session's shell; finished when both end markers have been seen."""

    def __init__(
        self, spec: CommandSpec, owner: RunOwner, reactor: Any, config: AgentConfig
    ) -> None:
        super().__init__(spec, owner, reactor, config)
        self.session: Session | None = None
        nonce = secrets.token_hex(12).encode("ascii")
        self.nonce = nonce
        self.out_scan = MarkerScanner(b"\x1eTGW:" + nonce + b":", with_code=True)
        self.err_scan = MarkerScanner(b"\x1eTGW:" + nonce + b"\x1e", with_code=False)
        self.stdin_path: str | None = None
        self.running = False

    def script(self) -> bytes:
        """What is written to the shell's stdin to run this command (writes the stdin file)."""
        if self.spec.stdin is not None:
            fd, path = tempfile.mkstemp(prefix=".agent-stdin-")
            self.stdin_path = path
            # The shell reads it as the sandbox user (the agent may have a uid of its own).
            os.fchmod(fd, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self.spec.stdin)
            except BaseException:
                self._remove_stdin_file()
                raise
        steps = []
        if self.spec.cwd is not None:
            steps.append(f"builtin cd -- {shell_quote(self.spec.cwd)}")
        for key, value in self.spec.env.items():
            steps.append(f"builtin export {key}={shell_quote(value)}")
        steps.append(f"builtin eval {shell_quote(self.command)}")
        source = shell_quote(self.stdin_path) if self.stdin_path else "/dev/null"
        nonce = self.nonce.decode("ascii")
        text = (
            "{ " + " &&\n".join(steps) + f"\n}} < {source}\n"
            f"__tgw_rc=$?; builtin printf '\\036TGW:{nonce}:%d\\036' \"$__tgw_rc\"; "
            f"builtin printf '\\036TGW:{nonce}\\036' >&2\n"
        )
        return text.encode("utf-8")

    def begin(self) -> None:
        self.running = True
        self._begin()

    def on_shell_data(self, fd: int, data: bytes) -> bool:
        """Output of the shell while this command runs; True once both markers were seen."""
        if fd == 1:
            self.capture(1, self.out_scan.feed(data))
        elif fd == 2:
            self.capture(2, self.err_scan.feed(data))
        return self.out_scan.found and self.err_scan.found

    @property
    def marker_code(self) -> int:
        code = self.out_scan.code
        return code if code is not None else -1

    def complete(self, returncode: int, restarted: bool = False) -> None:
        """The command is over (markers seen, shell gone, session closed...)."""
        if self.finished:
            return
        # Bytes held back as a possible marker beginning were output after all.
        self.capture(1, self.out_scan.take_held())
        self.capture(2, self.err_scan.take_held())
        self.session_restarted = restarted
        self._remove_stdin_file()
        self.finish(returncode)

    def fail(self, message: str, code: str) -> None:
        self._remove_stdin_file()
        super().fail(message, code)

    def _remove_stdin_file(self) -> None:
        if self.stdin_path:
            try:
                os.unlink(self.stdin_path)
            except OSError:
                pass
            self.stdin_path = None

    def interrupt(self) -> None:
        if self.session is not None:
            self.session.interrupt(self)
        else:
            self.complete(KILLED_RETURNCODE)

    def set_paused(self, paused: bool) -> None:
        if self.session is not None and self.spec.stream:
            self.session.run_paused(self, paused)


class ShellProtocol(ProcessProtocol):
    """The process side of a session's shell; everything is forwarded to the Session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.session.shell_data(self, childFD, data)

    def processExited(self, reason: Failure) -> None:
        self.session.shell_exited(self, reason)

    def processEnded(self, reason: Failure) -> None:
        self.session.shell_ended(self, reason)


class Session:
    """A named persistent shell and the queue of commands it runs one at a time."""

    def __init__(self, name: str, manager: SessionManager) -> None:
        self.name = name
        self.manager = manager
        self.reactor = manager.reactor
        self.config = manager.config
        self.shell: ShellProtocol | None = None
        self.pid: int | None = None
        self.created_at = time.time()
        self.queue: deque[SessionRun] = deque()
        self.current: SessionRun | None = None
        self.closed = False
        self._reading_paused = False
        self._kill_call: Any = None
        self._kill_deadline = 0.0
        self._exit_grace_call: Any = None
        self._shell_exiting = False  # exited, pipes not closed yet: start nothing new

    # shell ---------------------------------------------------------------------------------

    def _spawn(self) -> None:
        shell = ShellProtocol(self)
        argv = self.config.session_argv()
        spawn(
            self.reactor,
            shell,
            argv,
            dict(self.config.child_env),
            self.config.cwd,
            self.config.use_posix_spawn,
            self.config.user_spawn,
        )
        self.shell = shell
        self.pid = shell.transport.pid
        self.created_at = time.time()
        self._reading_paused = False
        self._shell_exiting = False
        log.info("session {name}: shell started, pid {pid}", name=self.name, pid=self.pid)

    def _discard_shell(self) -> None:
        """Kill the shell's whole process group and forget it (its late events are ignored)."""
        shell, pid = self.shell, self.pid
        self.shell = None
        self.pid = None
        self._reading_paused = False
        self._cancel(self._exit_grace_call)
        self._exit_grace_call = None
        if shell is not None:
            kill_group(pid, leader_alive=not self._shell_exiting)
            force_close_pipes(shell.transport)

    def shell_data(self, shell: ShellProtocol, fd: int, data: bytes) -> None:
        if shell is not self.shell or self.current is None:
            return  # an old shell, or background output between commands
        run = self.current
        if run.on_shell_data(fd, data) and self.current is run:
            self._complete_current(run.marker_code)

    def shell_exited(self, shell: ShellProtocol, reason: Failure) -> None:
        if shell is not self.shell:
            return
        log.info(
            "session {name}: shell {pid} exited ({rc})",
            name=self.name,
            pid=self.pid,
            rc=returncode_from(reason),
        )
        self._shell_exiting = True
        if self._exit_grace_call is None:
            self._exit_grace_call = self.reactor.callLater(PIPE_GRACE, self._exit_grace, shell)

    def _exit_grace(self, shell: ShellProtocol) -> None:
        self._exit_grace_call = None
        if shell is not self.shell:
            return
        if self._reading_paused:
            self._exit_grace_call = self.reactor.callLater(PIPE_GRACE, self._exit_grace, shell)
            return
        force_close_pipes(shell.transport)

    def shell_ended(self, shell: ShellProtocol, reason: Failure) -> None:
        """The shell is gone and its pipes are closed: finish the current command with its
        exit status; later commands get a new shell."""
        if shell is not self.shell:
            return
        self._cancel(self._exit_grace_call)
        self._exit_grace_call = None
        self.shell = None
        self.pid = None
        self._reading_paused = False
        run = self.current
        if run is not None:
            self._complete_current(returncode_from(reason))
        else:
            self._advance()

    # commands ------------------------------------------------------------------------------

    def submit(self, run: SessionRun) -> None:
        run.session = self
        self.queue.append(run)
        self._advance()

    def _advance(self) -> None:
        """Start the next queued command if the shell is free."""
        if self.shell is not None and self._shell_exiting:
            return  # shell_ended() comes next and starts a new shell
        while self.current is None and self.queue and not self.closed:
            run = self.queue.popleft()
            if run.finished:
                continue
            try:
                if self.shell is None:
                    self._spawn()
                script = run.script()
            except Exception as e:
                log.failure("session {name}: could not start a command", name=self.name)
                run.fail(f"could not start the session command: {e}", "spawn_failed")
                continue
            assert self.shell is not None
            self.current = run
            run.begin()
            log.debug(
                "session {name}: started {request_id}: {command!r}",
                name=self.name,
                request_id=run.request_id,
                command=run.command[:200],
            )
            self.shell.transport.write(script)
            if run.spec.stream and run.owner is not None and run.owner.output_paused:
                self._set_reading_paused(True)
        if self.current is None and not self.queue and self.shell is None:
            self.manager.forget(self)

    def _complete_current(self, returncode: int, restarted: bool = False) -> None:
        run = self.current
        self.current = None
        self._stop_kill_loop()
        self._set_reading_paused(False)
        if run is not None:
            run.complete(returncode, restarted)
        self._advance()

    def interrupt(self, run: SessionRun) -> None:
        """Timeout / cancel / output limit of ``run``."""
        if run is not self.current:
            if run in self.queue:
                self.queue.remove(run)
                run.complete(-1)  # never started
            return
        run.killed = True
        self._set_reading_paused(False)  # the markers must get through
        if self._kill_call is None:
            self._kill_deadline = time.monotonic() + SESSION_KILL_WINDOW
            self._kill_tick()

    def _kill_tick(self) -> None:
        self._kill_call = None
        if self.current is None or self.shell is None:
            return
        n = kill_shell_descendants(self.pid)
        log.debug("session {name}: killed {n} processes", name=self.name, n=n)
        if time.monotonic() >= self._kill_deadline:
            self._restart()
            return
        self._kill_call = self.reactor.callLater(SESSION_KILL_TICK, self._kill_tick)

    def _stop_kill_loop(self) -> None:
        self._cancel(self._kill_call)
        self._kill_call = None

    def _restart(self) -> None:
        """The shell did not come back: replace it with a fresh one under the same name."""
        log.info(
            "session {name}: shell {pid} unresponsive, restarting", name=self.name, pid=self.pid
        )
        self._discard_shell()
        try:
            self._spawn()
        except Exception:
            log.failure("session {name}: could not restart the shell", name=self.name)
        self._complete_current(KILLED_RETURNCODE, restarted=True)

    def close(self) -> None:
        """close_session: kill the shell, cancel the running and queued commands."""
        self.closed = True
        self._stop_kill_loop()
        self._discard_shell()
        runs = ([self.current] if self.current is not None else []) + list(self.queue)
        self.current = None
        self.queue.clear()
        for run in runs:
            run.cancelled = True
            if run.running:
                run.killed = True
            run.complete(KILLED_RETURNCODE if run.running else -1)
        self.manager.forget(self)

    # backpressure --------------------------------------------------------------------------

    def run_paused(self, run: SessionRun, paused: bool) -> None:
        if run is self.current and not run.killed:
            self._set_reading_paused(paused)

    def _set_reading_paused(self, paused: bool) -> None:
        if self.shell is None or paused == self._reading_paused:
            return
        self._reading_paused = paused
        try:
            if paused:
                self.shell.transport.pauseProducing()
            else:
                self.shell.transport.resumeProducing()
        except Exception:
            log.failure("session {name}: could not pause/resume", name=self.name)

    # info ----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        cwd: str | None = None
        if self.pid:
            try:
                cwd = self.config.user_spawn.readlink(f"/proc/{self.pid}/cwd")
            except OSError:
                cwd = None
        return {
            "session": self.name,
            "busy": self.current is not None,
            "queued": len(self.queue),
            "pid": self.pid,
            "created_at": self.created_at,
            "cwd": cwd,
        }

    @staticmethod
    def _cancel(call: Any) -> None:
        if call is not None and call.active():
            call.cancel()


class SessionManager:
    """The agent's sessions by name (shared by all connections)."""

    def __init__(self, config: AgentConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.sessions: dict[str, Session] = {}

    def submit(self, name: str, run: SessionRun) -> bool:
        """Queue ``run`` in session ``name`` (created on first use); False if too many."""
        session = self.sessions.get(name)
        if session is None:
            if len(self.sessions) >= self.config.max_sessions:
                return False
            session = Session(name, self)
            self.sessions[name] = session
        session.submit(run)
        return True

    def forget(self, session: Session) -> None:
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]

    def close(self, name: str) -> bool:
        session = self.sessions.get(name)
        if session is None:
            return False
        session.close()
        return True

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in sorted(self.sessions.values(), key=lambda s: s.name)]

    def kill_all(self) -> None:
        for session in list(self.sessions.values()):
            kill_group(session.pid)


# --------------------------------------------------------------------------------------------
# the WebSocket
# --------------------------------------------------------------------------------------------


@implementer(IPushProducer)
class OutputPauser:
    """Registered on the WebSocket's TCP transport: a full send buffer pauses the pipes of the
    connection's streamed commands, a drained one resumes them."""

    def __init__(self, conn: AgentProtocol) -> None:
        self.conn = conn

    def pauseProducing(self) -> None:
        self.conn.set_output_paused(True)

    def resumeProducing(self) -> None:
        self.conn.set_output_paused(False)

    def stopProducing(self) -> None:
        pass  # the connection is lost: onClose deals with the runs


class AgentProtocol(WebSocketServerProtocol, RunOwner):
    """One gateway connection: runs the commands it sends, replies with their results."""

    factory: AgentFactory

    def __init__(self) -> None:
        super().__init__()
        # Careful with names: Autobahn's protocol already uses e.g. is_open / is_closed
        # (Deferreds) and Twisted's uses connected.
        self.runs: dict[str, RunBase] = {}
        self.agent_open = False
        self.output_paused = False
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
        """Register the connection and hook its send buffer up for backpressure."""
        self.agent_open = True
        self.factory.connections.add(self)
        transport = self.transport
        try:
            # Behind WebSocketResource the transport came from twisted.web's HTTPChannel,
            # which registered itself as the transport's producer; a transport has only one.
            if getattr(transport, "producer", None) is not None:
                transport.unregisterProducer()
            transport.registerProducer(OutputPauser(self), True)
            # Pause commands only when this much is unsent (Twisted's 64 KiB default pauses
            # and resumes a stream constantly); memory stays bounded all the same.
            transport.bufferSize = 512 * 1024
        except Exception:
            log.failure("could not register for backpressure on {peer}", peer=self.peer_label)
        try:
            transport.setTcpNoDelay(True)
        except Exception:
            pass
        log.info("connection open from {peer}", peer=self.peer_label)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Kill this connection's plain commands; leave its session commands running."""
        try:
            was_open, self.agent_open = self.agent_open, False
            self.factory.connections.discard(self)
            running = list(self.runs.values())
            self.runs.clear()
            killed = 0
            for run in running:
                run.detach()
                if isinstance(run, CommandRun):
                    run.kill()
                    killed += 1
            if was_open:  # refused handshakes were logged in onConnect already
                log.info(
                    "connection closed from {peer} (code={code}, clean={clean}), killed {n}",
                    peer=self.peer_label,
                    code=code,
                    clean=wasClean,
                    n=killed,
                )
        except Exception:
            log.failure("error while closing connection from {peer}", peer=self.peer_label)

    def set_output_paused(self, paused: bool) -> None:
        """Backpressure from the TCP transport."""
        if paused == self.output_paused:
            return
        self.output_paused = paused
        log.debug(
            "output {state} for {peer}",
            state="paused" if paused else "resumed",
            peer=self.peer_label,
        )
        for run in list(self.runs.values()):
            try:
                run.set_paused(paused)
            except Exception:
                log.failure("could not pause/resume {request_id}", request_id=run.request_id)

    # messages ----------------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Handle one message; never raise."""
        try:
            self._handle_message(payload, isBinary)
        except Exception:
            log.failure("error while handling a message from {peer}", peer=self.peer_label)
            self.send_message(
                error_result(
                    None, None, "internal agent error handling the message", "internal_error"
                )
            )

    def _handle_message(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.send_message(
                error_result(
                    None,
                    None,
                    "binary messages are not supported; send JSON text",
                    "binary_message",
                )
            )
            return
        try:
            msg = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError:
            self.send_message(
                error_result(None, None, "message is not valid UTF-8", "invalid_json")
            )
            return
        except (ValueError, RecursionError) as e:
            self.send_message(
                error_result(None, None, f"message is not valid JSON: {e}", "invalid_json")
            )
            return
        if not isinstance(msg, dict):
            self.send_message(
                error_result(None, None, "message must be a JSON object", "invalid_message")
            )
            return

        mtype = msg.get("type")
        if mtype is None or mtype == "command":
            self._handle_command(msg)
        elif mtype == "cancel":
            self._handle_cancel(msg)
        elif mtype == "stdin":
            self._handle_stdin(msg)
        elif mtype == "list_sessions":
            self._handle_list_sessions(msg)
        elif mtype == "close_session":
            self._handle_close_session(msg)
        else:
            shown = mtype if isinstance(mtype, str) else type(mtype).__name__
            self.send_message(
                control_error(
                    msg.get("request_id"), f"unknown message type {shown!r:.100}", "unknown_type"
                )
            )

    def _handle_command(self, msg: dict[str, Any]) -> None:
        config = self.factory.config
        try:
            spec = parse_command(msg, config)
        except MessageError as e:
            self.send_message(error_result(e.request_id, e.command, e.message, e.code))
            return
        rid = spec.request_id
        if rid in self.runs:
            self.send_message(
                error_result(
                    rid,
                    spec.command,
                    f"request_id {rid!r} is already running",
                    "duplicate_request_id",
                )
            )
            return
        if len(self.runs) >= config.max_running:
            self.send_message(
                error_result(
                    rid,
                    spec.command,
                    f"too many commands on this connection (limit {config.max_running})",
                    "too_many_commands",
                )
            )
            return
        if spec.session is not None:
            self._start_session_command(spec)
        else:
            self._start_command(spec)

    def _start_command(self, spec: CommandSpec) -> None:
        """Spawn one command; its result is sent when it ends."""
        run = CommandRun(spec, self, self.factory.reactor, self.factory.config)
        self.runs[spec.request_id] = run
        try:
            run.start()
        except Exception as e:
            log.failure("could not start request {request_id}", request_id=spec.request_id)
            run.detach()
            run.finished = True
            run._stop_timers()
            self.runs.pop(spec.request_id, None)
            self.send_message(
                error_result(
                    spec.request_id, spec.command, f"could not start command: {e}", "spawn_failed"
                )
            )
            return
        log.debug(
            "started {request_id} pid={pid}: {command!r}",
            request_id=spec.request_id,
            pid=run.pid,
            command=spec.command[:200],
        )

    def _start_session_command(self, spec: CommandSpec) -> None:
        assert spec.session is not None
        run = SessionRun(spec, self, self.factory.reactor, self.factory.config)
        self.runs[spec.request_id] = run
        if not self.factory.sessions.submit(spec.session, run):
            self.runs.pop(spec.request_id, None)
            self.send_message(
                error_result(
                    spec.request_id,
                    spec.command,
                    f"too many sessions (limit {self.factory.config.max_sessions})",
                    "too_many_sessions",
                )
            )

    def _find_run(self, msg: dict[str, Any]) -> RunBase | None:
        """The running command a control message names; replies the error if there is none."""
        rid = msg.get("request_id")
        if not isinstance(rid, str):
            self.send_message(
                control_error(None, "'request_id' must be a string", "invalid_request_id")
            )
            return None
        run = self.runs.get(rid)
        if run is None:
            self.send_message(
                control_error(
                    rid, f"no running command with request_id {rid!r:.300}", "unknown_request"
                )
            )
        return run

    def _handle_cancel(self, msg: dict[str, Any]) -> None:
        run = self._find_run(msg)
        if run is not None:
            log.debug("cancel {request_id}", request_id=run.request_id)
            run.cancel()

    def _handle_stdin(self, msg: dict[str, Any]) -> None:
        data = msg.get("data")
        eof = msg.get("eof")
        rid = msg.get("request_id")
        if data is not None and not (isinstance(data, str) and _utf8_or_none(data) is not None):
            self.send_message(
                control_error(rid, "'data' must be a string (valid Unicode)", "invalid_stdin")
            )
            return
        if eof is not None and not isinstance(eof, bool):
            self.send_message(control_error(rid, "'eof' must be a boolean", "invalid_stdin"))
            return
        run = self._find_run(msg)
        if run is None:
            return
        if not isinstance(run, CommandRun) or not run.spec.interactive:
            self.send_message(
                control_error(
                    run.request_id,
                    "the command was not started with 'interactive'",
                    "not_interactive",
                )
            )
            return
        if not run.stdin_open:
            if data or not eof:
                self.send_message(
                    control_error(run.request_id, "stdin is already closed", "stdin_closed")
                )
            return
        if data:
            run.write_stdin(data.encode("utf-8"))
        if eof:
            run.close_stdin()

    def _handle_list_sessions(self, msg: dict[str, Any]) -> None:
        rid = msg.get("request_id")
        if rid is not None and not isinstance(rid, str):
            self.send_message(
                control_error(None, "'request_id' must be a string", "invalid_request_id")
            )
            return
        self.send_message(
            {"type": "sessions", "request_id": rid, "sessions": self.factory.sessions.describe()}
        )

    def _handle_close_session(self, msg: dict[str, Any]) -> None:
        rid = msg.get("request_id")
        name = msg.get("session")
        if rid is not None and not isinstance(rid, str):
            self.send_message(
                control_error(None, "'request_id' must be a string", "invalid_request_id")
            )
            return
        if not (isinstance(name, str) and SESSION_NAME_RE.fullmatch(name)):
            self.send_message(
                control_error(
                    rid, "'session' must be 1-64 characters of [A-Za-z0-9_.-]", "invalid_session"
                )
            )
            return
        if not self.factory.sessions.close(name):
            self.send_message(control_error(rid, f"no session {name!r}", "unknown_session"))
            return
        log.info("session {name} closed by {peer}", name=name, peer=self.peer_label)
        self.send_message({"type": "session_closed", "session": name, "request_id": rid})

    # RunOwner ------------------------------------------------------------------------------

    def run_done(self, run: RunBase, message: dict[str, Any]) -> None:
        if self.runs.get(run.request_id) is run:
            del self.runs[run.request_id]
        self.send_message(message)

    def send_message(self, message: dict[str, Any]) -> None:
        """Send one JSON text message, if the connection is still open."""
        if not self.agent_open:
            return
        try:
            self.sendMessage(encode_message(message), isBinary=False)
        except Exception:
            log.failure(
                "could not send a message for {request_id}", request_id=message.get("request_id")
            )


def _utf8_or_none(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


class AgentFactory(WebSocketServerFactory):
    """Builds AgentProtocols; holds the config, the reactor, the open connections and the
    sessions."""

    protocol = AgentProtocol

    def __init__(self, config: AgentConfig, reactor: Any) -> None:
        super().__init__()  # no URL: no Host/port check (the host port is a published one)
        self.config = config
        self.reactor = reactor
        self.connections: set[AgentProtocol] = set()
        self.sessions = SessionManager(config, reactor)
        # Results can be large (two capped buffers, JSON-escaped); no payload limits here.
        # Bounded input: the gateway enforces its own (smaller) limit on clients; this one
        # protects the agent from anything else that learns the secret.
        self.setProtocolOptions(
            maxFramePayloadSize=AGENT_MAX_MESSAGE, maxMessagePayloadSize=AGENT_MAX_MESSAGE
        )

    def kill_all(self) -> None:
        """Kill every running command and every session shell (at reactor shutdown)."""
        for conn in list(self.connections):
            for run in list(conn.runs.values()):
                if isinstance(run, CommandRun):
                    run.kill()
        self.sessions.kill_all()


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


class AgentWebSocketResource(WebSocketResource):
    """WebSocketResource that also stops the HTTP channel's idle timer.

    Autobahn takes the transport over from twisted.web's HTTPChannel, but the channel's
    TimeoutMixin timer keeps running; when it fires (Site.timeOut, 12 h) it would use the
    channel's transport, which Autobahn set to None.
    """

    def render(self, request: Request) -> Any:
        try:
            request.channel.setTimeout(None)
        except Exception:
            pass
        return super().render(request)


class QuietSite(Site):
    """A Site without access logging (health probes would flood the log)."""

    def log(self, request: Request) -> None:
        pass


def build_site(factory: AgentFactory) -> Site:
    """Root resource with /healthz and /agent."""
    root = Resource()
    root.putChild(b"healthz", Healthz())
    root.putChild(b"agent", AgentWebSocketResource(factory))
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
        if config.unix_socket:
            # Sandboxes without a network: the gateway reaches the agent through a socket in
            # a directory it bind-mounts into the container.
            if os.path.exists(config.unix_socket):
                os.unlink(config.unix_socket)
            reactor.listenUNIX(config.unix_socket, site, mode=0o600)
            where = config.unix_socket
        else:
            reactor.listenTCP(config.port, site, interface="0.0.0.0")
            where = f"0.0.0.0:{config.port}"
    except (ierror.CannotListenError, OSError) as e:
        print(f"agent: cannot listen: {e}", file=sys.stderr, flush=True)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", factory.kill_all)
    log.info("agent listening on {where} ({config!r})", where=where, config=config)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
