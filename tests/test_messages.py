"""Parsing and validating client command messages."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedgw.messages import MessageError, error_result, parse_command


def test_request_id_is_filled_when_missing() -> None:
    """A message without request_id gets a fresh one; other fields pass through."""
    message = parse_command(b'{"command": "ls -la"}', False, lambda: "generated")
    assert message == {"command": "ls -la", "request_id": "generated"}


def test_request_id_is_kept() -> None:
    """A client's request_id is kept as sent."""
    message = parse_command(b'{"command": "true", "request_id": "r-1"}', False)
    assert message["request_id"] == "r-1"


@pytest.mark.parametrize(
    ("payload", "is_binary", "code"),
    [
        (b"not json", False, "invalid_json"),
        (b"\xff\xfe", False, "invalid_json"),
        (b"[1, 2]", False, "invalid_message"),
        (b'"ls"', False, "invalid_message"),
        (b"{}", False, "missing_command"),
        (b'{"command": 5}', False, "invalid_command"),
        (b'{"command": "a\\u0000b"}', False, "invalid_command"),
        (b'{"command": "ls", "request_id": 7}', False, "invalid_request_id"),
        (b'{"command": "ls", "request_id": "' + b"x" * 300 + b'"}', False, "invalid_request_id"),
        (b'{"command": "ls"}', True, "binary_message"),
    ],
)
def test_invalid_messages(payload: bytes, is_binary: bool, code: str) -> None:
    """Each kind of bad message raises MessageError with its own code."""
    with pytest.raises(MessageError) as info:
        parse_command(payload, is_binary)
    assert info.value.code == code


def test_error_result_has_seed_fields() -> None:
    """An error reply carries every field of the seed's result, with success false."""
    error = MessageError("missing_command", "message has no 'command' field", "r-9")
    result = error_result(error, datetime(2026, 1, 2, 3, 4, 5, 678000))
    assert result == {
        "request_id": "r-9",
        "command": None,
        "success": False,
        "output": "",
        "error": "message has no 'command' field",
        "returncode": -1,
        "timestamp": "2026-01-02T03:04:05.678000",
        "error_code": "missing_command",
    }


@given(st.binary(max_size=512), st.booleans())
def test_arbitrary_bytes_never_crash(payload: bytes, is_binary: bool) -> None:
    """Any payload either parses to a command with a string request_id or raises MessageError."""
    try:
        message = parse_command(payload, is_binary)
    except MessageError as e:
        json.dumps(error_result(e, datetime.now()))
    else:
        assert isinstance(message["command"], str)
        assert isinstance(message["request_id"], str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(["command", "request_id", "x"]), json_values))
def test_arbitrary_json_objects_never_crash(obj: dict[str, object]) -> None:
    """Any JSON object either parses or yields a JSON-serialisable error reply."""
    try:
        parse_command(json.dumps(obj).encode(), False)
    except MessageError as e:
        json.dumps(error_result(e, datetime.now()))
