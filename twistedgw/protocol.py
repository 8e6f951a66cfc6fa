"""The twistedgw WebSocket protocol: one module for the gateway and the in-container agent.

PROTOCOL.md at the top of the repository is the spec of record; this module implements it.
It is **standard library only** (no attrs, no Twisted, nothing third-party): the image build
copies it into the sandbox image, where the agent imports it as ``twistedgw.protocol`` on
Debian bookworm's Python 3.11 next to an empty ``twistedgw/__init__.py``.

What is here:

* limits that are part of the protocol (request id and cwd lengths, env names and entry cap,
  session names, echo cap, message size defaults) and the per-end policy ``Limits``
  (default and maximum ``timeout``): each end passes its own;
* every ``error_code`` (``ERROR_CODES``) and WebSocket close code;
* parsing and validation: ``parse_message`` (bytes in) / ``parse_object`` (decoded JSON in)
  return one of the message records ``Command``, ``Cancel``, ``Stdin``, ``ListSessions``,
  ``CloseSession``, or raise ``ProtocolError``, whose ``reply()`` is the error message to send;
* builders for what the agent sends back (``result_message``, ``output_message``,
  ``sessions_message``, ``session_closed_message``) and for error replies
  (``command_error``, ``control_error``);
* ``encode``: JSON for a text frame, always valid UTF-8, never raises on a protocol message.

Rules this module makes the only ones (they used to differ between gateway and agent):

* env names match ``ENV_NAME_RE`` and an ``env`` object has at most ``MAX_ENV_ENTRIES``
  entries, for the creation body's ``env`` and for a command's ``env`` alike
  (``validate_env``);
* a ``timeout`` above ``Limits.max_timeout`` is an ``invalid_timeout`` error, never clamped;
  numbers are compared without converting to float first, so ``10**400`` is an error reply,
  not an ``OverflowError``;
* a command-like error reply carries the seed's result fields plus ``type: "error"``,
  ``error_code``, ``duration_ms: 0.0`` and ``truncated: false``; a control error is the short
  form ``{"type": "error", "request_id", "error", "error_code"}``;
* lone surrogates (``"\\ud800"`` in the JSON) are refused by validation in every field that is
  used (``invalid_command``, ``invalid_env``, ...), and ``encode`` replaces any that reach it
  (an echoed field, an extra key) with U+FFFD, so every message gets a JSON reply;
* an error reply echoes at most ``MAX_ECHO_LENGTH`` characters of ``command`` (then adds
  ``command_truncated: true``); a result echoes the full command, as the seed does.

Use, at either end (``send`` writes one text frame)::

    limits = protocol.Limits(default_timeout=900.0, max_timeout=3600.0)  # this end's policy
    try:
        message = protocol.parse_message(payload, is_binary, limits)
    except protocol.ProtocolError as e:
        send(protocol.encode(e.reply()))
        return
    if isinstance(message, protocol.Command) and message.request_id in running:
        # a check only this end can make: the message's own error, in the right shape
        send(protocol.encode(message.error("duplicate_request_id", "...").reply()))
    ...
    send(protocol.encode(protocol.result_message(request_id, command, returncode, ...)))

The gateway forwards ``message.to_wire()``; the agent acts on the record's fields.

Adding a message type (attach, kill, pty, resize, ...): write a frozen record with ``TYPE``,
``request_id``, ``to_wire()`` and a ``_parse_<type>(obj)`` function, and add it to
``CONTROL_PARSERS``; nothing else changes.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, ClassVar, TypeGuard

# ------------------------------------------------------------------------------------------
# limits that are part of the protocol
# ------------------------------------------------------------------------------------------

#: Longest ``request_id`` accepted (it is echoed back, so it is bounded).
MAX_REQUEST_ID_LENGTH = 256
#: Longest ``cwd`` accepted.
MAX_CWD_LENGTH = 4096
#: Most variables in one ``env`` object (creation body and command alike).
MAX_ENV_ENTRIES = 256
#: Longest env variable name.
MAX_ENV_NAME_LENGTH = 256
#: Env variable names: a shell variable name (so it also works in a session's ``export``).
ENV_NAME_RE = re.compile(rf"\A[A-Za-z_][A-Za-z0-9_]{{0,{MAX_ENV_NAME_LENGTH - 1}}}\Z")
#: Session names: 1-64 of letters, digits, ``_``, ``.`` and ``-``.
SESSION_NAME_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
#: Most characters of an offending field echoed in an error reply.
MAX_ECHO_LENGTH = 256
#: Most characters of an error reply's ``error`` text.
MAX_ERROR_TEXT_LENGTH = 1024
#: What is appended to an echoed field that was cut to ``MAX_ECHO_LENGTH``.
ECHO_CUT_MARKER = "\u2026"
#: Default largest client -> gateway message (``--max-message-size``), in bytes.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: Largest gateway -> agent message the agent accepts, in bytes.
AGENT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: Default command ``timeout`` in seconds when an end configures none.
DEFAULT_TIMEOUT = 900.0
#: Default largest ``timeout`` in seconds when an end configures none.
DEFAULT_MAX_TIMEOUT = 3600.0
#: ``returncode`` of a command that was never run (and of every error reply).
NOT_RUN_RETURNCODE = -1
#: ``on_disconnect`` values: run on when the connection closes (default), or be killed.
ON_DISCONNECT_CONTINUE = "continue"
ON_DISCONNECT_KILL = "kill"
ON_DISCONNECT_VALUES = (ON_DISCONNECT_CONTINUE, ON_DISCONNECT_KILL)
#: Output streams of a process, in the order replies list them.
STREAMS = ("stdout", "stderr")
#: The one output stream of a process on a pseudo-terminal (``pty``; issue 16).
PTY_STREAM = "pty"
#: Every stream an ``attach`` may name in ``since``.
LOG_STREAMS = (*STREAMS, PTY_STREAM)
#: A terminal's ``cols`` and ``rows`` are integers in this range.
MIN_TERMINAL_SIZE = 1
MAX_TERMINAL_SIZE = 4096
#: Binary WebSocket frames (opt-in, PTYs only), told apart by their first byte: terminal
#: output (agent -> client: kind, u32 pid, u64 offset, bytes) and terminal input
#: (client -> agent: kind, u32 pid, bytes); integers are big-endian. See PROTOCOL.md.
BINARY_OUTPUT = 0x01
BINARY_STDIN = 0x02
BINARY_OUTPUT_HEAD = struct.Struct("!BIQ")
BINARY_STDIN_HEAD = struct.Struct("!BI")
#: Signals ``signal`` may send (names without ``SIG``), with their numbers on Linux.
SIGNALS: Mapping[str, int] = MappingProxyType(
    {
        "HUP": 1,
        "INT": 2,
        "QUIT": 3,
        "KILL": 9,
        "USR1": 10,
        "USR2": 12,
        "TERM": 15,
        "CONT": 18,
        "STOP": 19,
    }
)
#: Longest ``last_event_id`` accepted.
MAX_EVENT_ID_LENGTH = 64


@dataclass(frozen=True)
class Limits:
    """One end's policy for command messages (the gateway's options, the agent's env)."""

    default_timeout: float = DEFAULT_TIMEOUT
    max_timeout: float = DEFAULT_MAX_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("default_timeout", "max_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Limits.{name} must be a number")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Limits.{name} must be finite and greater than 0")
        if self.default_timeout > self.max_timeout:
            raise ValueError("Limits.default_timeout must not exceed max_timeout")


#: The policy when an end sets nothing.
DEFAULT_LIMITS = Limits()

# ------------------------------------------------------------------------------------------
# codes
# ------------------------------------------------------------------------------------------

#: Every ``error_code`` either end may send, with what it means. PROTOCOL.md lists the same.
ERROR_CODES: Mapping[str, str] = MappingProxyType(
    {
        # the message itself
        "binary_message": "a binary frame; only JSON text frames are accepted",
        "invalid_json": "not UTF-8, not JSON, or nested too deeply",
        "invalid_message": "JSON, but not an object",
        "unknown_type": "'type' is not one of the message types",
        # command fields
        "invalid_request_id": "'request_id' is not a string of at most 256 characters "
        "(or is missing where required)",
        "missing_command": "a command message without 'command'",
        "invalid_command": "'command' is not a string, or holds NUL or a lone surrogate",
        "invalid_timeout": "'timeout' is not a number > 0, or is above the maximum",
        "invalid_cwd": "'cwd' is not a usable directory path",
        "invalid_env": "'env' is not an object of variable names to strings",
        "invalid_stdin": "'stdin' (or a stdin message's 'data'/'eof') has the wrong type",
        "invalid_stream": "'stream' is not true or false",
        "invalid_interactive": "'interactive' is not true or false",
        "invalid_session": "'session' is not 1-64 of A-Za-z0-9_.-",
        "unsupported": "a combination that is not supported ('interactive' with 'session')",
        # process handles (issue 14)
        "invalid_ack": "'ack' is not true or false",
        "invalid_background": "'background' is not true or false",
        "invalid_yield_after": "'yield_after' is not a number > 0, or is above the maximum",
        "invalid_on_disconnect": "'on_disconnect' is not 'continue' or 'kill'",
        "invalid_pid": "'pid' is not a positive integer, or neither 'pid' nor 'request_id' given",
        "invalid_since": "'since' is not an offset >= 0 (or an object of them per stream)",
        "invalid_signal": "'signal' is not a signal name the agent sends",
        "invalid_event_id": "'last_event_id' is not a string of at most 64 characters",
        # state at the agent
        "duplicate_request_id": "a command with this 'request_id' is already running",
        "too_many_commands": "the connection already runs its maximum of commands",
        "too_many_sessions": "the sandbox already has its maximum of sessions",
        "spawn_failed": "the command could not be started",
        "unknown_request": "no running command has this 'request_id'",
        "not_interactive": "stdin sent to a command not started with 'interactive'",
        "stdin_closed": "stdin sent after eof",
        "unknown_session": "no session of that name",
        "unknown_process": "no process (running or kept) has this 'pid' or 'request_id'",
        "not_running": "the process has already exited",
        # pseudo-terminals (issue 16)
        "invalid_size": "'cols'/'rows' are not integers from 1 to 4096",
        "unknown_field": "a pty or resize message with a field it does not have",
        "invalid_binary": "'binary' or 'takeover' is not true or false, or a binary frame "
        "is not a terminal input frame",
        "not_a_pty": "resize, takeover, binary output or terminal input for a process that "
        "is not on a pseudo-terminal",
        "not_writer": "terminal input or resize from a client while another took the PTY over",
        # either end
        "agent_unavailable": "the gateway's connection to the sandbox agent is closed",
        "agent_restarted": "the sandbox agent restarted while the command was in flight; "
        "its result is lost",
        "session_lost": "the session was lost when the sandbox agent restarted (said once)",
        "invalid_path": "a watch's 'path' is empty, holds NUL or is too long "
        "(or 'recursive' is not true or false)",
        "too_many_watches": "the connection already has its maximum of watches",
        "watch_failed": "the path cannot be watched (missing, not permitted, no inotify)",
        "unknown_watch": "no watch has this 'request_id'",
        "paused": "the sandbox is paused (POST /sandboxes/{id}/pause); resume it first",
        "internal_error": "a bug while handling the message (logged with a traceback)",
    }
)

#: Close codes the gateway sends its clients.
CLOSE_GOING_AWAY = 1001
#: A client abusing the framing (too many frames for one message).
CLOSE_POLICY = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_AGENT_LOST = 1011
#: The gateway holds too many partial messages overall (try again later).
CLOSE_TRY_AGAIN = 1013
CLOSE_SANDBOX_REMOVED = 4000
CLOSE_AGENT_RESTARTED = 4001

# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """A message that cannot be acted on; ``reply()`` is the error message to send back.

    ``control`` selects the reply's shape: the short control form, or (for a command, or a
    message whose kind is unknown to be a control message) the seed's result shape.
    """

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        command: str | None = None,
        control: bool = False,
    ) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.command = command
        self.control = control

    def reply(self, now: datetime | None = None) -> dict[str, Any]:
        """The error reply for this failure (see ``command_error`` and ``control_error``)."""
        if self.control:
            return control_error(self.request_id, self.message, self.code)
        return command_error(self.request_id, self.command, self.message, self.code, now)


# ------------------------------------------------------------------------------------------
# messages (client -> gateway -> agent)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command message: run ``command`` with ``bash -c``. Defaults are left off the wire."""

    TYPE: ClassVar[str] = "command"

    request_id: str
    command: str
    timeout: float
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    stdin: str | None = None
    stream: bool = False
    interactive: bool = False
    session: str | None = None
    # process handles (issue 14): all off by default, so the seed's behaviour is unchanged
    ack: bool = False
    background: bool = False
    yield_after: float | None = None
    on_disconnect: str = ON_DISCONNECT_CONTINUE

    def to_wire(self) -> dict[str, Any]:
        """The message the gateway forwards to the agent (no ``type``, as the seed's)."""
        wire: dict[str, Any] = {
            "command": self.command,
            "request_id": self.request_id,
            "timeout": self.timeout,
        }
        if self.cwd is not None:
            wire["cwd"] = self.cwd
        if self.env:
            wire["env"] = dict(self.env)
        if self.stdin is not None:
            wire["stdin"] = self.stdin
        if self.stream:
            wire["stream"] = True
        if self.interactive:
            wire["interactive"] = True
        if self.session is not None:
            wire["session"] = self.session
        if self.ack:
            wire["ack"] = True
        if self.background:
            wire["background"] = True
        if self.yield_after is not None:
            wire["yield_after"] = self.yield_after
        if self.on_disconnect != ON_DISCONNECT_CONTINUE:
            wire["on_disconnect"] = self.on_disconnect
        return wire

    def error(self, code: str, message: str) -> ProtocolError:
        """A failure of this command (its reply echoes ``request_id`` and ``command``)."""
        return ProtocolError(code, message, self.request_id, self.command)


class ControlErrors:
    """Base of the control messages (``ControlMessage`` below, but for ``TerminalInput``): a
    failure of one is a control error (the short form) that echoes its ``request_id``. Not a
    dataclass: the subclasses declare their fields."""

    request_id: str | None

    def error(self, code: str, message: str) -> ProtocolError:
        return ProtocolError(code, message, self.request_id, control=True)


@dataclass(frozen=True)
class Cancel(ControlErrors):
    """Kill the running command ``request_id``."""

    TYPE: ClassVar[str] = "cancel"

    request_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "request_id": self.request_id}


@dataclass(frozen=True)
class Stdin(ControlErrors):
    """Write ``data`` to an interactive command's stdin; close it after if ``eof``."""

    TYPE: ClassVar[str] = "stdin"

    request_id: str
    data: str = ""
    eof: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "request_id": self.request_id,
            "data": self.data,
            "eof": self.eof,
        }


@dataclass(frozen=True)
class ListSessions(ControlErrors):
    """Ask for the sandbox's sessions."""

    TYPE: ClassVar[str] = "list_sessions"

    request_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "request_id": self.request_id}


@dataclass(frozen=True)
class CloseSession(ControlErrors):
    """Kill the session shell ``session``."""

    TYPE: ClassVar[str] = "close_session"

    session: str
    request_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "request_id": self.request_id, "session": self.session}


# process handles (issue 14) ----------------------------------------------------------------


@dataclass(frozen=True)
class Attach(ControlErrors):
    """Replay a process's output from ``since`` (per stream), stream it live, then its result.

    The process is named by ``pid`` or, failing that, by ``request_id`` (the most recent
    process started with it).
    """

    TYPE: ClassVar[str] = "attach"

    pid: int | None = None
    request_id: str | None = None
    since: Mapping[str, int] = field(default_factory=lambda: {name: 0 for name in LOG_STREAMS})
    #: PTYs only: this connection becomes the only one whose input and resizes are taken.
    takeover: bool = False
    #: PTYs only: output comes as binary frames (``BINARY_OUTPUT``).
    binary: bool = False

    def to_wire(self) -> dict[str, Any]:
        # ``pty`` only when it is not 0: an agent of an older image refuses that key.
        since = {name: offset for name, offset in self.since.items() if name in STREAMS or offset}
        wire: dict[str, Any] = {
            "type": self.TYPE,
            "pid": self.pid,
            "request_id": self.request_id,
            "since": since,
        }
        if self.takeover:
            wire["takeover"] = True
        if self.binary:
            wire["binary"] = True
        return wire


@dataclass(frozen=True)
class Processes(ControlErrors):
    """List the running and recently finished processes."""

    TYPE: ClassVar[str] = "processes"

    request_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "request_id": self.request_id}


@dataclass(frozen=True)
class Signal(ControlErrors):
    """Send ``signal`` to the process group of the process ``pid`` (or ``request_id``)."""

    TYPE: ClassVar[str] = "signal"

    signal: str
    pid: int | None = None
    request_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "pid": self.pid,
            "request_id": self.request_id,
            "signal": self.signal,
        }


@dataclass(frozen=True)
class SubscribeEvents(ControlErrors):
    """Stream the agent's process events (``started``, ``exited``) after ``last_event_id``."""

    TYPE: ClassVar[str] = "subscribe_events"

    last_event_id: str | None = None
    request_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "request_id": self.request_id,
            "last_event_id": self.last_event_id,
        }


# pseudo-terminals (issue 16) ---------------------------------------------------------------


@dataclass(frozen=True)
class Pty(ControlErrors):
    """Start ``command`` (None: a login shell) on a new pseudo-terminal of ``cols`` x ``rows``."""

    TYPE: ClassVar[str] = "pty"

    request_id: str
    cols: int
    rows: int
    command: str | None = None
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    binary: bool = False

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "type": self.TYPE,
            "request_id": self.request_id,
            "cols": self.cols,
            "rows": self.rows,
        }
        if self.command is not None:
            wire["command"] = self.command
        if self.cwd is not None:
            wire["cwd"] = self.cwd
        if self.env:
            wire["env"] = dict(self.env)
        if self.binary:
            wire["binary"] = True
        return wire


@dataclass(frozen=True)
class Resize(ControlErrors):
    """Set the window size of the PTY process ``pid`` (or ``request_id``)."""

    TYPE: ClassVar[str] = "resize"

    cols: int
    rows: int
    pid: int | None = None
    request_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "pid": self.pid,
            "request_id": self.request_id,
            "cols": self.cols,
            "rows": self.rows,
        }


@dataclass(frozen=True)
class TerminalInput:
    """A binary frame of terminal input: ``data`` for the PTY process ``pid``."""

    TYPE: ClassVar[str] = "binary stdin"

    pid: int
    data: bytes
    request_id: None = None

    def to_frame(self) -> bytes:
        return BINARY_STDIN_HEAD.pack(BINARY_STDIN, self.pid) + self.data

    def to_wire(self) -> dict[str, Any]:  # pragma: no cover - it travels as a binary frame
        raise TypeError("terminal input travels as a binary frame (to_frame)")

    def error(self, code: str, message: str) -> ProtocolError:
        return ProtocolError(code, f"{message} (binary frame for pid {self.pid})", control=True)


def binary_output_frame(pid: int, offset: int, data: bytes) -> bytes:
    """A binary frame of terminal output: ``data``, at byte ``offset`` of process ``pid``."""
    return BINARY_OUTPUT_HEAD.pack(BINARY_OUTPUT, pid, offset) + data


def parse_terminal_input(payload: bytes) -> TerminalInput:
    """A binary frame from a client: only terminal input frames are accepted."""
    if len(payload) < BINARY_STDIN_HEAD.size or payload[0] != BINARY_STDIN:
        raise ProtocolError(
            "binary_message",
            "binary messages are only terminal input frames (0x02, u32 pid, bytes); send JSON text",
        )
    _kind, pid = BINARY_STDIN_HEAD.unpack_from(payload)
    if not 0 < pid < 1 << 31:
        raise ProtocolError("invalid_pid", "a terminal input frame's pid must be positive")
    return TerminalInput(pid, bytes(payload[BINARY_STDIN_HEAD.size :]))


# -- watching files (issue 15): watch / unwatch, answered by watching / fs_event / unwatched --

#: Longest path a ``watch`` may name.
MAX_WATCH_PATH_LENGTH = 4096
#: Kinds of ``fs_event``.
FS_EVENTS = ("created", "modified", "deleted", "moved")


@dataclass(frozen=True)
class Watch(ControlErrors):
    """Watch ``path`` (relative to the home directory; below it too with ``recursive``):
    ``watching`` once the watch is set, then ``fs_event`` messages until ``unwatch``."""

    TYPE: ClassVar[str] = "watch"

    request_id: str
    path: str
    recursive: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "request_id": self.request_id,
            "path": self.path,
            "recursive": self.recursive,
        }


@dataclass(frozen=True)
class Unwatch(ControlErrors):
    """Stop the watch ``request_id`` (answered with ``unwatched``)."""

    TYPE: ClassVar[str] = "unwatch"

    request_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "request_id": self.request_id}


def _parse_watch(obj: Mapping[str, Any]) -> Watch:
    request_id = _request_id(obj, required=True, kind=Watch.TYPE)
    assert request_id is not None
    path = obj.get("path")
    if not is_text(path) or not path or "\x00" in path or len(path) > MAX_WATCH_PATH_LENGTH:
        raise ProtocolError(
            "invalid_path", "'path' must be a non-empty path without NUL", request_id, None, True
        )
    recursive = obj.get("recursive", False)
    if not isinstance(recursive, bool):
        raise ProtocolError(
            "invalid_path", "'recursive' must be true or false", request_id, None, True
        )
    return Watch(request_id, path, recursive)


def _parse_unwatch(obj: Mapping[str, Any]) -> Unwatch:
    request_id = _request_id(obj, required=True, kind=Unwatch.TYPE)
    assert request_id is not None
    return Unwatch(request_id)


def watching_message(request_id: str, path: str) -> dict[str, Any]:
    """The watch ``request_id`` is set on ``path`` (absolute)."""
    return {"type": "watching", "request_id": request_id, "path": path}


def fs_event_message(request_id: str, event: str, path: str) -> dict[str, Any]:
    """Something happened at ``path`` (absolute) under the watch ``request_id``."""
    return {"type": "fs_event", "request_id": request_id, "event": event, "path": path}


def unwatched_message(request_id: str) -> dict[str, Any]:
    """The watch ``request_id`` is gone (asked for, or its path went away)."""
    return {"type": "unwatched", "request_id": request_id}


ControlMessage = (
    Cancel
    | Stdin
    | ListSessions
    | CloseSession
    | Attach
    | Processes
    | Signal
    | SubscribeEvents
    | Watch
    | Unwatch
    | Pty
    | Resize
    | TerminalInput
)
Message = Command | ControlMessage


def new_request_id() -> str:
    """A fresh request id for a command that did not carry one (32 hex digits)."""
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------------------
# field checks
# ------------------------------------------------------------------------------------------


def encodes_utf8(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a str that encodes to UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_text(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a str without NUL that encodes to UTF-8 (no lone surrogates)."""
    return encodes_utf8(value) and "\x00" not in value


def _seconds_problem(value: object, maximum: float) -> str | None:
    """Why ``value`` is not a number of seconds in (0, maximum], or None if it is.

    Compares before any float conversion: an int like ``10**400`` cannot be turned into a
    float (``OverflowError``), but Python compares ints and floats exactly.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number of seconds greater than 0"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number of seconds"
    if not value > 0:
        return "must be a number of seconds greater than 0"
    if value > maximum:
        return f"exceeds the maximum of {maximum:g} s"
    return None


def positive_seconds(value: object, maximum: float, name: str = "timeout") -> float:
    """``value`` as float seconds in (0, maximum]; raises ``ValueError`` saying why not.

    Safe for any JSON number (huge ints, ``1e999``): the range is checked before converting.
    """
    problem = _seconds_problem(value, maximum)
    if problem is not None:
        raise ValueError(f"'{name}' {problem}")
    return float(value)  # type: ignore[arg-type]  # checked above: a finite int or float


def _env_problem(value: object, max_value_length: int | None) -> str | None:
    if not isinstance(value, dict):
        return "'env' must be an object of variable names to strings"
    if len(value) > MAX_ENV_ENTRIES:
        return f"'env' has more than {MAX_ENV_ENTRIES} entries"
    for name, item in value.items():
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            return (
                f"'env' name {shorten(str(name), 64)!r} is not a variable name "
                f"(letters, digits and '_', not starting with a digit, at most "
                f"{MAX_ENV_NAME_LENGTH})"
            )
        if not is_text(item):
            return f"'env' value of {name} must be a string without NUL or lone surrogates"
        if max_value_length is not None and len(item) > max_value_length:
            return f"'env' value of {name} is longer than {max_value_length} characters"
    return None


def validate_env(value: object, max_value_length: int | None = None) -> dict[str, str]:
    """Check an ``env`` object (creation body or command); return it as a plain dict.

    One rule for both: at most ``MAX_ENV_ENTRIES`` names matching ``ENV_NAME_RE``, each
    mapped to a string without NUL or lone surrogates (and, if given, at most
    ``max_value_length`` characters). Raises ``ProtocolError`` (``invalid_env``).
    """
    problem = _env_problem(value, max_value_length)
    if problem is not None:
        raise ProtocolError("invalid_env", problem)
    assert isinstance(value, dict)
    return dict(value)


def is_session_name(value: object) -> bool:
    """Whether ``value`` is a valid session name."""
    return isinstance(value, str) and SESSION_NAME_RE.match(value) is not None


def shorten(text: str, limit: int = MAX_ECHO_LENGTH) -> str:
    """``text``, cut to ``limit`` characters plus ``ECHO_CUT_MARKER`` when longer."""
    if len(text) <= limit:
        return text
    return text[:limit] + ECHO_CUT_MARKER


# ------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------


def decode(payload: bytes, is_binary: bool = False) -> dict[str, Any]:
    """One WebSocket message as a JSON object; raises ``ProtocolError`` otherwise."""
    if is_binary:
        raise ProtocolError("binary_message", "binary messages are not supported; send JSON text")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("invalid_json", "message is not valid UTF-8") from None
    except RecursionError:
        raise ProtocolError("invalid_json", "message is nested too deeply") from None
    except ValueError as e:  # also an integer of more than 4300 digits
        raise ProtocolError("invalid_json", f"message is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_message", "message must be a JSON object")
    return obj


def parse_message(
    payload: bytes,
    is_binary: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    make_request_id: Callable[[], str] = new_request_id,
) -> Message:
    """Decode and validate one WebSocket message; raises ``ProtocolError``."""
    if is_binary:
        return parse_terminal_input(payload)
    return parse_object(decode(payload, is_binary), limits, make_request_id)


def parse_object(
    obj: Mapping[str, Any],
    limits: Limits = DEFAULT_LIMITS,
    make_request_id: Callable[[], str] = new_request_id,
) -> Message:
    """Validate one decoded message (a JSON object); raises ``ProtocolError``.

    A key whose value is ``null`` counts as absent; unknown keys are ignored (and not
    forwarded: ``to_wire()`` carries only the known fields).
    """
    kind = obj.get("type")
    if kind is None or kind == Command.TYPE:
        return parse_command(obj, limits, make_request_id)
    parser = CONTROL_PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        shown = shorten(kind, 64) if isinstance(kind, str) else type(kind).__name__
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {shown!r}; expected one of: {', '.join(MESSAGE_TYPES)}",
            _echo_request_id(obj.get("request_id")),
            control=True,
        )
    return parser(obj)


def _echo_request_id(value: object) -> str | None:
    """``value`` if it may be echoed as a ``request_id``, else None."""
    if is_text(value) and len(value) <= MAX_REQUEST_ID_LENGTH:
        return value
    return None


def _request_id(obj: Mapping[str, Any], required: bool, kind: str) -> str | None:
    value = obj.get("request_id")
    if value is None:
        if required:
            raise ProtocolError(
                "invalid_request_id", f"a {kind} message needs a 'request_id'", control=True
            )
        return None
    if _echo_request_id(value) is None:
        raise ProtocolError(
            "invalid_request_id",
            f"'request_id' must be a string of at most {MAX_REQUEST_ID_LENGTH} characters "
            "without NUL or lone surrogates",
            control=True,
        )
    return str(value)


def _cwd_and_env(
    obj: Mapping[str, Any], fail: Callable[[str, str], ProtocolError]
) -> tuple[Any, Any]:
    """The optional ``cwd`` and ``env`` of a command or pty message, checked in that order;
    ``fail`` makes the error (the command's shape or the control shape)."""
    cwd = obj.get("cwd")
    if cwd is not None and not (is_text(cwd) and 0 < len(cwd) <= MAX_CWD_LENGTH):
        raise fail(
            "invalid_cwd",
            f"'cwd' must be a non-empty path of at most {MAX_CWD_LENGTH} characters "
            "without NUL or lone surrogates",
        )
    env = obj.get("env")
    if env is not None:
        problem = _env_problem(env, None)
        if problem is not None:
            raise fail("invalid_env", problem)
    return cwd, env


def parse_command(
    obj: Mapping[str, Any],
    limits: Limits = DEFAULT_LIMITS,
    make_request_id: Callable[[], str] = new_request_id,
) -> Command:
    """Validate a command message; a missing (or empty) ``request_id`` is generated."""
    raw_command = obj.get("command")
    echo = raw_command if isinstance(raw_command, str) else None
    request_id = obj.get("request_id")
    if request_id is not None and _echo_request_id(request_id) is None:
        raise ProtocolError(
            "invalid_request_id",
            f"'request_id' must be a string of at most {MAX_REQUEST_ID_LENGTH} characters "
            "without NUL or lone surrogates",
            None,
            echo,
        )
    request_id = request_id or make_request_id()

    if raw_command is None:
        raise ProtocolError("missing_command", "message has no 'command' field", request_id)
    if not isinstance(raw_command, str):
        raise ProtocolError("invalid_command", "'command' must be a string", request_id)
    if not is_text(raw_command):
        raise ProtocolError(
            "invalid_command",
            "'command' must not contain NUL characters or lone surrogates",
            request_id,
            raw_command,
        )
    command: str = raw_command

    def fail(code: str, text: str) -> ProtocolError:
        return ProtocolError(code, text, request_id, command)

    timeout = obj.get("timeout")
    if timeout is None:
        timeout_s = float(limits.default_timeout)
    else:
        problem = _seconds_problem(timeout, limits.max_timeout)
        if problem is not None:
            raise fail("invalid_timeout", f"'timeout' {problem}")
        timeout_s = float(timeout)

    cwd, env = _cwd_and_env(obj, fail)

    stdin = obj.get("stdin")
    # stdin is bytes to the process: NUL is fine, lone surrogates cannot be encoded.
    if stdin is not None and not encodes_utf8(stdin):
        raise fail("invalid_stdin", "'stdin' must be a string without lone surrogates")

    flags: dict[str, bool] = {}
    for flag in ("stream", "interactive"):
        value = obj.get(flag)
        if value is not None and not isinstance(value, bool):
            raise fail(f"invalid_{flag}", f"'{flag}' must be true or false")
        flags[flag] = bool(value)

    for flag in ("ack", "background"):
        value = obj.get(flag)
        if value is not None and not isinstance(value, bool):
            raise fail(f"invalid_{flag}", f"'{flag}' must be true or false")
        flags[flag] = bool(value)

    yield_after = obj.get("yield_after")
    yield_after_s: float | None = None
    if yield_after is not None:
        problem = _seconds_problem(yield_after, limits.max_timeout)
        if problem is not None:
            raise fail("invalid_yield_after", f"'yield_after' {problem}")
        yield_after_s = float(yield_after)

    on_disconnect = obj.get("on_disconnect")
    if on_disconnect is None:
        on_disconnect = ON_DISCONNECT_CONTINUE
    elif on_disconnect not in ON_DISCONNECT_VALUES:
        raise fail("invalid_on_disconnect", "'on_disconnect' must be 'continue' or 'kill'")

    session = obj.get("session")
    handles = flags["ack"] or flags["background"] or yield_after_s is not None
    if session is not None and handles:
        raise fail(
            "unsupported",
            "'ack', 'background' and 'yield_after' are for plain commands, not 'session'",
        )
    if flags["interactive"] and (flags["background"] or yield_after_s is not None):
        raise fail(
            "unsupported", "'interactive' cannot be combined with 'background' or 'yield_after'"
        )
    if session is not None:
        if not is_session_name(session):
            raise fail(
                "invalid_session",
                "'session' must be 1-64 characters of letters, digits, '_', '.' and '-'",
            )
        if flags["interactive"]:
            raise fail("unsupported", "'interactive' cannot be combined with 'session'")

    return Command(
        request_id=request_id,
        command=command,
        timeout=timeout_s,
        cwd=cwd,
        env=dict(env) if env else None,
        stdin=stdin,
        stream=flags["stream"],
        interactive=flags["interactive"],
        session=session,
        ack=flags["ack"],
        background=flags["background"],
        yield_after=yield_after_s,
        on_disconnect=on_disconnect,
    )


def _parse_cancel(obj: Mapping[str, Any]) -> Cancel:
    request_id = _request_id(obj, required=True, kind=Cancel.TYPE)
    assert request_id is not None
    return Cancel(request_id)


def _parse_stdin(obj: Mapping[str, Any]) -> Stdin:
    request_id = _request_id(obj, required=True, kind=Stdin.TYPE)
    assert request_id is not None
    data = obj.get("data")
    if data is None:
        data = ""
    if not encodes_utf8(data):
        raise ProtocolError(
            "invalid_stdin",
            "'data' must be a string without lone surrogates",
            request_id,
            control=True,
        )
    eof = obj.get("eof")
    if eof is None:
        eof = False
    if not isinstance(eof, bool):
        raise ProtocolError("invalid_stdin", "'eof' must be true or false", request_id, None, True)
    return Stdin(request_id, data, eof)


def _parse_list_sessions(obj: Mapping[str, Any]) -> ListSessions:
    return ListSessions(_request_id(obj, required=False, kind=ListSessions.TYPE))


def _parse_close_session(obj: Mapping[str, Any]) -> CloseSession:
    request_id = _request_id(obj, required=False, kind=CloseSession.TYPE)
    session = obj.get("session")
    if not is_session_name(session):
        raise ProtocolError(
            "invalid_session",
            "'session' must be 1-64 characters of letters, digits, '_', '.' and '-'",
            request_id,
            control=True,
        )
    assert isinstance(session, str)
    return CloseSession(session, request_id)


def _pid_and_request_id(obj: Mapping[str, Any], kind: str) -> tuple[int | None, str | None]:
    """The process a message names: ``pid`` (a positive integer) and/or ``request_id``."""
    request_id = _request_id(obj, required=False, kind=kind)
    pid = obj.get("pid")
    if pid is not None and (
        isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 31
    ):
        raise ProtocolError(
            "invalid_pid", "'pid' must be a positive integer", request_id, control=True
        )
    if pid is None and request_id is None:
        raise ProtocolError(
            "invalid_pid", f"a {kind} message needs a 'pid' or a 'request_id'", None, control=True
        )
    return pid, request_id


def _offset(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return min(value, 1 << 62)


def _parse_attach(obj: Mapping[str, Any]) -> Attach:
    pid, request_id = _pid_and_request_id(obj, Attach.TYPE)
    raw = obj.get("since")
    since: dict[str, int] = {}
    if raw is None:
        since = {name: 0 for name in LOG_STREAMS}
    elif isinstance(raw, dict) and set(raw) <= set(LOG_STREAMS):
        for name in LOG_STREAMS:
            offset = _offset(raw.get(name, 0))
            if offset is None:
                break
            since[name] = offset
    else:
        offset = _offset(raw)
        if offset is not None:
            since = {name: offset for name in LOG_STREAMS}
    if len(since) != len(LOG_STREAMS):
        raise ProtocolError(
            "invalid_since",
            "'since' must be a byte offset >= 0, or an object of them for 'stdout'/'stderr'/'pty'",
            request_id,
            control=True,
        )
    takeover = _flag(obj, "takeover", request_id)
    binary = _flag(obj, "binary", request_id)
    return Attach(pid, request_id, MappingProxyType(since), takeover, binary)


def _flag(obj: Mapping[str, Any], name: str, request_id: str | None) -> bool:
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(
            "invalid_binary", f"'{name}' must be true or false", request_id, control=True
        )
    return value


def _terminal_size(obj: Mapping[str, Any], request_id: str | None) -> tuple[int, int]:
    size = []
    for name in ("cols", "rows"):
        value = obj.get(name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not MIN_TERMINAL_SIZE <= value <= MAX_TERMINAL_SIZE
        ):
            raise ProtocolError(
                "invalid_size",
                f"'{name}' must be an integer from {MIN_TERMINAL_SIZE} to {MAX_TERMINAL_SIZE}",
                request_id,
                control=True,
            )
        size.append(value)
    return size[0], size[1]


def _no_unknown_fields(obj: Mapping[str, Any], known: set[str], request_id: str | None) -> None:
    unknown = sorted(str(k) for k, v in obj.items() if k not in known and v is not None)
    if unknown:
        raise ProtocolError(
            "unknown_field",
            f"unknown field(s) in a {obj.get('type')} message: {shorten(', '.join(unknown), 200)}"
            f"; known: {', '.join(sorted(known))}",
            request_id,
            control=True,
        )


PTY_FIELDS = {"type", "request_id", "cols", "rows", "command", "cwd", "env", "binary"}
RESIZE_FIELDS = {"type", "request_id", "pid", "cols", "rows"}


def _parse_pty(obj: Mapping[str, Any]) -> Pty:
    request_id = _request_id(obj, required=True, kind=Pty.TYPE)
    assert request_id is not None
    _no_unknown_fields(obj, PTY_FIELDS, request_id)
    cols, rows = _terminal_size(obj, request_id)

    def fail(code: str, text: str) -> ProtocolError:
        return ProtocolError(code, text, request_id, control=True)

    command = obj.get("command")
    if command is not None and not (is_text(command) and command.strip()):
        raise fail(
            "invalid_command",
            "'command' must be a non-empty string without NUL characters or lone surrogates",
        )
    cwd, env = _cwd_and_env(obj, fail)
    binary = _flag(obj, "binary", request_id)
    return Pty(request_id, cols, rows, command, cwd, dict(env) if env else None, binary)


def _parse_resize(obj: Mapping[str, Any]) -> Resize:
    pid, request_id = _pid_and_request_id(obj, Resize.TYPE)
    _no_unknown_fields(obj, RESIZE_FIELDS, request_id)
    cols, rows = _terminal_size(obj, request_id)
    return Resize(cols, rows, pid, request_id)


def _parse_processes(obj: Mapping[str, Any]) -> Processes:
    return Processes(_request_id(obj, required=False, kind=Processes.TYPE))


def _parse_signal(obj: Mapping[str, Any]) -> Signal:
    pid, request_id = _pid_and_request_id(obj, Signal.TYPE)
    name = obj.get("signal")
    if isinstance(name, str) and name.upper().removeprefix("SIG") in SIGNALS:
        return Signal(name.upper().removeprefix("SIG"), pid, request_id)
    raise ProtocolError(
        "invalid_signal",
        f"'signal' must be one of {', '.join(SIGNALS)}",
        request_id,
        control=True,
    )


def _parse_subscribe_events(obj: Mapping[str, Any]) -> SubscribeEvents:
    request_id = _request_id(obj, required=False, kind=SubscribeEvents.TYPE)
    last = obj.get("last_event_id")
    if last is not None and not (is_text(last) and len(last) <= MAX_EVENT_ID_LENGTH):
        raise ProtocolError(
            "invalid_event_id",
            f"'last_event_id' must be a string of at most {MAX_EVENT_ID_LENGTH} characters",
            request_id,
            control=True,
        )
    return SubscribeEvents(last, request_id)


#: Control message types and their parsers; a new type is one more entry.
CONTROL_PARSERS: Mapping[str, Callable[[Mapping[str, Any]], ControlMessage]] = MappingProxyType(
    {
        Cancel.TYPE: _parse_cancel,
        Stdin.TYPE: _parse_stdin,
        ListSessions.TYPE: _parse_list_sessions,
        CloseSession.TYPE: _parse_close_session,
        Attach.TYPE: _parse_attach,
        Processes.TYPE: _parse_processes,
        Signal.TYPE: _parse_signal,
        SubscribeEvents.TYPE: _parse_subscribe_events,
        Watch.TYPE: _parse_watch,
        Unwatch.TYPE: _parse_unwatch,
        Pty.TYPE: _parse_pty,
        Resize.TYPE: _parse_resize,
    }
)
#: Every message type, in the order the error message lists them.
MESSAGE_TYPES: tuple[str, ...] = (Command.TYPE, *CONTROL_PARSERS)

# ------------------------------------------------------------------------------------------
# replies (agent -> gateway -> client, and the gateway's own)
# ------------------------------------------------------------------------------------------


def timestamp(now: datetime | None = None) -> str:
    """A result's ``timestamp``: ISO 8601 local time, as the seed had it."""
    return (now or datetime.now()).isoformat()


def result_message(
    request_id: str | None,
    command: str | None,
    returncode: int,
    output: str = "",
    error: str = "",
    duration_ms: float = 0.0,
    truncated: bool = False,
    timed_out: bool = False,
    cancelled: bool = False,
    now: datetime | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A command's result: the seed's fields plus ours. ``extra`` keys (``session``,
    ``output_limit_exceeded``, ``session_restarted``, ``oom_killed``) go in only when given;
    ``success`` is false when ``output_limit_exceeded`` is true."""
    return {
        "type": "result",
        "request_id": request_id,
        "command": command,
        "success": (
            returncode == 0
            and not timed_out
            and not cancelled
            and not extra.get("output_limit_exceeded")
        ),
        "output": output,
        "error": error,
        "returncode": returncode,
        "timestamp": timestamp(now),
        "duration_ms": duration_ms,
        "truncated": truncated,
        "timed_out": timed_out,
        "cancelled": cancelled,
        **extra,
    }


def command_error(
    request_id: object,
    command: object,
    message: str,
    code: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The reply to a command (or unreadable message) that was not run: the seed's result
    fields, ``type: "error"``, ``error_code``, ``duration_ms: 0.0`` and ``truncated: false``.

    Echoes ``request_id`` only if it is a valid one, and at most ``MAX_ECHO_LENGTH``
    characters of ``command``, adding ``command_truncated: true`` when it was cut.
    """
    reply: dict[str, Any] = {
        "type": "error",
        "request_id": _echo_request_id(request_id),
        "command": None,
        "success": False,
        "output": "",
        "error": shorten(message, MAX_ERROR_TEXT_LENGTH),
        "returncode": NOT_RUN_RETURNCODE,
        "timestamp": timestamp(now),
        "error_code": code,
        "duration_ms": 0.0,
        "truncated": False,
    }
    if isinstance(command, str):
        reply["command"] = shorten(command)
        if len(command) > MAX_ECHO_LENGTH:
            reply["command_truncated"] = True
    return reply


def control_error(request_id: object, message: str, code: str) -> dict[str, Any]:
    """The reply to a control message that failed: ``{"type": "error", "request_id",
    "error", "error_code"}``."""
    return {
        "type": "error",
        "request_id": _echo_request_id(request_id),
        "error": shorten(message, MAX_ERROR_TEXT_LENGTH),
        "error_code": code,
    }


def output_message(
    request_id: str, stream: str, data: str, offset: int | None = None, **extra: Any
) -> dict[str, Any]:
    """A chunk of a streamed command's output (``stream`` is ``stdout`` or ``stderr``);
    ``offset`` is the byte offset of its first byte in that stream."""
    message: dict[str, Any] = {
        "type": "output",
        "request_id": request_id,
        "stream": stream,
        "data": data,
    }
    if offset is not None:
        message["offset"] = offset
    message.update(extra)
    return message


def started_message(request_id: str, pid: int, **extra: Any) -> dict[str, Any]:
    """The early answer to a command with ``ack`` or ``background``: it runs, as ``pid``."""
    return {"type": "started", "request_id": request_id, "pid": pid, **extra}


def yielded_message(
    request_id: str, pid: int, output: str, error: str, offset: Mapping[str, int]
) -> dict[str, Any]:
    """The answer when ``yield_after`` passes: the output so far; the command runs on.
    ``offset`` (per stream) is where an ``attach`` should continue (pass it as ``since``)."""
    return {
        "type": "yielded",
        "request_id": request_id,
        "pid": pid,
        "output": output,
        "error": error,
        "offset": dict(offset),
    }


def processes_message(request_id: str | None, processes: list[dict[str, Any]]) -> dict[str, Any]:
    """The reply to ``processes``."""
    return {"type": "processes", "request_id": request_id, "processes": processes}


def sessions_message(request_id: str | None, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """The reply to ``list_sessions``."""
    return {"type": "sessions", "request_id": request_id, "sessions": sessions}


def session_closed_message(request_id: str | None, session: str) -> dict[str, Any]:
    """The reply to a successful ``close_session``."""
    return {"type": "session_closed", "session": session, "request_id": request_id}


# ------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encode(message: Mapping[str, Any]) -> bytes:
    """JSON for one text frame, as UTF-8; never raises on a protocol message.

    Lone surrogates (in values or keys) become U+FFFD, so the bytes are always valid UTF-8
    that any JSON parser accepts; non-finite floats become ``null`` (strict JSON has no NaN).
    """
    try:
        text = json.dumps(message, ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN/Infinity, or an int too long to print
        text = json.dumps(_strict(message), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")


def _strict(value: Any) -> Any:
    """``value`` with non-finite floats and unprintable ints replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        # str(int) refuses more than 4300 decimal digits (about 14,280 bits).
        return value if value.bit_length() <= 14_000 else None
    if isinstance(value, Mapping):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    return value
