"""Parsing and validating client messages."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedgw.messages import MessageError, MessagePolicy, error_reply, parse_message

POLICY = MessagePolicy(default_timeout=30, max_timeout=60)


def parse(message: Any, policy: MessagePolicy = POLICY) -> dict[str, Any]:
    return parse_message(json.dumps(message).encode(), False, policy, lambda: "generated")


def test_seed_message_gets_request_id_and_default_timeout() -> None:
    """A seed message gets a fresh request_id and the server's default timeout, nothing else."""
    assert parse({"command": "ls -la"}) == {
        "command": "ls -la",
        "request_id": "generated",
        "timeout": 30,
    }


def test_request_id_and_options_are_kept() -> None:
    """A client's request_id and valid options pass through unchanged."""
    message = {
        "command": "cat",
        "request_id": "r-1",
        "timeout": 1.5,
        "cwd": "/tmp",
        "env": {"FOO": "bar", "_X1": ""},
        "stdin": "hello",
        "stream": True,
        "interactive": False,
        "session": "main-1.x",
    }
    assert parse(message) == message


@pytest.mark.parametrize(
    ("payload", "is_binary", "code"),
    [
        (b"not json", False, "invalid_json"),
        (b"\xff\xfe", False, "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, False, "invalid_json"),
        (b"[1, 2]", False, "invalid_message"),
        (b'"ls"', False, "invalid_message"),
        (b"{}", False, "missing_command"),
        (b'{"command": 5}', False, "invalid_command"),
        (b'{"command": "a\\u0000b"}', False, "invalid_command"),
        (b'{"command": "ls", "request_id": 7}', False, "invalid_request_id"),
        (b'{"command": "ls", "request_id": "' + b"x" * 300 + b'"}', False, "invalid_request_id"),
        (b'{"command": "ls"}', True, "binary_message"),
        (b'{"command": "ls", "timeout": 0}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": -1}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": "5"}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": true}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": 61}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": 1e999}', False, "invalid_timeout"),
        (b'{"command": "ls", "cwd": ""}', False, "invalid_cwd"),
        (b'{"command": "ls", "cwd": 3}', False, "invalid_cwd"),
        (b'{"command": "ls", "env": []}', False, "invalid_env"),
        (b'{"command": "ls", "env": {"A=B": "x"}}', False, "invalid_env"),
        (b'{"command": "ls", "env": {"A": 1}}', False, "invalid_env"),
        (b'{"command": "ls", "stdin": {}}', False, "invalid_stdin"),
        (b'{"command": "ls", "stream": "yes"}', False, "invalid_stream"),
        (b'{"command": "ls", "interactive": 1}', False, "invalid_interactive"),
        (b'{"command": "ls", "session": "a b"}', False, "invalid_session"),
        (b'{"command": "ls", "session": ""}', False, "invalid_session"),
        (b'{"command": "ls", "session": "s", "interactive": true}', False, "unsupported"),
        (b'{"type": "launch"}', False, "unknown_type"),
        (b'{"type": 5}', False, "unknown_type"),
        (b'{"type": "cancel"}', False, "invalid_request_id"),
        (b'{"type": "stdin", "request_id": "r", "data": 5}', False, "invalid_stdin"),
        (b'{"type": "stdin", "request_id": "r", "eof": "y"}', False, "invalid_stdin"),
        (b'{"type": "close_session"}', False, "invalid_session"),
    ],
)
def test_invalid_messages(payload: bytes, is_binary: bool, code: str) -> None:
    """Each kind of bad message raises MessageError with its own code."""
    with pytest.raises(MessageError) as info:
        parse_message(payload, is_binary, POLICY)
    assert info.value.code == code


def test_control_messages_are_normalised() -> None:
    """Control messages are forwarded with only their own fields."""
    assert parse({"type": "cancel", "request_id": "r", "junk": 1}) == {
        "type": "cancel",
        "request_id": "r",
    }
    assert parse({"type": "stdin", "request_id": "r", "data": "x"}) == {
        "type": "stdin",
        "request_id": "r",
        "data": "x",
        "eof": False,
    }
    assert parse({"type": "list_sessions"}) == {"type": "list_sessions", "request_id": None}
    assert parse({"type": "close_session", "session": "s"}) == {
        "type": "close_session",
        "request_id": None,
        "session": "s",
    }


def test_command_error_reply_has_seed_fields() -> None:
    """An error reply to a command carries every field of the seed's result."""
    error = MessageError("missing_command", "message has no 'command' field", "r-9")
    result = error_reply(error, datetime(2026, 1, 2, 3, 4, 5, 678000))
    assert result == {
        "type": "error",
        "request_id": "r-9",
        "command": None,
        "success": False,
        "output": "",
        "error": "message has no 'command' field",
        "returncode": -1,
        "timestamp": "2026-01-02T03:04:05.678000",
        "error_code": "missing_command",
    }


def test_control_error_reply_is_short() -> None:
    """An error reply to a control message says what and why, and nothing more."""
    error = MessageError("unknown_type", "unknown message type", "r", control=True)
    assert error_reply(error, datetime.now()) == {
        "type": "error",
        "request_id": "r",
        "error": "unknown message type",
        "error_code": "unknown_type",
    }


@given(st.binary(max_size=512), st.booleans())
def test_arbitrary_bytes_never_crash(payload: bytes, is_binary: bool) -> None:
    """Any payload either parses or raises MessageError with a JSON-serialisable reply."""
    try:
        message = parse_message(payload, is_binary, POLICY)
    except MessageError as e:
        json.dumps(error_reply(e, datetime.now()))
    else:
        assert message.get("type", "command") in (
            "command",
            "cancel",
            "stdin",
            "list_sessions",
            "close_session",
        )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

FIELDS = [
    "command",
    "request_id",
    "type",
    "timeout",
    "cwd",
    "env",
    "stdin",
    "stream",
    "interactive",
    "session",
    "data",
    "eof",
    "x",
]


@given(st.dictionaries(st.sampled_from(FIELDS), json_values))
def test_arbitrary_json_objects_never_crash(obj: dict[str, object]) -> None:
    """Any JSON object either parses or yields a JSON-serialisable error reply."""
    try:
        message = parse_message(json.dumps(obj).encode(), False, POLICY)
    except MessageError as e:
        json.dumps(error_reply(e, datetime.now()))
    else:
        json.dumps(message)
        if message.get("type", "command") == "command":
            assert isinstance(message["command"], str)
            assert 0 < message["timeout"] <= POLICY.max_timeout
