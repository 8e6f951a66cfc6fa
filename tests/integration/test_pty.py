"""PTY sessions (issue 16) as a person uses them: through a real ``twistd sandboxgw`` and the
real image, with a real WebSocket client on ``/ws/{id}``.

Run with the image of this branch (the agent and the spawner changed):
``SANDBOX_IMAGE=twistedgw-pty16 TEMPLATE_IMAGE_PREFIX=twistedgw-pty16-``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.integration.conftest import REPO, GatewayProcess
from tests.ptyclient import Screen, input_frame, recv, send, start_pty
from twistedgw.runtime.labels import LABEL_INSTANCE

pytestmark = pytest.mark.integration

SMOKE_ARGS = ("--keys", "20", "--warmup", "5", "--flood-lines", "20000")
SIZE_PROBE = "python3 -c 'import os,sys; print(os.isatty(0), os.get_terminal_size())'"


def ws_url(gateway: GatewayProcess, sandbox_id: str) -> str:
    return f"{gateway.ws_url}/ws/{sandbox_id}"


def type_line(ws: Any, rid: str, line: str) -> None:
    send(ws, {"type": "stdin", "request_id": rid, "data": line + "\r"})


def test_a_python_on_a_pty_sees_a_terminal_and_its_new_size_after_a_resize(
    gateway: GatewayProcess,
) -> None:
    """In a 100x30 PTY, Python sees a terminal of that size, the user is ``sandbox`` and
    ``TERM`` is ``xterm-256color``; after a resize (acknowledged as ``resized``) it sees
    120x40; ``exit 7`` gives a result with return code 7."""
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
    """A line typed to ``cat`` in a PTY shows twice (the terminal's echo and cat's); Ctrl-C
    interrupts ``sleep 100`` (``^C`` shown, the command after it never runs) and the shell
    takes a new command within 10 s; a HUP ends it with a result."""
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


def test_a_closed_client_reattaches_and_sees_the_whole_history_from_offset_0(
    gateway: GatewayProcess,
) -> None:
    """After the first connection closes, a second attaches to the still-running PTY shell from
    ``since`` 0 (``attached``: ``pty`` 0, ``running``), gets the same bytes the first saw,
    can type into it, and ``exit`` gives return code 0."""
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
    """A takeover attach with binary frames makes the owner ``taken_over`` and its input refused
    (``not_writer``, never shown); the taker's binary input shows on all three connections, in
    binary frames only for the taker; a KILL gives each the result."""
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
        # Output as each asked for it: binary frames only for the one that asked.
        assert binary.binary_frames > 0 and binary.json_chunks == 0
        assert plain.binary_frames == 0 and screen.binary_frames == 0
        send(taker, {"type": "signal", "pid": pid, "signal": "KILL"})
        for watcher in (screen, binary, plain):
            assert watcher.message("result")["pid"] == pid
        assert "from-owner" not in screen.text()
        assert plain.binary_frames == 0 and plain.json_chunks > 0
        send(seed, {"type": "processes"})  # nothing but JSON left to read
        assert isinstance(recv(seed), dict)


def test_invalid_pty_messages_are_answered_with_their_error_codes(gateway: GatewayProcess) -> None:
    """Error replies on ``/ws/{id}``: ``invalid_size`` for a 0-column ``pty`` and a 99999-row
    ``resize``, ``unknown_field`` for a ``pty`` with ``tty``, ``unknown_process`` for a
    ``resize`` of no process, ``binary_message`` for a binary frame that is not terminal
    input."""
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


def test_the_keystroke_bench_runs_and_cleans_up(docker_client: Any, tmp_path: Path) -> None:
    """``bench/pty.py`` in a short run: every path gives figures, its JSON is written, and no
    container of its gateway is left behind (its figures are not judged here)."""
    out = tmp_path / "pty.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pty.py"), *SMOKE_ARGS, "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    for path in ("agent direct (JSON)", "gateway (JSON)", "gateway (binary frames)"):
        assert figures[path]["n"] == 20 and 0 < figures[path]["p50_ms"] < 1000
    for path in ("local pty (baseline)", "gateway (JSON)", "gateway (binary frames)"):
        assert figures["output"][path]["mb"] > 0.1  # seq 1 20000 with CR LF: 128,894 bytes
    instance = figures["instance"]
    mine = {"label": f"{LABEL_INSTANCE}={instance}"}
    assert docker_client.containers.list(all=True, filters=mine) == []
