"""The exact wire shapes of ``twistedgw.protocol`` (PROTOCOL.md): every reply builder's
message, every record's ``to_wire()``, and every parse error's code, text, echoed
``request_id`` and reply form (the short control form or the command's result form)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from twistedgw import protocol
from twistedgw.protocol import Limits, ProtocolError

LIMITS = Limits(default_timeout=30, max_timeout=60)
NOW = datetime(2026, 1, 2, 3, 4, 5, 678000)
STAMP = "2026-01-02T03:04:05.678000"


def failure(obj: dict[str, Any], limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_object(obj, limits, lambda: "generated")
    return caught.value


# -- replies the agent (or gateway) builds -------------------------------------------------


def test_result_message_has_the_seed_fields_and_ours() -> None:
    """A result carries, in PROTOCOL.md's names, the seed's fields plus ``type``,
    ``duration_ms``, ``truncated``, ``timed_out`` and ``cancelled``; extras go in as given."""
    message = protocol.result_message(
        "r1",
        "ls",
        0,
        output="out",
        error="err",
        duration_ms=12.5,
        truncated=True,
        now=NOW,
        session="s",
    )
    assert message == {
        "type": "result",
        "request_id": "r1",
        "command": "ls",
        "success": True,
        "output": "out",
        "error": "err",
        "returncode": 0,
        "timestamp": STAMP,
        "duration_ms": 12.5,
        "truncated": True,
        "timed_out": False,
        "cancelled": False,
        "session": "s",
    }
    assert "session" not in protocol.result_message("r1", "ls", 0, now=NOW)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"returncode": 1},
        {"returncode": 0, "timed_out": True},
        {"returncode": 0, "cancelled": True},
        {"returncode": 0, "output_limit_exceeded": True},
    ],
)
def test_result_is_a_success_only_for_a_clean_exit(kwargs: dict[str, Any]) -> None:
    """``success`` is false for a non-zero returncode, a timeout, a cancel, or output over
    the limit; each of those flags is reported as given."""
    message = protocol.result_message("r1", "ls", now=NOW, **kwargs)
    assert message["success"] is False
    for name in ("timed_out", "cancelled", "output_limit_exceeded"):
        if name in kwargs:
            assert message[name] is True


def test_output_message_shape() -> None:
    """``output`` names its request, stream and data; ``offset`` and extras only when given."""
    assert protocol.output_message("r1", "stderr", "x") == {
        "type": "output",
        "request_id": "r1",
        "stream": "stderr",
        "data": "x",
    }
    assert protocol.output_message("r1", "pty", "x", 7, pid=9) == {
        "type": "output",
        "request_id": "r1",
        "stream": "pty",
        "data": "x",
        "offset": 7,
        "pid": 9,
    }
    assert protocol.output_message("r1", "stdout", "", 0)["offset"] == 0


def test_process_handle_replies_shape() -> None:
    """``started``, ``yielded`` and ``processes`` have PROTOCOL.md's fields."""
    assert protocol.started_message("r1", 42, background=True) == {
        "type": "started",
        "request_id": "r1",
        "pid": 42,
        "background": True,
    }
    offsets = {"stdout": 3, "stderr": 4}
    yielded = protocol.yielded_message("r1", 42, "o", "e", offsets)
    assert yielded == {
        "type": "yielded",
        "request_id": "r1",
        "pid": 42,
        "output": "o",
        "error": "e",
        "offset": {"stdout": 3, "stderr": 4},
    }
    assert yielded["offset"] is not offsets
    assert protocol.processes_message(None, [{"pid": 1}]) == {
        "type": "processes",
        "request_id": None,
        "processes": [{"pid": 1}],
    }


def test_session_replies_shape() -> None:
    """``list_sessions`` is answered by ``sessions``; ``close_session`` by ``session_closed``."""
    listed = [{"session": "s", "busy": False}]
    assert protocol.sessions_message("r1", listed) == {
        "type": "sessions",
        "request_id": "r1",
        "sessions": listed,
    }
    assert protocol.session_closed_message("r2", "s") == {
        "type": "session_closed",
        "session": "s",
        "request_id": "r2",
    }


def test_watch_replies_shape() -> None:
    """``watching``, ``fs_event`` and ``unwatched`` have PROTOCOL.md's fields."""
    assert protocol.watching_message("w", "/home/sandbox/a") == {
        "type": "watching",
        "request_id": "w",
        "path": "/home/sandbox/a",
    }
    assert protocol.fs_event_message("w", "moved", "/x") == {
        "type": "fs_event",
        "request_id": "w",
        "event": "moved",
        "path": "/x",
    }
    assert protocol.unwatched_message("w") == {"type": "unwatched", "request_id": "w"}


def test_command_error_cuts_a_long_command_and_error_text() -> None:
    """A command error echoes at most MAX_ECHO_LENGTH characters of the command (flagged
    ``command_truncated``) and at most MAX_ERROR_TEXT_LENGTH of the error text."""
    long = "x" * (protocol.MAX_ECHO_LENGTH + 1)
    reply = protocol.command_error("r", long, "e" * 2000, "invalid_timeout", NOW)
    assert reply["command"] == "x" * protocol.MAX_ECHO_LENGTH + protocol.ECHO_CUT_MARKER
    assert reply["command_truncated"] is True
    assert reply["error"] == "e" * protocol.MAX_ERROR_TEXT_LENGTH + "\u2026"
    exact = protocol.command_error("r", long[:-1], "e", "invalid_timeout", NOW)
    assert exact["command"] == long[:-1] and "command_truncated" not in exact
    assert protocol.command_error("r" * 257, None, "e", "invalid_json", NOW)["request_id"] is None
    assert protocol.command_error("r" * 256, None, "e", "invalid_json")["request_id"] == "r" * 256


def test_timestamp_is_iso_local_time() -> None:
    """``timestamp`` is ISO 8601 of the given time (now when none is given)."""
    assert protocol.timestamp(NOW) == STAMP
    assert datetime.fromisoformat(protocol.timestamp()).year >= 2026


# -- records on the wire -------------------------------------------------------------------


def test_a_command_with_every_field_goes_on_the_wire_whole() -> None:
    """Every field a client sets is forwarded under its own name (and no ``type``)."""
    message = {
        "type": "command",
        "request_id": "r1",
        "command": "ls",
        "timeout": 5,
        "cwd": "/tmp",
        "env": {"A": "1"},
        "stdin": "in",
        "stream": True,
        "ack": True,
        "yield_after": 2,
        "on_disconnect": "kill",
        "extra": "dropped",
    }
    command = protocol.parse_object(message, LIMITS)
    assert command.to_wire() == {
        "request_id": "r1",
        "command": "ls",
        "timeout": 5.0,
        "cwd": "/tmp",
        "env": {"A": "1"},
        "stdin": "in",
        "stream": True,
        "ack": True,
        "yield_after": 2.0,
        "on_disconnect": "kill",
    }
    other = protocol.parse_object(
        {"command": "ls", "interactive": True, "request_id": "r2", "background": False}, LIMITS
    )
    assert other.to_wire() == {
        "request_id": "r2",
        "command": "ls",
        "timeout": 30.0,
        "interactive": True,
    }
    background = protocol.parse_object({"command": "ls", "background": True}, LIMITS, lambda: "g")
    assert background.to_wire()["background"] is True
    session = protocol.parse_object({"command": "ls", "session": "s.1"}, LIMITS, lambda: "g")
    assert session.to_wire()["session"] == "s.1"


@pytest.mark.parametrize(
    ("obj", "wire"),
    [
        ({"type": "cancel", "request_id": "r"}, {"type": "cancel", "request_id": "r"}),
        (
            {"type": "stdin", "request_id": "r"},
            {"type": "stdin", "request_id": "r", "data": "", "eof": False},
        ),
        (
            {"type": "stdin", "request_id": "r", "data": "a\x00", "eof": True},
            {"type": "stdin", "request_id": "r", "data": "a\x00", "eof": True},
        ),
        ({"type": "list_sessions"}, {"type": "list_sessions", "request_id": None}),
        (
            {"type": "close_session", "session": "s", "request_id": "r"},
            {"type": "close_session", "request_id": "r", "session": "s"},
        ),
        ({"type": "processes", "request_id": "r"}, {"type": "processes", "request_id": "r"}),
        (
            {"type": "signal", "pid": 7, "signal": "sigterm"},
            {"type": "signal", "pid": 7, "request_id": None, "signal": "TERM"},
        ),
        (
            {"type": "subscribe_events", "last_event_id": "e9"},
            {"type": "subscribe_events", "request_id": None, "last_event_id": "e9"},
        ),
        (
            {"type": "watch", "request_id": "w", "path": "a"},
            {"type": "watch", "request_id": "w", "path": "a", "recursive": False},
        ),
        ({"type": "unwatch", "request_id": "w"}, {"type": "unwatch", "request_id": "w"}),
        (
            {"type": "pty", "request_id": "p", "cols": 1, "rows": 4096, "command": "top"},
            {"type": "pty", "request_id": "p", "cols": 1, "rows": 4096, "command": "top"},
        ),
        (
            {"type": "resize", "pid": 3, "cols": 80, "rows": 24},
            {"type": "resize", "pid": 3, "request_id": None, "cols": 80, "rows": 24},
        ),
        (
            {"type": "attach", "request_id": "r", "since": {"stdout": 4}},
            {"type": "attach", "pid": None, "request_id": "r", "since": {"stdout": 4, "stderr": 0}},
        ),
    ],
)
def test_control_messages_go_on_the_wire_in_their_documented_shape(
    obj: dict[str, Any], wire: dict[str, Any]
) -> None:
    """Each control message is forwarded with its ``type`` and its fields, defaults filled."""
    assert protocol.parse_object(obj).to_wire() == wire


def test_attach_since_is_capped_and_per_stream() -> None:
    """A huge ``since`` is capped at 2**62; per-stream offsets default to 0."""
    attach = protocol.parse_object({"type": "attach", "pid": 1, "since": 1 << 70})
    assert isinstance(attach, protocol.Attach)
    assert dict(attach.since) == {"stdout": 1 << 62, "stderr": 1 << 62, "pty": 1 << 62}
    per = protocol.parse_object({"type": "attach", "pid": 1, "since": {"pty": 2}})
    assert isinstance(per, protocol.Attach)
    assert dict(per.since) == {"stdout": 0, "stderr": 0, "pty": 2}


# -- parse errors: code, text, echoed request_id, form --------------------------------------

KNOWN_TYPES = (
    "command, cancel, stdin, list_sessions, close_session, attach, processes, signal, "
    "subscribe_events, watch, unwatch, pty, resize"
)
REQUEST_ID_TEXT = (
    "'request_id' must be a string of at most 256 characters without NUL or lone surrogates"
)
SESSION_TEXT = "'session' must be 1-64 characters of letters, digits, '_', '.' and '-'"

CONTROL_FAILURES: list[tuple[dict[str, Any], str, str, str | None]] = [
    (
        {"type": "launch", "request_id": "r"},
        "unknown_type",
        f"unknown message type 'launch'; expected one of: {KNOWN_TYPES}",
        "r",
    ),
    (
        {"type": 5, "request_id": "r" * 257},
        "unknown_type",
        f"unknown message type 'int'; expected one of: {KNOWN_TYPES}",
        None,
    ),
    ({"type": "cancel"}, "invalid_request_id", "a cancel message needs a 'request_id'", None),
    ({"type": "cancel", "request_id": 5}, "invalid_request_id", REQUEST_ID_TEXT, None),
    (
        {"type": "watch", "path": "a"},
        "invalid_request_id",
        "a watch message needs a 'request_id'",
        None,
    ),
    ({"type": "unwatch"}, "invalid_request_id", "a unwatch message needs a 'request_id'", None),
    (
        {"type": "pty", "cols": 1, "rows": 1},
        "invalid_request_id",
        "a pty message needs a 'request_id'",
        None,
    ),
    ({"type": "list_sessions", "request_id": "a\x00"}, "invalid_request_id", REQUEST_ID_TEXT, None),
    (
        {"type": "stdin", "request_id": "r", "data": 5},
        "invalid_stdin",
        "'data' must be a string without lone surrogates",
        "r",
    ),
    (
        {"type": "stdin", "request_id": "r", "eof": 1},
        "invalid_stdin",
        "'eof' must be true or false",
        "r",
    ),
    ({"type": "close_session", "request_id": "r"}, "invalid_session", SESSION_TEXT, "r"),
    ({"type": "close_session", "session": "a b"}, "invalid_session", SESSION_TEXT, None),
    (
        {"type": "attach", "request_id": "r", "pid": 0},
        "invalid_pid",
        "'pid' must be a positive integer",
        "r",
    ),
    ({"type": "attach", "pid": 1 << 31}, "invalid_pid", "'pid' must be a positive integer", None),
    ({"type": "attach", "pid": True}, "invalid_pid", "'pid' must be a positive integer", None),
    ({"type": "attach"}, "invalid_pid", "a attach message needs a 'pid' or a 'request_id'", None),
    (
        {"type": "signal", "signal": "TERM"},
        "invalid_pid",
        "a signal message needs a 'pid' or a 'request_id'",
        None,
    ),
    (
        {"type": "resize", "cols": 1, "rows": 1},
        "invalid_pid",
        "a resize message needs a 'pid' or a 'request_id'",
        None,
    ),
    (
        {"type": "attach", "pid": 1, "since": -1},
        "invalid_since",
        "'since' must be a byte offset >= 0, or an object of them for 'stdout'/'stderr'/'pty'",
        None,
    ),
    (
        {"type": "attach", "pid": 1, "since": {"stdout": "0"}},
        "invalid_since",
        "'since' must be a byte offset >= 0, or an object of them for 'stdout'/'stderr'/'pty'",
        None,
    ),
    (
        {"type": "attach", "pid": 1, "binary": 1, "request_id": "r"},
        "invalid_binary",
        "'binary' must be true or false",
        "r",
    ),
    (
        {"type": "signal", "pid": 1, "signal": "SIGSEGV"},
        "invalid_signal",
        "'signal' must be one of HUP, INT, QUIT, KILL, USR1, USR2, TERM, CONT, STOP",
        None,
    ),
    (
        {"type": "subscribe_events", "request_id": "r", "last_event_id": "x" * 65},
        "invalid_event_id",
        "'last_event_id' must be a string of at most 64 characters",
        "r",
    ),
    (
        {"type": "watch", "request_id": "w", "path": ""},
        "invalid_path",
        "'path' must be a non-empty path without NUL",
        "w",
    ),
    (
        {"type": "watch", "request_id": "w", "path": "a", "recursive": "yes"},
        "invalid_path",
        "'recursive' must be true or false",
        "w",
    ),
    (
        {"type": "pty", "request_id": "p", "cols": 0, "rows": 24},
        "invalid_size",
        "'cols' must be an integer from 1 to 4096",
        "p",
    ),
    (
        {"type": "pty", "request_id": "p", "cols": 80, "rows": 4097},
        "invalid_size",
        "'rows' must be an integer from 1 to 4096",
        "p",
    ),
    (
        {"type": "pty", "request_id": "p", "cols": 80, "rows": 24, "tty": 1, "b": 2},
        "unknown_field",
        "unknown field(s) in a pty message: b, tty; known: binary, cols, command, cwd, env, "
        "request_id, rows, type",
        "p",
    ),
    (
        {"type": "resize", "request_id": "p", "cols": 80, "rows": 24, "x": 1},
        "unknown_field",
        "unknown field(s) in a resize message: x; known: cols, pid, request_id, rows, type",
        "p",
    ),
    (
        {"type": "pty", "request_id": "p", "cols": 80, "rows": 24, "command": ""},
        "invalid_command",
        "'command' must be a non-empty string without NUL characters or lone surrogates",
        "p",
    ),
    (
        {"type": "pty", "request_id": "p", "cols": 80, "rows": 24, "cwd": "a\x00"},
        "invalid_cwd",
        "'cwd' must be a non-empty path of at most 4096 characters without NUL or lone surrogates",
        "p",
    ),
]


@pytest.mark.parametrize(
    ("obj", "code", "text", "request_id"),
    CONTROL_FAILURES,
    ids=[f"{case[1]}-{i}" for i, case in enumerate(CONTROL_FAILURES)],
)
def test_control_message_errors_name_the_field(
    obj: dict[str, Any], code: str, text: str, request_id: str | None
) -> None:
    """Each bad control message gets its code and a text naming the field (and what is
    allowed), in the short control form that echoes a valid ``request_id``."""
    error = failure(obj)
    assert (error.code, error.message, error.request_id, error.control) == (
        code,
        text,
        request_id,
        True,
    )
    assert error.reply() == {
        "type": "error",
        "request_id": request_id,
        "error": text,
        "error_code": code,
    }


def test_unknown_fields_are_ignored_when_null() -> None:
    """A null field counts as absent, so it is not an unknown field of a pty message."""
    pty = protocol.parse_object({"type": "pty", "request_id": "p", "cols": 2, "rows": 3, "x": None})
    assert pty == protocol.Pty("p", 2, 3)


def test_a_long_unknown_field_list_is_cut() -> None:
    """The list of unknown fields is cut to 200 characters; the known ones are listed whole."""
    obj = {"type": "resize", "pid": 1, "cols": 1, "rows": 1, "y" * 300: 1}
    error = failure(obj)
    assert error.message == (
        f"unknown field(s) in a resize message: {'y' * 200}\u2026; "
        "known: cols, pid, request_id, rows, type"
    )


COMMAND_FAILURES: list[tuple[dict[str, Any], str, str, str | None, str | None]] = [
    ({"request_id": "r"}, "missing_command", "message has no 'command' field", "r", None),
    ({"command": 5}, "invalid_command", "'command' must be a string", "generated", None),
    (
        {"command": "a\x00"},
        "invalid_command",
        "'command' must not contain NUL characters or lone surrogates",
        "generated",
        "a\x00",
    ),
    ({"command": "ls", "request_id": 7}, "invalid_request_id", REQUEST_ID_TEXT, None, "ls"),
    (
        {"command": "ls", "timeout": 61},
        "invalid_timeout",
        "'timeout' exceeds the maximum of 60 s",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "timeout": 0},
        "invalid_timeout",
        "'timeout' must be a number of seconds greater than 0",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "timeout": "5"},
        "invalid_timeout",
        "'timeout' must be a number of seconds greater than 0",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "timeout": float("inf")},
        "invalid_timeout",
        "'timeout' must be a finite number of seconds",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "cwd": ""},
        "invalid_cwd",
        "'cwd' must be a non-empty path of at most 4096 characters without NUL or lone surrogates",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "env": []},
        "invalid_env",
        "'env' must be an object of variable names to strings",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "env": {"A": 1}},
        "invalid_env",
        "'env' value of A must be a string without NUL or lone surrogates",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "env": {"1A": "x"}},
        "invalid_env",
        "'env' name '1A' is not a variable name (letters, digits and '_', not starting with a "
        "digit, at most 256)",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "stdin": 5},
        "invalid_stdin",
        "'stdin' must be a string without lone surrogates",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "stream": "yes"},
        "invalid_stream",
        "'stream' must be true or false",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "interactive": 1},
        "invalid_interactive",
        "'interactive' must be true or false",
        "generated",
        "ls",
    ),
    ({"command": "ls", "ack": 1}, "invalid_ack", "'ack' must be true or false", "generated", "ls"),
    (
        {"command": "ls", "background": "y"},
        "invalid_background",
        "'background' must be true or false",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "yield_after": 61},
        "invalid_yield_after",
        "'yield_after' exceeds the maximum of 60 s",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "on_disconnect": "stop"},
        "invalid_on_disconnect",
        "'on_disconnect' must be 'continue' or 'kill'",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "session": "s", "ack": True},
        "unsupported",
        "'ack', 'background' and 'yield_after' are for plain commands, not 'session'",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "interactive": True, "yield_after": 1},
        "unsupported",
        "'interactive' cannot be combined with 'background' or 'yield_after'",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "interactive": True, "session": "s"},
        "unsupported",
        "'interactive' cannot be combined with 'session'",
        "generated",
        "ls",
    ),
    (
        {"command": "ls", "session": "a/b"},
        "invalid_session",
        SESSION_TEXT,
        "generated",
        "ls",
    ),
]


@pytest.mark.parametrize(
    ("obj", "code", "text", "request_id", "command"),
    COMMAND_FAILURES,
    ids=[f"{case[1]}-{i}" for i, case in enumerate(COMMAND_FAILURES)],
)
def test_command_errors_name_the_field_in_the_result_shape(
    obj: dict[str, Any], code: str, text: str, request_id: str | None, command: str | None
) -> None:
    """Each bad command gets its code and a text naming the field, in the seed's result
    shape echoing its (possibly generated) ``request_id`` and its ``command``."""
    error = failure(obj)
    assert (error.code, error.message, error.request_id, error.command, error.control) == (
        code,
        text,
        request_id,
        command,
        False,
    )
    reply = error.reply(NOW)
    assert reply["type"] == "error" and reply["error_code"] == code
    assert (reply["request_id"], reply["command"], reply["error"]) == (request_id, command, text)
    assert reply["timestamp"] == STAMP


def test_positive_seconds_error_names_the_field() -> None:
    """``positive_seconds`` says which field is wrong (``timeout`` unless told) and why."""
    with pytest.raises(ValueError, match=r"^'timeout' exceeds the maximum of 60 s$"):
        protocol.positive_seconds(61, 60)
    with pytest.raises(ValueError, match=r"^'lifetime' must be a number of seconds"):
        protocol.positive_seconds(-1, 60, "lifetime")
    with pytest.raises(ValueError, match=r"^'timeout' must be a finite number of seconds$"):
        protocol.positive_seconds(float("nan"), 60)
    assert protocol.positive_seconds(60, 60) == 60.0
    assert isinstance(protocol.positive_seconds(1, 60), float)


def test_validate_env_errors() -> None:
    """``validate_env`` refuses too many entries and too-long values, in the ``invalid_env``
    code (a command-shaped error without request id), saying the limit."""
    too_many = {f"V{i}": "" for i in range(protocol.MAX_ENV_ENTRIES + 1)}
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_env(too_many)
    assert (caught.value.code, caught.value.message) == (
        "invalid_env",
        "'env' has more than 256 entries",
    )
    assert caught.value.control is False
    with pytest.raises(ProtocolError) as long_value:
        protocol.validate_env({"A": "xyz"}, max_value_length=2)
    assert long_value.value.message == "'env' value of A is longer than 2 characters"
    assert protocol.validate_env({"A": "xy"}, max_value_length=2) == {"A": "xy"}


@pytest.mark.parametrize(
    ("payload", "code", "text"),
    [
        (b"\xff", "invalid_json", "message is not valid UTF-8"),
        (b"[" * 100_000, "invalid_json", "message is nested too deeply"),
        (b"[1, 2]", "invalid_message", "message must be a JSON object"),
    ],
)
def test_undecodable_messages_are_command_shaped_errors(
    payload: bytes, code: str, text: str
) -> None:
    """A message that is not a JSON object gets the result-shaped error with its text."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_message(payload)
    assert (caught.value.code, caught.value.message, caught.value.control) == (code, text, False)
    assert caught.value.reply(NOW)["command"] is None


def test_invalid_json_says_where() -> None:
    """Bad JSON gets ``invalid_json`` with the decoder's reason."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_message(b"{")
    assert caught.value.message.startswith("message is not valid JSON: ")


def test_binary_messages_and_terminal_input_errors() -> None:
    """``decode`` refuses binary frames; a terminal input record's error names its pid."""
    with pytest.raises(ProtocolError) as caught:
        protocol.decode(b"{}", True)
    assert (caught.value.code, caught.value.message) == (
        "binary_message",
        "binary messages are not supported; send JSON text",
    )
    error = protocol.TerminalInput(5, b"x").error("not_a_pty", "no pty")
    assert (error.message, error.control, error.request_id) == (
        "no pty (binary frame for pid 5)",
        True,
        None,
    )


def test_encoded_messages_are_compact_utf8_json() -> None:
    """``encode`` writes non-ASCII characters as UTF-8, not ``\\u`` escapes."""
    assert protocol.encode({"a": "é"}) == '{"a": "é"}'.encode()
    assert json.loads(protocol.encode({"n": float("nan"), "x": [1.5]})) == {"n": None, "x": [1.5]}
