"""The shared wire protocol (``twistedgw.protocol``): parsing, validation, replies, encoding."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from twistedgw import protocol
from twistedgw.lifecycle.errors import InvalidSettings
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import settings_from_body
from twistedgw.protocol import (
    CONTROL_PARSERS,
    ERROR_CODES,
    MAX_ECHO_LENGTH,
    MAX_ENV_ENTRIES,
    Cancel,
    CloseSession,
    Command,
    Limits,
    ListSessions,
    ProtocolError,
    Stdin,
    TerminalInput,
    command_error,
    control_error,
    encode,
    parse_message,
    validate_env,
)
from twistedgw.registry import SandboxRegistry
from twistedgw.testing.fakes import FakeRuntime

LIMITS = Limits(default_timeout=30, max_timeout=60)
ROOT = Path(__file__).resolve().parent.parent
SEED_RESULT_FIELDS = {
    "request_id",
    "command",
    "success",
    "output",
    "error",
    "returncode",
    "timestamp",
}


def parse(message: Any, limits: Limits = LIMITS) -> protocol.Message:
    return parse_message(json.dumps(message).encode(), False, limits, lambda: "generated")


def error_of(payload: bytes, is_binary: bool = False, limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_message(payload, is_binary, limits)
    return info.value


def strict_json(data: bytes) -> Any:
    """Parse ``data`` as strict UTF-8 JSON (no NaN/Infinity); fail the test otherwise."""

    def no_constants(name: str) -> Any:
        raise AssertionError(f"encoder produced non-standard JSON constant {name}")

    return json.loads(data.decode("utf-8"), parse_constant=no_constants)


# -- valid messages --------------------------------------------------------------------------


def test_seed_message_gets_request_id_and_default_timeout() -> None:
    """A seed message gets a fresh request_id and the policy's default timeout, nothing else."""
    message = parse({"command": "ls -la"})
    assert message == Command(request_id="generated", command="ls -la", timeout=30.0)
    assert message.to_wire() == {"command": "ls -la", "request_id": "generated", "timeout": 30.0}


def test_options_are_kept_and_forwarded() -> None:
    """A client's request_id and valid options reach the wire unchanged."""
    wire = {
        "command": "cat",
        "request_id": "r-1",
        "timeout": 1.5,
        "cwd": "/tmp",
        "env": {"FOO": "bar", "_X1": ""},
        "stdin": "hello\x00",
        "stream": True,
        "session": "main-1.x",
    }
    assert parse(wire).to_wire() == wire
    assert parse({"command": "cat", "interactive": True}).to_wire()["interactive"] is True


def test_null_counts_as_absent_and_unknown_keys_are_dropped() -> None:
    """``null`` values are absent (as the agent always had it); extras are not forwarded."""
    message = parse({"command": "ls", "type": None, "timeout": None, "cwd": None, "junk": [1]})
    assert message.to_wire() == {"command": "ls", "request_id": "generated", "timeout": 30.0}


def test_control_messages_are_normalised() -> None:
    """Control messages parse into their records and go on the wire with only their fields."""
    assert parse({"type": "cancel", "request_id": "r", "junk": 1}) == Cancel("r")
    assert parse({"type": "stdin", "request_id": "r", "data": "x"}).to_wire() == {
        "type": "stdin",
        "request_id": "r",
        "data": "x",
        "eof": False,
    }
    assert parse({"type": "list_sessions"}) == ListSessions(None)
    assert parse({"type": "close_session", "session": "s"}) == CloseSession("s", None)


def test_control_types_form_one_table() -> None:
    """Every message type but ``command`` comes from the one parser table (new types slot in)."""
    assert set(CONTROL_PARSERS) == {
        "cancel",
        "stdin",
        "list_sessions",
        "close_session",
        "attach",
        "processes",
        "signal",
        "subscribe_events",
        "watch",
        "unwatch",
        "pty",
        "resize",
    }
    assert protocol.MESSAGE_TYPES == ("command", *CONTROL_PARSERS)


def test_watch_and_unwatch_parse() -> None:
    """``watch`` takes a path and an optional ``recursive``; both need a request id; a bad
    path is an ``invalid_path`` control error."""
    watch = protocol.parse_message(
        b'{"type": "watch", "path": "src", "recursive": true, "request_id": "w"}', False
    )
    assert watch == protocol.Watch("w", "src", True)
    assert watch.to_wire() == {"type": "watch", "request_id": "w", "path": "src", "recursive": True}
    assert protocol.parse_message(b'{"type": "unwatch", "request_id": "w"}', False) == (
        protocol.Unwatch("w")
    )
    for bad in (
        b'"path": ""',
        b'"path": "a\\u0000b"',
        b'"path": 5',
        b'"path": "a", "recursive": 1',
    ):
        with pytest.raises(protocol.ProtocolError) as info:
            protocol.parse_message(b'{"type": "watch", "request_id": "w", ' + bad + b"}", False)
        assert info.value.code == "invalid_path"
        assert info.value.reply()["request_id"] == "w"
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.parse_message(b'{"type": "unwatch"}', False)
    assert info.value.code == "invalid_request_id"


# -- invalid messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "is_binary", "code"),
    [
        (b"not json", False, "invalid_json"),
        (b"\xff\xfe", False, "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, False, "invalid_json"),
        (b'{"command": "ls", "timeout": ' + b"9" * 5000 + b"}", False, "invalid_json"),
        (b"[1, 2]", False, "invalid_message"),
        (b'"ls"', False, "invalid_message"),
        (b"{}", False, "missing_command"),
        (b'{"command": 5}', False, "invalid_command"),
        (b'{"command": "a\\u0000b"}', False, "invalid_command"),
        (b'{"command": "echo \\ud800"}', False, "invalid_command"),
        (b'{"command": "ls", "request_id": 7}', False, "invalid_request_id"),
        (b'{"command": "ls", "request_id": "\\udc00"}', False, "invalid_request_id"),
        (b'{"command": "ls", "request_id": "' + b"x" * 300 + b'"}', False, "invalid_request_id"),
        (b'{"command": "ls"}', True, "binary_message"),
        (b'{"command": "ls", "timeout": 0}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": -1}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": "5"}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": true}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": 1e999}', False, "invalid_timeout"),
        (b'{"command": "ls", "timeout": NaN}', False, "invalid_timeout"),
        (b'{"command": "ls", "cwd": ""}', False, "invalid_cwd"),
        (b'{"command": "ls", "cwd": 3}', False, "invalid_cwd"),
        (b'{"command": "ls", "cwd": "/tmp/\\ud800"}', False, "invalid_cwd"),
        (b'{"command": "ls", "env": []}', False, "invalid_env"),
        (b'{"command": "ls", "env": {"A=B": "x"}}', False, "invalid_env"),
        (b'{"command": "ls", "env": {"A": 1}}', False, "invalid_env"),
        (b'{"command": "ls", "env": {"A": "\\ud800"}}', False, "invalid_env"),
        (b'{"command": "ls", "stdin": {}}', False, "invalid_stdin"),
        (b'{"command": "ls", "stdin": "\\ud800"}', False, "invalid_stdin"),
        (b'{"command": "ls", "stream": "yes"}', False, "invalid_stream"),
        (b'{"command": "ls", "interactive": 1}', False, "invalid_interactive"),
        (b'{"command": "ls", "session": "a b"}', False, "invalid_session"),
        (b'{"command": "ls", "session": ""}', False, "invalid_session"),
        (b'{"command": "ls", "session": "s", "interactive": true}', False, "unsupported"),
        (b'{"type": "launch"}', False, "unknown_type"),
        (b'{"type": 5}', False, "unknown_type"),
        (b'{"type": "cancel"}', False, "invalid_request_id"),
        (b'{"type": "stdin", "request_id": "r", "data": 5}', False, "invalid_stdin"),
        (b'{"type": "stdin", "request_id": "r", "data": "\\ud800"}', False, "invalid_stdin"),
        (b'{"type": "stdin", "request_id": "r", "eof": "y"}', False, "invalid_stdin"),
        (b'{"type": "close_session"}', False, "invalid_session"),
        (b'{"type": "list_sessions", "request_id": 1}', False, "invalid_request_id"),
    ],
)
def test_invalid_messages(payload: bytes, is_binary: bool, code: str) -> None:
    """Each kind of bad message raises ProtocolError with its own code, listed in ERROR_CODES."""
    error = error_of(payload, is_binary)
    assert error.code == code
    assert code in ERROR_CODES


# -- the drift items of issue 9: one rule each ----------------------------------------------


@pytest.mark.parametrize(
    ("env", "valid"),
    [
        ({"A" * 256: "x"}, True),  # creation allowed 128 characters, commands 256
        ({f"V{i}": "x" for i in range(MAX_ENV_ENTRIES)}, True),  # creation allowed 128 entries
        ({f"V{i}": "x" for i in range(MAX_ENV_ENTRIES + 1)}, False),
        ({"A" * 257: "x"}, False),
        ({"MY-VAR": "x"}, False),  # the agent allowed any key without '='
        ({"1A": "x"}, False),
        ({"": "x"}, False),
    ],
)
def test_env_rule_is_one_for_creation_and_commands(env: dict[str, str], valid: bool) -> None:
    """The creation body's env and a command's env accept exactly the same names and sizes."""
    manager = SandboxManager(SandboxRegistry(), FakeRuntime(), Clock())
    try:
        settings_from_body(manager.policy, {"env": env})
        creation_ok = True
    except InvalidSettings:
        creation_ok = False
    try:
        parse({"command": "env", "env": env})
        command_ok = True
    except ProtocolError as e:
        assert e.code == "invalid_env"
        command_ok = False
    assert (creation_ok, command_ok) == (valid, valid)


def test_validate_env_caps_values_only_when_asked() -> None:
    """The value cap is a caller's policy (the creation body's 32 KiB), not the protocol's."""
    assert validate_env({"A": "x" * 100}) == {"A": "x" * 100}
    with pytest.raises(ProtocolError) as info:
        validate_env({"A": "x" * 100}, max_value_length=99)
    assert info.value.code == "invalid_env"


@pytest.mark.parametrize("limits", [LIMITS, Limits(default_timeout=900, max_timeout=86400)])
def test_timeout_above_maximum_is_an_error_not_a_clamp(limits: Limits) -> None:
    """Above the end's maximum, ``timeout`` is ``invalid_timeout`` (the agent used to clamp)."""
    over = limits.max_timeout + 1
    error = error_of(json.dumps({"command": "sleep 1", "timeout": over}).encode(), limits=limits)
    assert error.code == "invalid_timeout"
    assert parse({"command": "x", "timeout": limits.max_timeout}, limits).timeout == (
        limits.max_timeout
    )


@pytest.mark.parametrize("timeout", [10**400, -(10**400), 10**4000])
def test_integer_beyond_float_range_is_invalid_timeout(timeout: int) -> None:
    """A JSON integer too big for a float (issue 11 defect 7) is an error reply, no overflow."""
    payload = b'{"command": "echo", "request_id": "big", "timeout": ' + str(timeout).encode()
    error = error_of(payload + b"}")
    assert (error.code, error.request_id, error.command) == ("invalid_timeout", "big", "echo")
    strict_json(encode(error.reply()))


def test_positive_seconds_handles_any_json_number() -> None:
    """The shared seconds check converts only numbers already known to be in range."""
    assert protocol.positive_seconds(10, 60) == 10.0
    for bad in (10**400, 1e999, float("nan"), 0, -1, True, "5", None):
        with pytest.raises(ValueError):
            protocol.positive_seconds(bad, 60)


def test_command_error_reply_has_one_shape() -> None:
    """A command error carries the seed's result fields, duration_ms 0.0 and truncated false."""
    error = ProtocolError("missing_command", "message has no 'command' field", "r-9")
    assert error.reply(datetime(2026, 1, 2, 3, 4, 5, 678000)) == {
        "type": "error",
        "request_id": "r-9",
        "command": None,
        "success": False,
        "output": "",
        "error": "message has no 'command' field",
        "returncode": -1,
        "timestamp": "2026-01-02T03:04:05.678000",
        "error_code": "missing_command",
        "duration_ms": 0.0,
        "truncated": False,
    }


def test_control_error_reply_is_short() -> None:
    """An error reply to a control message says what and why, and nothing more."""
    error = error_of(b'{"type": "launch", "request_id": "r"}')
    assert error.reply() == {
        "type": "error",
        "request_id": "r",
        "error": error.message,
        "error_code": "unknown_type",
    }
    assert control_error(7, "x", "unknown_request")["request_id"] is None


def test_every_error_code_is_documented() -> None:
    """PROTOCOL.md's table of error codes is exactly ERROR_CODES (internal_error included),
    and README points to it."""
    spec = (ROOT / "PROTOCOL.md").read_text()
    section = spec.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE)
    assert "internal_error" in ERROR_CODES
    assert sorted(documented) == sorted(ERROR_CODES)
    assert "PROTOCOL.md" in (ROOT / "README.md").read_text()


def test_unknown_error_code_is_a_bug() -> None:
    """A code that is not in ERROR_CODES cannot be sent by mistake."""
    with pytest.raises(ValueError):
        ProtocolError("no_such_code", "x")


# -- issue 10 defect 3 and issue 11 defect 5: every reply encodes, none echoes megabytes -----


def test_lone_surrogate_command_gets_an_encodable_reply() -> None:
    """``{"command": "echo \\ud800"}`` is refused, and the reply encodes to valid UTF-8 JSON."""
    error = error_of(b'{"command": "echo \\ud800"}')
    assert error.code == "invalid_command"
    reply = strict_json(encode(error.reply()))
    assert reply["command"] == "echo \ufffd"
    assert reply["error_code"] == "invalid_command"


def test_encode_replaces_lone_surrogates_anywhere() -> None:
    """Lone surrogates in values and keys become U+FFFD; pairs written as one char stay."""
    data = encode({"a\udfff": ["x\ud800y", "\U0001f600"], "b": "\ud83d\ude00"})
    assert strict_json(data) == {"a\ufffd": ["x\ufffdy", "\U0001f600"], "b": "\ufffd\ufffd"}


def test_encode_never_writes_nan_or_unprintable_ints() -> None:
    """Non-finite floats and ints too long to print become null instead of raising."""
    data = encode({"a": math.nan, "b": [math.inf], "c": 10**5000, "d": 10**400})
    assert strict_json(data) == {"a": None, "b": [None], "c": None, "d": 10**400}


def test_error_reply_echoes_a_short_prefix_of_the_command() -> None:
    """An invalid 8 MB command is echoed as 256 characters and a cut marker, not 8 MB."""
    command = "x" * (8 * 1024 * 1024) + "\x00"
    error = error_of(json.dumps({"command": command}).encode())
    reply = strict_json(encode(error.reply()))
    assert reply["command"] == "x" * MAX_ECHO_LENGTH + protocol.ECHO_CUT_MARKER
    assert reply["command_truncated"] is True
    assert len(encode(error.reply())) < 2048


def test_short_commands_are_echoed_whole() -> None:
    """A command within the echo cap is echoed as sent, with no cut marker."""
    reply = command_error("r", "y" * MAX_ECHO_LENGTH, "bad", "invalid_timeout")
    assert reply["command"] == "y" * MAX_ECHO_LENGTH
    assert "command_truncated" not in reply


def test_results_echo_the_full_command() -> None:
    """A result (the seed's contract) echoes the whole command, however long."""
    result = protocol.result_message("r", "z" * 10_000, 0, output="ok")
    assert result["command"] == "z" * 10_000
    assert result["success"] is True
    assert set(result) >= SEED_RESULT_FIELDS
    limited = protocol.result_message("r", "yes", 0, truncated=True, output_limit_exceeded=True)
    assert limited["success"] is False and limited["output_limit_exceeded"] is True


def test_limits_reject_inconsistent_policy() -> None:
    """A policy whose default exceeds its maximum (or is not positive) cannot be built."""
    with pytest.raises(ValueError):
        Limits(default_timeout=10, max_timeout=5)
    with pytest.raises(ValueError):
        Limits(default_timeout=0)
    with pytest.raises(ValueError):
        Limits(max_timeout=math.inf)


def test_gateway_close_codes_are_the_protocols() -> None:
    """The close codes the gateway sends are the ones PROTOCOL.md documents."""
    from twistedgw import service
    from twistedgw.lifecycle import core, manager
    from twistedgw.proxy import client as proxy

    assert proxy.CLOSE_AGENT_LOST == protocol.CLOSE_AGENT_LOST
    assert service.CLOSE_GOING_AWAY == protocol.CLOSE_GOING_AWAY
    assert manager.CLOSE_SANDBOX_REMOVED == protocol.CLOSE_SANDBOX_REMOVED
    assert core.CLOSE_SANDBOX_GONE == protocol.CLOSE_AGENT_LOST
    assert proxy.CLOSE_AGENT_RESTARTED == protocol.CLOSE_AGENT_RESTARTED == 4001


# -- properties: the production encoder on whatever a client can send -----------------------

surrogates = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
any_text = st.text(alphabet=st.characters(exclude_categories=()))
#: Text that often holds lone surrogates, NUL or '=' (each test run sees many of them).
text = any_text | st.tuples(any_text, surrogates | st.sampled_from(["\x00", "="]), any_text).map(
    "".join
)
numbers = (
    st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.sampled_from([10**400, -(10**400), 0, 1, 60, 61])
    | st.floats()
)
leaves = st.none() | st.booleans() | numbers | text
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=20,
)
deep = st.integers(min_value=1, max_value=400).map(lambda n: json.loads("[" * n + "]" * n))
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
]
field_values = (
    text
    | numbers
    | st.sampled_from(list(protocol.MESSAGE_TYPES))
    | st.dictionaries(text, text, max_size=4)
    | json_values
    | deep
)
#: Messages keyed mostly by the protocol's own field names, plus a few unknown keys.
messages = st.builds(
    lambda known, extra: {**extra, **known},
    st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=8),
    st.dictionaries(text, field_values, max_size=2),
)


def assert_answers(payload: bytes, is_binary: bool = False) -> None:
    """Parsing ``payload`` either yields a message whose wire form encodes to strict UTF-8
    JSON, or raises ProtocolError whose reply does. Any other exception fails the test."""
    try:
        message = parse_message(payload, is_binary, LIMITS)
    except ProtocolError as e:
        reply = strict_json(encode(e.reply()))
        assert reply["error_code"] == e.code and e.code in ERROR_CODES
        assert reply["type"] == "error"
        if not e.control:
            assert set(reply) >= SEED_RESULT_FIELDS | {"duration_ms", "truncated"}
        assert len(encode(e.reply())) < 8192  # echoes are capped
    else:
        if isinstance(message, TerminalInput):
            # The one message that is not JSON: a binary frame of terminal input (0x02, pid,
            # data), passed on to the agent as the same frame.
            assert is_binary and message.to_frame() == payload
            return
        wire = strict_json(encode(message.to_wire()))
        if isinstance(message, Command):
            assert wire["command"] == message.command
            assert 0 < wire["timeout"] <= LIMITS.max_timeout


@settings(max_examples=300)
@given(messages)
def test_any_json_object_gets_an_encodable_answer(obj: dict[str, Any]) -> None:
    """Any JSON object (lone surrogates, huge ints, deep nesting) parses or gets a reply."""
    assert_answers(json.dumps(obj).encode("ascii"))


@given(json_values)
def test_any_json_value_gets_an_encodable_answer(value: Any) -> None:
    """Any JSON value, object or not, parses or gets a reply that encodes."""
    assert_answers(json.dumps(value).encode("ascii"))


@given(st.binary(max_size=512), st.booleans())
def test_any_bytes_get_an_encodable_answer(payload: bytes, is_binary: bool) -> None:
    """Any bytes, as a text or a binary frame, parse or get a reply that encodes."""
    assert_answers(payload, is_binary)


@given(st.dictionaries(text, json_values, max_size=6))
def test_encode_never_raises(obj: dict[str, Any]) -> None:
    """The production encoder turns any JSON-able object into strict UTF-8 JSON."""
    strict_json(encode(obj))


@given(text, text, st.sampled_from(sorted(ERROR_CODES)))
def test_error_builders_always_encode(command: str, request_id: str, code: str) -> None:
    """Error replies built from any client text encode, and echo at most the cap."""
    reply = strict_json(encode(command_error(request_id, command, command, code)))
    assert len(reply["command"]) <= MAX_ECHO_LENGTH + len(protocol.ECHO_CUT_MARKER)
    strict_json(encode(control_error(request_id, command, code)))


def test_stdin_record_to_wire() -> None:
    """A stdin message keeps NUL in its data (stdin is bytes to the process)."""
    assert parse({"type": "stdin", "request_id": "r", "data": "a\x00", "eof": True}) == Stdin(
        "r", "a\x00", True
    )


def test_module_is_standard_library_only(tmp_path: Path) -> None:
    """protocol.py imports only the standard library and works on a bare interpreter (no site
    packages), as it must inside the sandbox image next to an empty twistedgw/__init__.py."""
    import ast
    import subprocess
    import sys

    source = (ROOT / "twistedgw" / "protocol.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= sys.stdlib_module_names | {"__future__"}, imported

    package = tmp_path / "twistedgw"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "protocol.py").write_text(source)
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from twistedgw import protocol as p\n"
        'm = p.parse_message(b\'{"command": "echo hi", "timeout": 5}\')\n'
        "print(p.encode(m.to_wire()).decode())\n"
        "try:\n"
        '    p.parse_message(b\'{"command": "echo \\\\ud800"}\')\n'
        "except p.ProtocolError as e:\n"
        "    print(p.encode(e.reply()).decode())\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] not in sys.stdlib_module_names"
        " and n.split('.')[0] not in ('twistedgw', '__main__')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    assert json.loads(out[0])["timeout"] == 5.0
    assert json.loads(out[1])["error_code"] == "invalid_command"
    assert out[2] == "[]"


# -- PTY sessions (issue 16) -------------------------------------------------------------------


def test_pty_and_resize_parse_into_records_and_go_on_the_wire_with_their_fields() -> None:
    """A ``pty`` keeps command/cwd/env/binary; defaults stay off the wire; ``resize`` names
    its process by pid or request id."""
    pty = protocol.parse_object(
        {"type": "pty", "request_id": "t", "cols": 100, "rows": 30, "env": {"A": "1"}}
    )
    assert pty == protocol.Pty("t", 100, 30, None, None, {"A": "1"}, False)
    assert pty.to_wire() == {
        "type": "pty",
        "request_id": "t",
        "cols": 100,
        "rows": 30,
        "env": {"A": "1"},
    }
    full = {"type": "pty", "request_id": "t", "cols": 1, "rows": 4096, "command": "vim"}
    wire = protocol.parse_object({**full, "cwd": "src", "binary": True, "extra": None}).to_wire()
    assert wire == {**full, "cwd": "src", "binary": True}
    resize = protocol.parse_object({"type": "resize", "pid": 7, "cols": 80, "rows": 24})
    assert resize == protocol.Resize(80, 24, 7, None)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "pty", "request_id": "t", "cols": 80}, "invalid_size"),
        ({"type": "pty", "request_id": "t", "cols": True, "rows": 24}, "invalid_size"),
        ({"type": "pty", "request_id": "t", "cols": 4097, "rows": 24}, "invalid_size"),
        ({"type": "pty", "request_id": "t", "cols": 80, "rows": 24, "tty": 1}, "unknown_field"),
        (
            {"type": "pty", "request_id": "t", "cols": 80, "rows": 24, "command": " "},
            "invalid_command",
        ),
        (
            {"type": "pty", "request_id": "t", "cols": 80, "rows": 24, "env": {"1": "x"}},
            "invalid_env",
        ),
        (
            {"type": "pty", "request_id": "t", "cols": 80, "rows": 24, "cwd": ""},
            "invalid_cwd",
        ),
        ({"type": "pty", "cols": 80, "rows": 24}, "invalid_request_id"),
        ({"type": "resize", "request_id": "t", "cols": 80, "rows": 0}, "invalid_size"),
        ({"type": "resize", "request_id": "t", "cols": 80, "rows": 24, "x": 1}, "unknown_field"),
        ({"type": "attach", "pid": 3, "takeover": "yes"}, "invalid_binary"),
        ({"type": "attach", "pid": 3, "since": {"tty": 0}}, "invalid_since"),
    ],
)
def test_invalid_pty_messages_are_control_errors(message: dict[str, Any], code: str) -> None:
    """Each PTY mistake has its own code, in the short control error form."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_object(message)
    reply = caught.value.reply()
    assert (reply["type"], reply["error_code"]) == ("error", code)
    assert "command" not in reply


def test_attach_sends_a_pty_offset_only_when_it_is_set() -> None:
    """An agent of an older image refuses a ``pty`` key in ``since``: it goes on the wire only
    when a client asked for an offset in that stream."""
    plain = protocol.parse_object({"type": "attach", "pid": 3, "since": 5})
    assert plain.to_wire()["since"] == {"stdout": 5, "stderr": 5, "pty": 5}
    default = protocol.parse_object({"type": "attach", "pid": 3})
    assert default.to_wire() == {
        "type": "attach",
        "pid": 3,
        "request_id": None,
        "since": {"stdout": 0, "stderr": 0},
    }
    taken = protocol.parse_object({"type": "attach", "pid": 3, "takeover": True, "binary": True})
    assert taken.to_wire()["takeover"] is True and taken.to_wire()["binary"] is True


def test_binary_frames_are_terminal_input_or_an_error() -> None:
    """A binary frame 0x02 + u32 pid + bytes is terminal input (any bytes, not only UTF-8);
    any other binary frame is still ``binary_message``."""
    frame = b"\x02\x00\x00\x01\x00" + b"\xff\x03"
    message = protocol.parse_message(frame, True)
    assert message == protocol.TerminalInput(256, b"\xff\x03")
    assert isinstance(message, protocol.TerminalInput) and message.to_frame() == frame
    for bad in (b"\x02\x00\x00", b'{"command": "ls"}', b"\x01" + bytes(12)):
        assert error_of(bad, True).code == "binary_message"
    assert error_of(b"\x02\x00\x00\x00\x00x", True).code == "invalid_pid"
    head = protocol.binary_output_frame(5, 1 << 40, b"ab")
    assert protocol.BINARY_OUTPUT_HEAD.unpack_from(head) == (protocol.BINARY_OUTPUT, 5, 1 << 40)
    assert head[protocol.BINARY_OUTPUT_HEAD.size :] == b"ab"


CONTROL_MESSAGES = [
    protocol.Cancel("r1"),
    protocol.Stdin("r1"),
    protocol.ListSessions(request_id="r1"),
    protocol.CloseSession("s1", request_id="r1"),
    protocol.Attach({}, request_id="r1"),
    protocol.Processes(request_id="r1"),
    protocol.Signal("TERM", request_id="r1"),
    protocol.SubscribeEvents(request_id="r1"),
    protocol.Pty("r1", 80, 24),
    protocol.Resize(80, 24, request_id="r1"),
    protocol.Watch("r1", "/home/sandbox"),
    protocol.Unwatch("r1"),
]


@pytest.mark.parametrize("message", CONTROL_MESSAGES, ids=lambda m: type(m).__name__)
def test_a_control_message_fails_with_the_short_error_form(message: Any) -> None:
    """``error()`` of every control message gives the control error reply (``type: error``,
    its ``request_id`` echoed, no ``command`` or result fields), not a command's result shape."""
    error = message.error("invalid_message", "bad field")
    assert (error.code, error.request_id, error.control) == ("invalid_message", "r1", True)
    assert error.reply() == {
        "type": "error",
        "request_id": "r1",
        "error": "bad field",
        "error_code": "invalid_message",
    }


def test_stdin_needs_a_request_id() -> None:
    """Stdin names the command it feeds: without a ``request_id`` it is refused (the protocol
    error says so) rather than sent to no command; with one it parses."""
    with pytest.raises(ProtocolError) as refused:
        parse_message(json.dumps({"type": "stdin", "data": "x"}).encode(), False)
    assert (refused.value.code, refused.value.message) == (
        "invalid_request_id",
        "a stdin message needs a 'request_id'",
    )
    parsed = parse_message(
        json.dumps({"type": "stdin", "data": "x", "request_id": "r1"}).encode(), False
    )
    assert (parsed.request_id, parsed.data) == ("r1", "x")
