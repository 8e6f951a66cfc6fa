"""Black-box protocol suite: a real agent process on a Unix socket, driven over WebSocket.

Written against PROTOCOL.md (and the agent behaviour its package docstring documents), not
against the implementation: it talks to the socket with the ``websockets`` library (or raw
frames), and looks at the process only from outside (/proc).  Every test runs against the agent
on this host's Python ("host") and once more inside the real sandbox image ("image",
integration: needs Docker and the image).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, unix_connect

from tests.agent.blackbox import AgentServer, RawClient, http_get

MAX_TIMEOUT = 120


@pytest.fixture(
    scope="module", params=["host", pytest.param("image", marks=pytest.mark.integration)]
)
def server(request: pytest.FixtureRequest) -> Iterator[AgentServer]:
    srv = AgentServer(request.param, AGENT_MAX_TIMEOUT=str(MAX_TIMEOUT), AGENT_MAX_SESSIONS="4")
    yield srv
    srv.stop()


@pytest.fixture
def ws(server: AgentServer) -> Iterator[ClientConnection]:
    with unix_connect(
        server.socket,
        "ws://localhost/agent",
        additional_headers={"Authorization": f"Bearer {server.secret}"},
        max_size=None,
        open_timeout=10,
    ) as conn:
        yield conn
    assert server.alive()


def send(ws: ClientConnection, message: Any) -> None:
    ws.send(json.dumps(message))


def recv(ws: ClientConnection, timeout: float = 15.0) -> dict[str, Any]:
    reply = json.loads(ws.recv(timeout=timeout))
    assert isinstance(reply, dict)
    return reply


def run(ws: ClientConnection, command: str, **fields: Any) -> dict[str, Any]:
    """Send a command and return its final message (result or error)."""
    rid = fields.pop("request_id", f"r{time.monotonic_ns()}")
    send(ws, {"request_id": rid, "command": command, **fields})
    while True:
        reply = recv(ws)
        if reply.get("request_id") == rid and reply["type"] in ("result", "error"):
            return reply


def test_the_agent_runs_on_the_image_python(server: AgentServer) -> None:
    """The host runs of this suite stand for the image only on the image's Python: Debian
    bookworm's 3.11 (the agent needs nothing but the standard library)."""
    if server.where == "host":
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    else:
        assert server.container is not None
        out = subprocess.run(
            ["docker", "exec", server.container, "python3", "-c",
             "import sys; print(*sys.version_info[:2], sep='.')"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        version = out.stdout.strip()
    assert version == "3.11"


# --- HTTP side --------------------------------------------------------------------------------


def test_healthz_answers_ok_without_auth(server: AgentServer) -> None:
    """A ``GET /healthz`` with no ``Authorization`` header is answered ``200`` with the body
    ``ok``."""
    response = http_get(server.socket, "/healthz")
    assert response.startswith(b"HTTP/1.1 200")
    assert response.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic x"])
def test_a_handshake_without_the_secret_is_refused_with_401(
    server: AgentServer, auth: str | None
) -> None:
    """A WebSocket handshake with no ``Authorization`` header, a wrong bearer token or a Basic
    one is refused with HTTP 401."""
    headers = {"Authorization": auth} if auth else {}
    with pytest.raises(InvalidStatus) as err:
        unix_connect(server.socket, "ws://localhost/agent", additional_headers=headers)
    assert err.value.response.status_code == 401


def test_unknown_paths_are_404(server: AgentServer) -> None:
    """A ``GET`` of a path the agent does not serve (``/nope``) is answered ``404``."""
    assert http_get(server.socket, "/nope").startswith(b"HTTP/1.1 404")


# --- commands ---------------------------------------------------------------------------------


def test_a_command_result_has_the_protocol_fields(ws: ClientConnection) -> None:
    """A command's ``result`` carries its request id and command, its stdout, stderr and exit
    code (3: ``success`` false), ``timed_out``, ``cancelled`` and ``truncated`` false, a float
    ``duration_ms`` and a string ``timestamp``."""
    result = run(ws, "echo out; echo err >&2; exit 3", request_id="r-fields")
    assert result["type"] == "result"
    assert result["request_id"] == "r-fields"
    assert result["command"] == "echo out; echo err >&2; exit 3"
    assert (result["output"], result["error"], result["returncode"]) == ("out\n", "err\n", 3)
    assert result["success"] is False
    assert result["timed_out"] is False and result["cancelled"] is False
    assert result["truncated"] is False
    assert isinstance(result["duration_ms"], float)
    assert isinstance(result["timestamp"], str)


def test_a_command_without_request_id_gets_one(ws: ClientConnection) -> None:
    """A command sent without ``request_id`` gets a ``result`` whose ``request_id`` is a
    non-empty string the agent chose."""
    send(ws, {"command": "true"})
    result = recv(ws)
    assert result["type"] == "result"
    assert isinstance(result["request_id"], str) and result["request_id"]


def test_commands_get_a_clean_environment_and_the_request_env(ws: ClientConnection) -> None:
    """A command's environment holds the request's ``env`` variable (``FOO``) but neither
    ``SANDBOX_AGENT_SECRET`` nor any ``AGENT_*`` variable of the agent."""
    result = run(ws, "env", env={"FOO": "bar"})
    names = {line.split("=", 1)[0] for line in result["output"].splitlines()}
    assert "FOO" in names
    assert "SANDBOX_AGENT_SECRET" not in names
    assert not any(name.startswith("AGENT_") for name in names)


def test_stdin_text_is_fed_and_closed(ws: ClientConnection) -> None:
    """A command's ``stdin`` text is written to it and its stdin then closed: ``cat`` prints it,
    ends, and the command goes on to ``echo done``."""
    assert run(ws, "cat; echo done", stdin="hello\n")["output"] == "hello\ndone\n"


def test_cwd_is_relative_to_home(ws: ClientConnection) -> None:
    """A relative ``cwd`` is taken from the home directory: ``pwd`` in ``cwd=bb-dir`` prints
    ``HOME/bb-dir``."""
    home = run(ws, "pwd")["output"].strip()
    run(ws, "mkdir -p bb-dir")
    assert run(ws, "pwd", cwd="bb-dir")["output"].strip() == f"{home}/bb-dir"


def test_streamed_output_arrives_in_order_before_the_result(ws: ClientConnection) -> None:
    """With ``stream`` set, all of stdout (3000 lines) and stderr arrive, in order, as ``output``
    messages of the request before its ``result``, whose ``output`` and ``error`` are then empty."""
    send(ws, {"request_id": "s", "command": "seq 1 3000; echo end >&2", "stream": True})
    out, err = [], []
    while True:
        msg = recv(ws)
        if msg["type"] == "output":
            assert msg["request_id"] == "s"
            (out if msg["stream"] == "stdout" else err).append(msg["data"])
            continue
        assert msg["type"] == "result"
        break
    assert "".join(out) == "".join(f"{i}\n" for i in range(1, 3001))
    assert "".join(err) == "end\n"
    assert (msg["output"], msg["error"], msg["success"]) == ("", "", True)


def test_a_timeout_kills_the_whole_process_group(ws: ClientConnection) -> None:
    """A 0.5 s timeout on ``sleep 60.123 & sleep 60`` gives a result within 10 s with
    ``timed_out`` true, returncode -9 and ``success`` false, and the backgrounded sleep of the
    same process group is gone too (no process's command line starts with it)."""
    started = time.monotonic()
    result = run(ws, "sleep 60.123 & sleep 60", timeout=0.5)
    assert time.monotonic() - started < 10
    assert result["timed_out"] is True
    assert result["returncode"] == -9
    assert result["success"] is False
    count = (
        "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < \"$f\"; echo; done 2>/dev/null"
        " | grep -c '^sleep 60.123 '"
    )
    for _ in range(50):
        left = run(ws, count)["output"].strip()
        if left == "0":
            break
        time.sleep(0.1)
    assert left == "0", "the backgrounded sleep outlived the timeout"


def test_a_timeout_above_the_maximum_is_an_error_not_clamped(ws: ClientConnection) -> None:
    """Drift item: the old agent silently clamped it and ran the command."""
    result = run(ws, "echo ran", timeout=MAX_TIMEOUT + 1)
    assert result["type"] == "error"
    assert result["error_code"] == "invalid_timeout"
    assert result["output"] == ""


def test_cancel_kills_the_command(ws: ClientConnection) -> None:
    """A ``cancel`` of a running ``sleep 60`` answers its result with ``cancelled`` true and
    returncode -9."""
    send(ws, {"request_id": "c", "command": "sleep 60"})
    time.sleep(0.2)
    send(ws, {"type": "cancel", "request_id": "c"})
    result = recv(ws)
    assert (result["request_id"], result["cancelled"], result["returncode"]) == ("c", True, -9)


def test_interactive_stdin_messages_feed_the_command(ws: ClientConnection) -> None:
    """An ``interactive`` command reads what ``stdin`` messages send, in order, and sees end of
    file at ``eof``: ``cat`` outputs ``one two`` and ends."""
    send(ws, {"request_id": "i", "command": "cat", "interactive": True})
    send(ws, {"type": "stdin", "request_id": "i", "data": "one "})
    send(ws, {"type": "stdin", "request_id": "i", "data": "two", "eof": True})
    result = recv(ws)
    assert (result["request_id"], result["output"]) == ("i", "one two")


def test_stdin_after_eof_is_an_error(ws: ClientConnection) -> None:
    """A ``stdin`` message after the one with ``eof`` gets a ``stdin_closed`` error; the command
    still ends with its result."""
    send(ws, {"request_id": "e", "command": "sleep 0.5; cat", "interactive": True})
    send(ws, {"type": "stdin", "request_id": "e", "eof": True})
    send(ws, {"type": "stdin", "request_id": "e", "data": "late"})
    assert recv(ws)["error_code"] == "stdin_closed"
    assert recv(ws)["type"] == "result"


def test_a_background_holder_of_the_pipes_does_not_delay_the_result(
    ws: ClientConnection,
) -> None:
    """A command that leaves ``sleep 30`` in the background holding its pipes still gets its
    result (output ``x``) within 5 s."""
    started = time.monotonic()
    result = run(ws, "sleep 30 & echo x")
    assert result["output"] == "x\n"
    assert time.monotonic() - started < 5


def test_duplicate_request_ids_are_refused(ws: ClientConnection) -> None:
    """A command with the request id of one still running gets a ``duplicate_request_id`` error;
    the first command still gets its result."""
    send(ws, {"request_id": "d", "command": "sleep 0.5"})
    send(ws, {"request_id": "d", "command": "true"})
    first = recv(ws)
    assert (first["type"], first["error_code"]) == ("error", "duplicate_request_id")
    assert recv(ws)["type"] == "result"


# --- sessions ---------------------------------------------------------------------------------


def test_a_session_keeps_cwd_and_variables_and_can_be_closed(ws: ClientConnection) -> None:
    """Commands in a session share its shell (a ``cd`` and a variable carry over);
    ``list_sessions`` lists it; ``close_session`` answers ``session_closed`` with the request id,
    and closing it again is ``unknown_session``."""
    assert run(ws, "cd /tmp && X=42", session="bb")["session"] == "bb"
    result = run(ws, 'pwd; echo "$X"', session="bb")
    assert result["output"] == "/tmp\n42\n"
    send(ws, {"type": "list_sessions", "request_id": "l"})
    listing = recv(ws)
    assert listing["type"] == "sessions" and listing["request_id"] == "l"
    assert [s["session"] for s in listing["sessions"]] == ["bb"]
    send(ws, {"type": "close_session", "session": "bb", "request_id": "x"})
    assert recv(ws) == {"type": "session_closed", "session": "bb", "request_id": "x"}
    send(ws, {"type": "close_session", "session": "bb"})
    assert recv(ws)["error_code"] == "unknown_session"


def test_a_session_timeout_keeps_the_shell(ws: ClientConnection) -> None:
    """A session command that times out reports ``timed_out`` but leaves the session's shell
    alive: a variable set before it is still set after."""
    run(ws, "Y=kept", session="bt")
    result = run(ws, "sleep 60", session="bt", timeout=0.5)
    assert result["timed_out"] is True
    assert run(ws, 'echo "$Y"', session="bt")["output"] == "kept\n"
    send(ws, {"type": "close_session", "session": "bt"})
    assert recv(ws)["type"] == "session_closed"


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("[]", "invalid_message"),
        ("{not json", "invalid_json"),
        ('{"type": "nope"}', "unknown_type"),
        ("{}", "missing_command"),
        ('{"command": 5}', "invalid_command"),
        ('{"command": "true", "timeout": -1}', "invalid_timeout"),
        ('{"command": "true", "env": {"A=B": "x"}}', "invalid_env"),
        ('{"command": "true", "cwd": "/no/such/dir"}', "invalid_cwd"),
        ('{"command": "true", "stream": "yes"}', "invalid_stream"),
        ('{"command": "true", "session": "a b"}', "invalid_session"),
        ('{"command": "true", "session": "s", "interactive": true}', "unsupported"),
        ('{"type": "cancel", "request_id": "nobody"}', "unknown_request"),
        ('{"type": "stdin", "request_id": "nobody", "data": "x"}', "unknown_request"),
    ],
)
def test_malformed_messages_get_an_error_reply(
    ws: ClientConnection, message: str, code: str
) -> None:
    """Each malformed message (not an object, bad JSON, unknown type, missing or bad fields,
    unknown request) gets an ``error`` with its own ``error_code``, and the connection still runs
    commands afterwards."""
    ws.send(message)
    reply = recv(ws)
    assert (reply["type"], reply["error_code"]) == ("error", code)
    assert run(ws, "echo still")["output"] == "still\n"


def test_a_binary_message_gets_an_error_reply(ws: ClientConnection) -> None:
    """A command sent as a binary WebSocket message gets a ``binary_message`` error."""
    ws.send(b'{"command": "true"}')
    assert recv(ws)["error_code"] == "binary_message"


# --- WebSocket conformance (raw frames) -------------------------------------------------------


def test_a_text_frame_that_is_not_utf8_gets_a_json_reply(server: AgentServer) -> None:
    """A text frame whose payload is not UTF-8 gets an ``invalid_json`` error reply, not a closed
    connection: the next command on it still runs."""
    client = RawClient(server)
    client.send_frame(0x1, b'{"command": "\xff"}')
    assert client.recv_json()["error_code"] == "invalid_json"
    client.send_frame(0x1, b'{"command": "echo ok"}')
    assert client.recv_json()["output"] == "ok\n"
    client.close()


def test_a_fragmented_message_is_one_command(server: AgentServer) -> None:
    """A text message split over two frames, with a ping between them, runs as one command; the
    ping is answered with a pong carrying its payload."""
    client = RawClient(server)
    client.send_frame(0x1, b'{"command": "ec', fin=False)
    client.send_frame(0x9, b"ping!")
    client.send_frame(0x0, b'ho frag"}')
    assert client.recv_frame() == (0xA, b"ping!")
    assert client.recv_json()["output"] == "frag\n"
    client.close()


def closing_code(client: RawClient) -> int | None:
    """The close code the agent answers with, or None if it dropped the connection without a
    close frame (RFC 6455 allows both when failing a connection); data frames are skipped."""
    try:
        while True:
            opcode, payload = client.recv_frame()
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if payload else 1005
    except ConnectionError:
        return None


@pytest.mark.parametrize(
    "frames",
    [
        [(0x1, b'{"command": "true"}', True, False)],
        [(0x8, struct.pack("!H", 999), True, True)],
        [(0x8, struct.pack("!H", 1005), True, True)],
        [(0x0, b"x", True, True)],
        [(0x1, b"{}", True, True, 0x40)],
    ],
    ids=["unmasked", "close-999", "close-1005", "orphan-continuation", "rsv-bit"],
)
def test_protocol_violations_end_the_connection_with_1002(
    server: AgentServer, frames: list[tuple[Any, ...]]
) -> None:
    """An unmasked frame, a close frame with code 999 or 1005, an orphan continuation frame or a
    frame with an RSV bit ends the connection (a 1002 close or a plain drop); the agent lives on."""
    client = RawClient(server)
    for opcode, payload, fin, mask, *rsv in frames:
        client.send_frame(opcode | (rsv[0] if rsv else 0), payload, fin=fin, mask=mask)
    assert closing_code(client) in (1002, None)
    with pytest.raises(ConnectionError):
        client.recv_frame()  # and the connection is gone
    client.close()
    assert server.alive()


def test_a_close_frame_is_answered_with_a_close_frame(server: AgentServer) -> None:
    """A close frame with code 4001 is answered with a close frame (code 4001 or 1000); the agent
    lives on."""
    client = RawClient(server)
    client.send_frame(0x8, struct.pack("!H", 4001) + b"bye")
    assert closing_code(client) in (4001, 1000)
    client.close()
    assert server.alive()


def test_an_oversize_frame_ends_the_connection_without_reading_it(server: AgentServer) -> None:
    """A frame header announcing a 65 MiB payload (none sent) ends the connection with 1009 or a
    drop, without the agent waiting for the payload; the agent lives on."""
    client = RawClient(server)
    client.sock.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, 65 * 1024 * 1024) + b"mask")
    assert closing_code(client) in (1009, None)
    client.close()
    assert server.alive()


def test_ping_gets_a_pong(ws: ClientConnection) -> None:
    """A ping is answered with a pong within 10 s."""
    assert ws.ping(b"are you there").wait(10)


# --- backpressure -----------------------------------------------------------------------------


def test_a_slow_reader_holds_back_a_streamed_command(
    server: AgentServer, ws: ClientConnection
) -> None:
    """The agent stops reading the pipes while its send buffer is full: its memory stays
    flat while 40 MB are produced, and nothing is lost once the reader catches up."""
    size = 40_000_000
    before = server.rss_kib()
    send(
        ws,
        {"request_id": "bp", "command": f"head -c {size} /dev/zero | tr '\\0' a", "stream": True},
    )
    time.sleep(2.0)  # not reading
    grown_mib = (server.rss_kib() - before) / 1024
    assert grown_mib < 16, f"agent grew by {grown_mib:.1f} MiB while the reader slept"
    received = 0
    while True:
        msg = recv(ws, timeout=60)
        if msg["type"] == "result":
            break
        received += len(msg["data"])
    assert received == size
    assert msg["success"] is True


@pytest.mark.parametrize("name", ["1BAD", "a-b", "x y", "é"])
def test_env_names_must_be_variable_names(ws: ClientConnection, name: str) -> None:
    """Drift item: the old agent accepted any key without '=' (the gateway did not)."""
    result = run(ws, "true", env={name: "v"})
    assert (result["type"], result["error_code"]) == ("error", "invalid_env")


# -- process handles (issue 14) -------------------------------------------------------------------


def open_ws(server: AgentServer) -> ClientConnection:
    return unix_connect(
        server.socket,
        "ws://localhost/agent",
        additional_headers={"Authorization": f"Bearer {server.secret}"},
        max_size=None,
        open_timeout=10,
    )


def test_a_command_of_a_closed_connection_runs_on_and_is_attached_to(
    server: AgentServer,
) -> None:
    """Closing the WebSocket no longer kills the command; another connection attaches by
    request id and gets all of its output, then its result."""
    with open_ws(server) as first:
        send(first, {"request_id": "bb-orphan", "command": "sleep 0.5; echo end", "ack": True})
        started = recv(first)
        assert started["type"] == "started"
    with open_ws(server) as second:
        send(second, {"type": "attach", "request_id": "bb-orphan"})
        assert recv(second)["type"] == "attached"
        chunks = []
        while True:
            msg = recv(second)
            if msg["type"] == "result":
                break
            chunks.append(msg["data"])
    assert "".join(chunks) == "end\n"
    assert (msg["returncode"], msg["pid"]) == (0, started["pid"])


def test_a_background_writer_leaves_the_agent_s_memory_bounded(
    server: AgentServer, ws: ClientConnection
) -> None:
    """A background process writing 40 MB with nobody attached costs the agent at most its
    log (2 MiB per stream) plus slack; the log says how much it dropped."""
    before = server.rss_kib()
    size = 40_000_000
    send(ws, {"request_id": "bb-flood", "command": f"head -c {size} /dev/zero", "background": True})
    pid = recv(ws)["pid"]
    deadline = time.monotonic() + 60
    while True:
        send(ws, {"type": "processes"})
        entry = next(p for p in recv(ws)["processes"] if p["pid"] == pid)
        if entry["state"] == "exited" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert entry["state"] == "exited" and entry["bytes"]["stdout"] == size
    assert entry["dropped"]["stdout"] == size - 2 * 1024 * 1024
    grown_mib = (server.rss_kib() - before) / 1024
    assert grown_mib < 12, f"agent grew by {grown_mib:.1f} MiB"
