"""PTY sessions (issue 16) as a person uses them: through a real ``twistd sandboxgw`` and the
real image, with a real WebSocket client on ``/ws/{id}``.

Run with the image of this branch (the agent and the spawner changed):
``SANDBOX_IMAGE=twistedgw-pty16 TEMPLATE_IMAGE_PREFIX=twistedgw-pty16-``.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.ptyclient import Screen, input_frame, recv, send, start_pty

pytestmark = pytest.mark.integration

SIZE_PROBE = "python3 -c 'import os,sys; print(os.isatty(0), os.get_terminal_size())'"


def ws_url(gateway: GatewayProcess, sandbox_id: str) -> str:
    return f"{gateway.ws_url}/ws/{sandbox_id}"


def type_line(ws: Any, rid: str, line: str) -> None:
    send(ws, {"type": "stdin", "request_id": rid, "data": line + "\r"})


def test_a_python_on_a_pty_sees_a_terminal_and_its_new_size_after_a_resize(
    gateway: GatewayProcess,
) -> None:
    sandbox_id = gateway.create()
    with connect(ws_url(gateway, sandbox_id), max_size=None) as ws:
        send(ws, {"type": "pty", "request_id": "sh", "cols": 100, "rows": 30})
        screen = Screen(ws)
        assert screen.message("started")["pty"] is True
        type_line(ws, "sh", SIZE_PROBE + "; whoami; echo TERM=$TERM")
        screen.wait_for("True os.terminal_size(columns=100, lines=30)")
        screen.wait_for("\nsandbox\r\n")  # the sandbox user, as every user process
        screen.wait_for("TERM=xterm-256color")
        send(ws, {"type": "resize", "request_id": "sh", "cols": 120, "rows": 40})
        assert screen.message("resized")["cols"] == 120
        type_line(ws, "sh", SIZE_PROBE)
        screen.wait_for("True os.terminal_size(columns=120, lines=40)")
        type_line(ws, "sh", "exit 7")
        result = screen.message("result")
        assert result["type"] == "result" and result["returncode"] == 7


def test_cat_echoes_typed_input_and_ctrl_c_interrupts_sleep(gateway: GatewayProcess) -> None:
    sandbox_id = gateway.create()
    with connect(ws_url(gateway, sandbox_id), max_size=None) as ws:
        screen, pid = start_pty(ws, "sh")
        type_line(ws, "sh", "cat")
        time.sleep(0.3)
        type_line(ws, "sh", "typed-by-a-person")
        # The terminal echoes it, and cat writes it back: twice.
        screen.until(lambda s: s.text().count("typed-by-a-person") == 2)
        send(ws, {"type": "stdin", "request_id": "sh", "data": "\x04"})  # Ctrl-D ends cat
        type_line(ws, "sh", "sleep 100; echo slept-$?")
        time.sleep(0.5)
        started = time.monotonic()
        send(ws, {"type": "stdin", "request_id": "sh", "data": "\x03"})
        screen.wait_for("^C")
        type_line(ws, "sh", "echo back-$((40+2))")
        screen.wait_for("back-42")
        assert time.monotonic() - started < 10
        assert re.search(r"slept-\d", screen.text()) is None
        send(ws, {"type": "signal", "pid": pid, "signal": "HUP"})
        screen.message("result")


def test_a_dropped_client_reattaches_and_sees_the_whole_history_from_offset_0(
    gateway: GatewayProcess,
) -> None:
    sandbox_id = gateway.create()
    url = ws_url(gateway, sandbox_id)
    with connect(url, max_size=None) as first:
        screen, pid = start_pty(first, "sh")
        for i in range(5):
            type_line(first, "sh", f"echo line-{i}-$((i*0+{i}))")
        screen.wait_for("line-4-4")
        seen = bytes(screen.data)
    # The connection is gone; the shell runs on.
    with connect(url, max_size=None) as second:
        send(second, {"type": "attach", "pid": pid, "since": 0})
        again = Screen(second)
        attached = again.message("attached")
        assert attached["since"] == {"pty": 0} and attached["state"] == "running"
        again.until(lambda s: len(s.data) >= len(seen))
        assert bytes(again.data[: len(seen)]) == seen
        type_line(second, "sh", "echo still-$((1+1))")
        again.wait_for("still-2")
        type_line(second, "sh", "exit")
        assert again.message("result")["returncode"] == 0


def test_takeover_and_a_second_watcher_with_binary_frames_through_the_gateway(
    gateway: GatewayProcess,
) -> None:
    sandbox_id = gateway.create()
    url = ws_url(gateway, sandbox_id)
    with (
        connect(url, max_size=None) as owner,
        connect(url, max_size=None) as taker,
        connect(url, max_size=None) as seed,
    ):
        screen, pid = start_pty(owner, "cat", command="cat")
        send(seed, {"type": "attach", "pid": pid})  # a plain (JSON-only) watcher
        plain = Screen(seed)
        plain.message("attached")
        send(taker, {"type": "attach", "pid": pid, "takeover": True, "binary": True})
        binary = Screen(taker)
        assert binary.message("attached")["takeover"] is True
        screen.message("taken_over")
        type_line(owner, "cat", "from-owner")
        assert screen.message("error")["error_code"] == "not_writer"
        taker.send(input_frame(pid, "naïve-input\r".encode()))
        for watcher in (screen, binary, plain):
            watcher.until(lambda s: s.text().count("naïve-input") == 2)
        raw = [m for m in binary.messages if isinstance(m, bytes)]
        assert raw == []  # every binary frame was output, taken by Screen
        send(taker, {"type": "signal", "pid": pid, "signal": "KILL"})
        for watcher in (screen, binary, plain):
            assert watcher.message("result")["pid"] == pid
        assert "from-owner" not in screen.text()
        # The seed client never got a binary frame: Screen would have taken one into its data,
        # so check the raw socket too (nothing but JSON left to read).
        send(seed, {"type": "processes"})
        assert isinstance(recv(seed), dict)


def test_invalid_pty_messages_are_answered_by_the_gateway(gateway: GatewayProcess) -> None:
    sandbox_id = gateway.create()
    with connect(ws_url(gateway, sandbox_id)) as ws:
        for message, code in (
            ({"type": "pty", "request_id": "p", "cols": 0, "rows": 10}, "invalid_size"),
            ({"type": "pty", "request_id": "p", "cols": 9, "rows": 9, "tty": 1}, "unknown_field"),
            ({"type": "resize", "request_id": "p", "cols": 9, "rows": 99999}, "invalid_size"),
            ({"type": "resize", "request_id": "nothing", "cols": 9, "rows": 9}, "unknown_process"),
        ):
            send(ws, message)
            reply = recv(ws)
            assert (reply["type"], reply["error_code"]) == ("error", code), reply
        ws.send(b"\x05not-a-terminal-frame")
        assert recv(ws)["error_code"] == "binary_message"
