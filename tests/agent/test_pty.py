"""PTY sessions (issue 16) against a real agent process: ``pty``, ``resize``, terminal input
through ``stdin`` and binary frames, ``attach`` replay, ``takeover``, and the errors.

The "host" agent runs as this user and forks PTY processes (TIOCSCTTY in the child); the
"image" one (integration) starts them through the spawner as ``sandbox``.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, unix_connect

from tests.agent.blackbox import AgentServer, RawClient
from tests.ptyclient import Screen, input_frame, recv, send, start_pty
from twistedgw import protocol

SIZE_PROBE = "import os; print(os.isatty(0), os.get_terminal_size(), os.ttyname(0))"


@pytest.fixture(
    scope="module", params=["host", pytest.param("image", marks=pytest.mark.integration)]
)
def server(request: pytest.FixtureRequest) -> Iterator[AgentServer]:
    srv = AgentServer(request.param, AGENT_MAX_BACKGROUND="8")
    yield srv
    srv.stop()


def connect(server: AgentServer) -> ClientConnection:
    return unix_connect(
        server.socket,
        "ws://localhost/agent",
        additional_headers={"Authorization": f"Bearer {server.secret}"},
        max_size=None,
        open_timeout=10,
    )


@pytest.fixture
def ws(server: AgentServer) -> Iterator[ClientConnection]:
    with connect(server) as conn:
        yield conn
    assert server.alive()


def test_a_pty_command_sees_a_terminal_of_the_requested_size(ws: ClientConnection) -> None:
    """A ``pty`` command of 100x30 has a terminal on stdin of that size (a ``/dev/pts`` device),
    ``TERM=xterm-256color``, and ends with returncode 0."""
    screen, _pid = start_pty(
        ws, "size", cols=100, rows=30, command=f"python3 -c '{SIZE_PROBE}'; echo TERM=$TERM"
    )
    result = screen.message("result")
    assert result["returncode"] == 0 and result["request_id"] == "size"
    assert "True os.terminal_size(columns=100, lines=30) /dev/pts/" in screen.text()
    assert "TERM=xterm-256color" in screen.text()


def test_a_login_shell_echoes_input_resizes_and_interrupts(ws: ClientConnection) -> None:
    """A default ``pty`` shell is a login shell that echoes what is typed; commands run at
    80x24; ``resize`` is answered ``resized`` and ``stty`` sees 132x43; Ctrl-C interrupts a
    running sleep (echoed ``^C``, the rest of the line not run) and the shell goes on;
    ``exit 3`` gives returncode 3."""
    screen, pid = start_pty(ws, "shell")
    send(ws, {"type": "stdin", "request_id": "shell", "data": "stty size; tty\r"})
    screen.wait_for("24 80")
    # A login shell (bash -l), and what is typed is echoed by the terminal.
    send(
        ws,
        {
            "type": "stdin",
            "request_id": "shell",
            "data": "shopt -q login_shell && echo L-$((1+1))\r",
        },
    )
    screen.wait_for("L-2")
    assert "echo L-$((1+1))" in screen.text()
    send(ws, {"type": "resize", "request_id": "shell", "cols": 132, "rows": 43})
    resized = screen.message("resized")
    assert (resized["pid"], resized["cols"], resized["rows"]) == (pid, 132, 43)
    send(ws, {"type": "stdin", "request_id": "shell", "data": "stty size\r"})
    screen.wait_for("43 132")
    send(ws, {"type": "stdin", "request_id": "shell", "data": "sleep 100; echo slept-$?\r"})
    time.sleep(0.5)
    send(ws, {"type": "stdin", "request_id": "shell", "data": "\x03"})
    screen.wait_for("^C")
    send(ws, {"type": "stdin", "request_id": "shell", "data": "echo after-$((6*7))\r"})
    screen.wait_for("after-42")
    assert re.search(r"slept-\d", screen.text()) is None  # the list was interrupted
    send(ws, {"type": "stdin", "request_id": "shell", "data": "exit 3\r"})
    assert screen.message("result")["returncode"] == 3


def test_cat_echoes_typed_input_including_binary_frames(ws: ClientConnection) -> None:
    """With ``binary`` set, input sent as a binary frame is echoed and written back by ``cat``
    and all output arrives as binary frames; a stdin ``eof`` is ``unsupported``; a KILL ends it."""
    screen, pid = start_pty(ws, "cat", command="cat", binary=True)
    ws.send(input_frame(pid, "héllo\r".encode()))
    # Echoed by the line discipline, then written back by cat: twice.
    screen.until(lambda s: s.text().count("héllo") == 2)
    assert screen.json_chunks == 0 and screen.binary_frames > 0
    send(ws, {"type": "stdin", "request_id": "cat", "eof": True})  # a terminal has no EOF
    assert screen.message("error")["error_code"] == "unsupported"
    send(ws, {"type": "signal", "pid": pid, "signal": "KILL"})
    assert screen.message("result")["pid"] == pid


def test_a_dropped_client_reattaches_and_sees_the_whole_history(server: AgentServer) -> None:
    """After its connection closes, a PTY keeps running; a new connection attaching ``since`` 0
    is ``attached`` to a running process, receives exactly the bytes the first one saw, and can
    type into it."""
    with connect(server) as first:
        screen, pid = start_pty(first, "history", command="cat")
        for word in ("one", "two", "three"):
            send(first, {"type": "stdin", "request_id": "history", "data": word + "\r"})
        screen.until(lambda s: s.text().count("three") == 2)
        seen = bytes(screen.data)
    with connect(server) as second:
        send(second, {"type": "attach", "pid": pid, "since": 0})
        again = Screen(second)
        attached = again.message("attached")
        assert attached["since"]["pty"] == 0 and attached["state"] == "running"
        again.until(lambda s: len(s.data) >= len(seen))
        assert bytes(again.data) == seen
        send(second, {"type": "stdin", "request_id": "history", "data": "four\r"})
        again.until(lambda s: s.text().count("four") == 2)
        send(second, {"type": "signal", "pid": pid, "signal": "TERM"})
        again.message("result")


def test_takeover_makes_one_writer_and_a_second_watcher_sees_the_output(
    server: AgentServer,
) -> None:
    """An ``attach`` with ``takeover`` makes that connection the only writer: the owner is told
    ``taken_over``, its input and resize get ``not_writer`` but it still sees the output;
    ``processes`` shows the PTY, the takeover and 2 watchers; once both have left, a new
    connection may write again."""
    with connect(server) as owner, connect(server) as taker:
        screen, pid = start_pty(owner, "take", command="cat")
        send(taker, {"type": "attach", "pid": pid, "takeover": True, "binary": True})
        watcher = Screen(taker)
        assert watcher.message("attached")["takeover"] is True
        assert screen.message("taken_over")["pid"] == pid
        send(owner, {"type": "stdin", "request_id": "take", "data": "from-owner\r"})
        refused = screen.message("error")
        assert refused["error_code"] == "not_writer"
        send(owner, {"type": "resize", "pid": pid, "cols": 10, "rows": 10})
        assert screen.message("error")["error_code"] == "not_writer"
        taker.send(input_frame(pid, b"from-taker\r"))
        screen.until(lambda s: s.text().count("from-taker") == 2)  # the owner still watches
        watcher.until(lambda s: s.text().count("from-taker") == 2)
        assert "from-owner" not in screen.text()
        send(owner, {"type": "processes"})
        listed = next(p for p in screen.message("processes")["processes"] if p["pid"] == pid)
        assert listed["pty"] is True and listed["taken_over"] is True
        assert listed["watchers"] == 2
    with connect(server) as later:  # the writer left: anyone may write again
        send(later, {"type": "attach", "pid": pid, "since": {"pty": 10**9}})
        screen = Screen(later)
        screen.message("attached")
        send(later, {"type": "stdin", "request_id": "take", "data": "free-again\r"})
        screen.until(lambda s: s.text().count("free-again") == 2)
        send(later, {"type": "signal", "pid": pid, "signal": "KILL"})
        screen.message("result")


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "pty", "request_id": "x", "cols": 0, "rows": 24}, "invalid_size"),
        ({"type": "pty", "request_id": "x", "cols": 80, "rows": 5000}, "invalid_size"),
        ({"type": "pty", "request_id": "x", "cols": 80.5, "rows": 24}, "invalid_size"),
        ({"type": "pty", "request_id": "x", "rows": 24}, "invalid_size"),
        ({"type": "pty", "request_id": "x", "cols": 80, "rows": 24, "colour": 1}, "unknown_field"),
        ({"type": "pty", "cols": 80, "rows": 24}, "invalid_request_id"),
        ({"type": "pty", "request_id": "x", "cols": 80, "rows": 24, "binary": 1}, "invalid_binary"),
        ({"type": "pty", "request_id": "x", "cols": 80, "rows": 24, "cwd": "nope"}, "invalid_cwd"),
        ({"type": "resize", "pid": 1, "cols": 80, "rows": 24, "x": 0}, "unknown_field"),
        ({"type": "resize", "cols": 80, "rows": 24}, "invalid_pid"),
        ({"type": "resize", "pid": 999999, "cols": 80, "rows": 24}, "unknown_process"),
    ],
)
def test_invalid_pty_messages_get_clear_errors(
    ws: ClientConnection, message: dict[str, Any], code: str
) -> None:
    """Each bad ``pty`` or ``resize`` message (size, unknown field, request id, binary, cwd, pid,
    unknown process) gets an ``error`` with its own code and a non-empty message."""
    send(ws, message)
    reply = recv(ws)
    assert (reply["type"], reply["error_code"]) == ("error", code), reply
    assert reply["error"]


def test_pty_only_operations_on_a_plain_process_are_refused(ws: ClientConnection) -> None:
    """``resize``, ``attach`` with ``takeover`` or ``binary``, and binary stdin frames for a
    non-PTY process are ``not_a_pty``; a binary frame of an unknown kind is ``binary_message``."""
    send(ws, {"request_id": "plain", "command": "sleep 30", "background": True})
    pid = recv(ws)["pid"]
    try:
        for message in (
            {"type": "resize", "pid": pid, "cols": 80, "rows": 24},
            {"type": "attach", "pid": pid, "takeover": True},
            {"type": "attach", "pid": pid, "binary": True},
        ):
            send(ws, message)
            reply = recv(ws)
            assert reply["error_code"] == "not_a_pty", reply
        ws.send(struct.pack("!BI", protocol.BINARY_STDIN, pid) + b"x")
        assert recv(ws)["error_code"] == "not_a_pty"
        ws.send(b"\x07garbage")
        assert recv(ws)["error_code"] == "binary_message"
    finally:
        send(ws, {"type": "signal", "pid": pid, "signal": "KILL"})


def test_a_seed_client_never_gets_a_binary_frame(ws: ClientConnection) -> None:
    """A PTY started without ``binary`` sends its output only as JSON chunks, and a UTF-8
    character split across two writes arrives whole."""
    screen, _pid = start_pty(ws, "text", command="printf 'caf\\303'; printf '\\251 ok'")
    result = screen.message("result")
    assert result["returncode"] == 0
    assert "café ok" in screen.text()  # the split character was carried over, not replaced
    assert screen.binary_frames == 0 and screen.json_chunks > 0


def pty_bytes(ws: ClientConnection, rid: str) -> int | None:
    send(ws, {"type": "processes"})
    reply = recv(ws)
    listed = [p for p in reply["processes"] if p["request_id"] == rid and p["state"] == "running"]
    return listed[0]["bytes"]["pty"] if listed else None


def test_a_pty_nobody_keeps_up_with_blocks_its_writer_until_the_reader_leaves(
    server: AgentServer,
) -> None:
    """Flow control: while every attached connection's send buffer is full, the agent stops
    reading the terminal (the writer blocks); with nobody attached the log moves on."""
    stalled = RawClient(server)  # starts the PTY, then never reads
    message = {"type": "pty", "request_id": "flood", "cols": 80, "rows": 24, "command": "yes"}
    stalled.send_frame(0x1, json.dumps(message).encode())
    with connect(server) as ws:
        deadline = time.monotonic() + 15
        sizes: list[int] = []
        while time.monotonic() < deadline:
            size = pty_bytes(ws, "flood")
            if size is not None:
                sizes.append(size)
                if len(sizes) >= 3 and sizes[-1] == sizes[-3] > 0:
                    break
            time.sleep(0.3)
        assert len(sizes) >= 3 and sizes[-1] == sizes[-3] > 0, f"never stalled: {sizes}"
        stalled_at = sizes[-1]
        assert stalled_at < 16 << 20  # socket buffers and the agent's send buffer, no more
        stalled.close()  # nobody attached now: the log keeps moving
        deadline = time.monotonic() + 15
        while (pty_bytes(ws, "flood") or 0) < stalled_at + (4 << 20):
            assert time.monotonic() < deadline, "the PTY did not run on without watchers"
            time.sleep(0.2)
        send(ws, {"type": "signal", "request_id": "flood", "signal": "KILL"})
        assert recv(ws)["type"] == "signalled"
