"""Fast tests of the client library's pure parts: result parsing, the mapping of HTTP
statuses, close codes and error replies to exceptions, backoff, and output resumption."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from twistedgw.client import (
    AuthError,
    Backoff,
    CommandResult,
    CommandTimeout,
    ConnectionLost,
    FileEntry,
    GatewayError,
    PathNotFound,
    ProcessInfo,
    SandboxGone,
    SandboxInfo,
    TwistedgwError,
)
from twistedgw.client._async import (
    AsyncSandbox,
    _Channel,
    _check_result,
    _Retry,
    _Stream,
    _ws_url,
    resolve_token,
    resolve_url,
)
from twistedgw.client.errors import error_from_close, error_from_http, error_from_reply

RESULT = {
    "type": "result",
    "request_id": "r1",
    "command": "echo hi; exit 3",
    "success": False,
    "output": "hi\n",
    "error": "oops\n",
    "returncode": 3,
    "timestamp": "2026-11-26T12:34:56.789123",
    "duration_ms": 9.5,
    "truncated": False,
    "timed_out": False,
    "cancelled": False,
    "pid": 42,
}


def test_result_reads_every_field_of_a_result_message() -> None:
    """A full ``result`` message parses to the expected ``CommandResult``: ``returncode``,
    ``output`` and ``error`` become ``exit_code``, ``stdout``, ``stderr``; ``command``,
    ``request_id``, ``success``, ``duration_ms`` and ``pid`` are kept; the flags
    (``timed_out``, ``cancelled``, ``truncated``, ``oom_killed``), ``session`` and ``dropped``
    are read when set (``timestamp`` has no field)."""
    result = CommandResult.from_message(RESULT)
    assert result == CommandResult(
        command="echo hi; exit 3",
        request_id="r1",
        exit_code=3,
        stdout="hi\n",
        stderr="oops\n",
        success=False,
        duration_ms=9.5,
        pid=42,
    )
    flagged = CommandResult.from_message(
        {
            **RESULT,
            "timed_out": True,
            "cancelled": True,
            "truncated": True,
            "oom_killed": True,
            "session": "s1",
            "dropped": {"stdout": 5, "stderr": 0},
        }
    )
    assert (flagged.timed_out, flagged.cancelled, flagged.truncated, flagged.oom_killed) == (
        True,
        True,
        True,
        True,
    )
    assert flagged.session == "s1" and flagged.dropped == {"stdout": 5, "stderr": 0}


def test_streamed_output_replaces_the_empty_fields_of_a_streamed_result() -> None:
    """A streamed result (empty ``output``) given the received stdout takes it as ``stdout``,
    with ``success`` and ``exit_code`` still read from the message."""
    message = dict(RESULT, output="", error="", success=True, returncode=0)
    result = CommandResult.from_message(message, stdout="a\nb\n", stderr="")
    assert (result.stdout, result.success, result.exit_code) == ("a\nb\n", True, 0)


def test_a_result_missing_fields_parses_to_defaults_not_a_key_error() -> None:
    """A bare ``{"type": "result"}`` parses without error: exit code -1, not a success, no pid,
    empty stdout."""
    result = CommandResult.from_message({"type": "result"})
    assert result.exit_code == -1
    assert result.success is False and result.pid is None and result.stdout == ""


def test_wrongly_typed_fields_do_not_leak_into_the_result() -> None:
    """Fields of the wrong type fall back to the defaults: a string ``returncode`` is -1, a
    string ``success`` is False, a boolean ``pid`` is ``None``, a null ``duration_ms`` is 0.0,
    a non-mapping ``dropped`` is ``{}``."""
    result = CommandResult.from_message(
        {"returncode": "3", "success": "yes", "pid": True, "duration_ms": None, "dropped": 5}
    )
    assert (result.exit_code, result.success, result.pid, result.duration_ms) == (
        -1,
        False,
        None,
        0.0,
    )
    assert result.dropped == {}


def test_a_timed_out_result_raises_command_timeout_carrying_the_output() -> None:
    """A timed-out result raises ``CommandTimeout`` whose ``result`` keeps the stdout and whose
    message names the timeout (``2.0 s``); a result that did not time out is returned as is,
    even with a non-zero exit code."""
    result = CommandResult.from_message(dict(RESULT, timed_out=True, returncode=-9))
    with pytest.raises(CommandTimeout) as caught:
        _check_result(result, 2.0)
    assert caught.value.result.stdout == "hi\n"
    assert "2.0 s" in str(caught.value)
    assert _check_result(CommandResult.from_message(RESULT), 2.0).exit_code == 3


def test_process_sandbox_and_file_records_parse_their_json() -> None:
    """``ProcessInfo``, ``SandboxInfo`` and ``FileEntry`` read their JSON: a process's fields and
    ``running``/``background``, a finished one's return code (a string one is ``None``), a
    sandbox's state, metadata and unknown fields in ``raw``, a directory entry's ``is_dir``."""
    process = ProcessInfo.from_json(
        {
            "pid": 7,
            "request_id": "x",
            "command": "sleep 9",
            "state": "running",
            "returncode": None,
            "background": True,
            "started_at": 1.5,
            "bytes": {"stdout": 3, "stderr": 0},
            "dropped": {"stdout": 0, "stderr": 0},
            "watchers": 1,
        }
    )
    assert process.running and process.background and process.bytes == {"stdout": 3, "stderr": 0}
    assert (process.pid, process.request_id, process.command) == (7, "x", "sleep 9")
    assert (process.started_at, process.watchers, process.returncode) == (1.5, 1, None)
    finished = ProcessInfo.from_json({"pid": 8, "state": "exited", "returncode": 3})
    assert finished.returncode == 3 and not finished.running and not finished.background
    assert ProcessInfo.from_json({"returncode": "3"}).returncode is None
    sandbox = SandboxInfo.from_json(
        {
            "sandbox_id": "ab",
            "status": "idle",
            "created_at": 10,
            "state": "created",
            "expires_at": None,
            "metadata": {"k": "v"},
            "future_field": 1,
        }
    )
    assert sandbox.state == "created" and sandbox.expires_at is None
    assert sandbox.metadata == {"k": "v"} and sandbox.raw["future_field"] == 1
    entry = FileEntry.from_json({"name": "d", "path": "/home/sandbox/d", "type": "dir"})
    assert entry.is_dir and entry.size == 0


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (401, {"error": "missing or invalid token"}, AuthError),
        (403, {"error": "origin not allowed"}, AuthError),
        (404, {"error": "Sandbox not found"}, SandboxGone),
        (400, {"error": "'memory' exceeds the server maximum"}, GatewayError),
        (503, "Service Unavailable", GatewayError),
        (429, {"error": "too many sandboxes"}, GatewayError),
    ],
)
def test_http_statuses_map_to_one_exception_each(status: int, body: Any, kind: type) -> None:
    """For a sandbox's request, 401 and 403 raise ``AuthError``, a 404 naming the sandbox
    ``SandboxGone``, and 400, 429, 503 a ``GatewayError`` carrying the status in ``status``
    and its message; all are ``TwistedgwError``."""
    error = error_from_http(status, body, sandbox_id="abc")
    assert type(error) is kind
    assert isinstance(error, TwistedgwError)
    if kind is GatewayError:
        assert error.status == status  # type: ignore[attr-defined]
        assert str(status) in str(error)


def test_a_404_with_a_removal_reason_says_why_the_sandbox_is_gone() -> None:
    """A 404 with a removal record (``reason: idle``) is ``SandboxGone`` with ``reason``
    ``idle`` and a message saying ``removed (idle)``."""
    error = error_from_http(
        404,
        {
            "error": "Sandbox abc was removed (idle)",
            "sandbox_id": "abc",
            "status": "removed",
            "reason": "idle",
        },
        "abc",
    )
    assert isinstance(error, SandboxGone)
    assert error.reason == "idle" and "removed (idle)" in str(error)


def test_a_404_outside_a_sandbox_is_a_gateway_error() -> None:
    """A 404 with no sandbox id given is a plain ``GatewayError``, not ``SandboxGone``."""
    assert type(error_from_http(404, {"error": "no route"})) is GatewayError


def test_a_404_of_a_file_route_is_a_missing_path_not_a_gone_sandbox() -> None:
    """A sandbox's 404 whose error names a path is ``PathNotFound`` (status 404); one whose
    error is ``Sandbox ... not found`` is ``SandboxGone``."""
    error = error_from_http(404, {"error": "no such file or directory: /x"}, "abc")
    assert isinstance(error, PathNotFound) and error.status == 404
    gone = error_from_http(404, {"error": "Sandbox abc not found"}, "abc")
    assert isinstance(gone, SandboxGone)


def test_error_replies_keep_their_error_code() -> None:
    """A WebSocket error reply becomes a ``GatewayError`` with the reply's ``error_code`` as
    ``code`` and its ``error`` text in the message."""
    error = error_from_reply({"type": "error", "error": "bad cwd", "error_code": "invalid_cwd"})
    assert error.code == "invalid_cwd" and "bad cwd" in str(error)


@pytest.mark.parametrize(
    ("code", "reason", "gone"),
    [
        (4000, "sandbox deleted", True),
        (4000, "sandbox idle", True),
        (1011, "sandbox exited: container exited with code 137", True),
        (1011, "sandbox agent connection lost", False),
        (4001, "sandbox agent restarted: reconnect", False),
        (1001, "gateway shutting down", False),
        (1006, "", False),
        (None, "", False),
    ],
)
def test_close_codes_tell_a_gone_sandbox_from_one_worth_redialling(
    code: int | None, reason: str, gone: bool
) -> None:
    """Close 4000 (deleted, idle) and 1011 ``sandbox exited`` mean ``SandboxGone``; 1011 agent
    lost, 4001, 1001, 1006 and no close code mean no error (``None``: redial)."""
    error = error_from_close(code, reason, "abc")
    assert (error is not None) == gone
    if gone:
        assert isinstance(error, SandboxGone)


def test_a_deleted_sandbox_close_carries_the_reason() -> None:
    """Close 4000 ``sandbox lifetime`` is ``SandboxGone`` with ``reason`` ``lifetime``."""
    error = error_from_close(4000, "sandbox lifetime", "abc")
    assert isinstance(error, SandboxGone) and error.reason == "lifetime"


def test_backoff_doubles_up_to_its_maximum_and_stops_after_its_attempts() -> None:
    """Backoff(0.1, x2, max 0.5, 5 attempts) waits 0.1, 0.2, 0.4, 0.5, 0.5 with no jitter and
    0.8 times that at full jitter (0.2); ``total()`` is the no-jitter sum, 1.7."""
    backoff = Backoff(initial=0.1, factor=2, maximum=0.5, attempts=5, jitter=0.2)
    assert list(backoff.delays(rand=lambda: 0.0)) == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert list(backoff.delays(rand=lambda: 1.0)) == pytest.approx([0.08, 0.16, 0.32, 0.4, 0.4])
    assert backoff.total() == pytest.approx(1.7)


def test_the_channel_redials_with_the_backoffs_delays_then_gives_up() -> None:
    """A channel whose every dial is refused dials once, then sleeps the backoff's delays
    (1, 3, 5) before each of its 3 redials (4 dials), then raises ``ConnectionLost``
    ``after 3 attempts: refused``."""
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    channel = _Channel(
        "http://127.0.0.1:1",
        "abc",
        None,
        Backoff(initial=1, factor=3, maximum=5, attempts=3, jitter=0),
        sleep=sleep,
    )
    dials = 0

    async def refuse() -> Any:
        nonlocal dials
        dials += 1
        raise _Retry(GatewayError("refused"))

    channel._dial = refuse  # type: ignore[method-assign]
    with pytest.raises(ConnectionLost, match="after 3 attempts: refused"):
        asyncio.run(channel.ensure())
    assert slept == [1, 3, 5] and dials == 4


def test_the_channel_stops_redialling_at_once_when_the_sandbox_is_gone() -> None:
    """A dial raising ``SandboxGone`` is raised from ``ensure()`` with no backoff sleep (no
    redial)."""
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    channel = _Channel("http://h", "abc", None, Backoff(attempts=5), sleep=sleep)

    async def gone() -> Any:
        raise SandboxGone("sandbox abc not found", "abc")

    channel._dial = gone  # type: ignore[method-assign]
    with pytest.raises(SandboxGone):
        asyncio.run(channel.ensure())
    assert slept == []


def test_resumed_output_skips_what_was_already_received() -> None:
    """Output chunks carry UTF-8 byte offsets (``é`` counts 2): a chunk replayed from an offset
    already passed is dropped, so the text and the callback see each chunk once."""
    seen: list[str] = []
    stream = _Stream(seen.append)
    stream.feed("héllo ", 0)  # 7 bytes
    stream.feed("world", 7)
    assert stream.offset == 12
    stream.feed("world", 7)  # replayed after a redial from an older offset
    stream.feed("!", 12)
    assert stream.text() == "héllo world!" and seen == ["héllo ", "world", "!"]


def test_urls_and_tokens_come_from_the_arguments_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URL and token given win over ``$TWISTEDGW_URL``/``$TWISTEDGW_TOKEN``, which win over
    the default ``http://127.0.0.1:8003`` and no token (a trailing slash is dropped);
    ``https`` maps to ``wss`` and ``http`` to ``ws``."""
    monkeypatch.setenv("TWISTEDGW_URL", "http://gw.example:9/")
    monkeypatch.setenv("TWISTEDGW_TOKEN", "t0k")
    assert resolve_url(None) == "http://gw.example:9"
    assert resolve_url("http://a:1") == "http://a:1"
    assert resolve_token(None) == "t0k" and resolve_token("x") == "x"
    monkeypatch.delenv("TWISTEDGW_URL")
    monkeypatch.delenv("TWISTEDGW_TOKEN")
    assert resolve_url(None) == "http://127.0.0.1:8003" and resolve_token(None) is None
    assert _ws_url("https://gw:1") == "wss://gw:1" and _ws_url("http://gw:1") == "ws://gw:1"


def test_command_messages_carry_only_the_fields_given() -> None:
    """A command message has ``command``, ``request_id``, ``stream`` and, outside a session,
    ``ack``; ``timeout``, ``cwd``, ``stdin``, ``session`` and ``env`` only when given (a
    session command has no ``ack``)."""
    plain = AsyncSandbox._command_message("ls", "r", None, None, None, None, None)
    assert plain == {"command": "ls", "request_id": "r", "stream": True, "ack": True}
    session = AsyncSandbox._command_message("ls", "r", 5, "d", {"A": "1"}, "in", "main")
    assert session == {
        "command": "ls",
        "request_id": "r",
        "stream": True,
        "timeout": 5,
        "cwd": "d",
        "stdin": "in",
        "session": "main",
        "env": {"A": "1"},
    }
