"""Commands that outlive their connection (issue 14), on the real engine and image: background
processes, reattach with replay, kept results, yield_after, the event stream, a gateway killed
and restarted under a running command, and the reaper counting processes as activity."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from typing import Any

import pytest
import requests
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.integration.helpers import recv, send, wait_for

LOOP_100 = "for i in $(seq 1 100); do echo $i; sleep 0.05; done"

pytestmark = pytest.mark.integration


def attach_all(ws: Any, **target: Any) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Attach to a process; return the ``attached`` reply, its stdout, and its result."""
    send(ws, {"type": "attach", **target})
    attached = recv(ws)
    assert attached["type"] == "attached", attached
    out = []
    offset = attached["since"]["stdout"]
    while True:
        message = recv(ws, 60)
        if message["type"] == "output":
            if message["stream"] == "stdout":
                assert message["offset"] == offset, (message, offset)
                offset += len(message["data"].encode())
                out.append(message["data"])
            continue
        assert message["type"] == "result", message
        return attached, "".join(out), message


def test_a_background_loop_is_reattached_from_another_connection_exactly_once_in_order(
    gateway: GatewayProcess,
) -> None:
    """A background loop printing 1 to 100, started on a connection that then closes, is
    attached by pid from ``since`` 0 on a second connection: every line exactly once, in
    order, at contiguous offsets, then its result (exit 0, same pid)."""
    sandbox_id = gateway.create()
    url = f"{gateway.ws_url}/ws/{sandbox_id}"
    with connect(url) as first:
        send(first, {"command": LOOP_100, "request_id": "loop", "background": True})
        started = recv(first)
        assert started["type"] == "started" and started["background"] is True
    time.sleep(1.0)  # part of it runs with nobody attached
    with connect(url) as second:
        attached, out, result = attach_all(second, pid=started["pid"], since=0)
    assert attached["since"] == {"stdout": 0, "stderr": 0}
    assert out.split() == [str(i) for i in range(1, 101)]
    assert result["returncode"] == 0 and result["pid"] == started["pid"]


def test_a_killed_connection_s_command_result_is_collected_by_a_new_connection(
    gateway: GatewayProcess,
) -> None:
    """A connection cut without a close handshake (the network drops) does not end its
    command: a new connection attaches to it by ``request_id`` and gets its whole output and
    result."""
    sandbox_id = gateway.create()
    url = f"{gateway.ws_url}/ws/{sandbox_id}"
    with connect(url) as ws:
        send(ws, {"command": "sleep 1; echo survived", "request_id": "cut", "ack": True})
        assert recv(ws)["type"] == "started"
        ws.socket.shutdown(socket.SHUT_RDWR)  # the network drops: no close handshake
        ws.socket.close()
    time.sleep(2.0)
    with connect(url) as fresh:
        _, out, result = attach_all(fresh, request_id="cut")
    assert out == "survived\n"
    assert result["returncode"] == 0 and result["request_id"] == "cut"


def test_on_disconnect_kill_ends_the_command_when_its_connection_closes(
    gateway: GatewayProcess,
) -> None:
    """A command sent with ``on_disconnect: kill`` is listed as ``exited`` (within 10 s) by
    ``processes`` on a new connection once its own connection has closed."""
    sandbox_id = gateway.create()
    url = f"{gateway.ws_url}/ws/{sandbox_id}"
    with connect(url) as ws:
        send(ws, {"command": "sleep 30", "request_id": "k", "ack": True, "on_disconnect": "kill"})
        pid = recv(ws)["pid"]
    with connect(url) as ws:

        def exited() -> bool:
            send(ws, {"type": "processes"})
            listing = recv(ws)
            states = {p["pid"]: p["state"] for p in listing["processes"]}
            return states.get(pid) == "exited"

        deadline = time.monotonic() + 10
        while not exited():
            assert time.monotonic() < deadline, "the command outlived its connection"
            time.sleep(0.2)


def test_gateway_sigkill_and_restart_during_a_background_command_loses_no_byte(
    make_gateway: Any,
) -> None:
    """The gateway SIGKILLed during a background loop and restarted with the same instance: the
    process is still listed, and attaching from ``since`` 0 gives lines 1 to 100 in order and
    exit 0."""
    first: GatewayProcess = make_gateway()
    sandbox_id = first.create()
    with connect(f"{first.ws_url}/ws/{sandbox_id}") as ws:
        send(ws, {"command": LOOP_100, "request_id": "loop", "background": True})
        pid = recv(ws)["pid"]
        time.sleep(0.5)
    first.stop(signal.SIGKILL)
    second: GatewayProcess = make_gateway(instance=first.instance)
    with connect(f"{second.ws_url}/ws/{sandbox_id}") as ws:
        send(ws, {"type": "processes"})
        listing = recv(ws)
        assert pid in [p["pid"] for p in listing["processes"]]
        _, out, result = attach_all(ws, pid=pid, since=0)
    assert out.split() == [str(i) for i in range(1, 101)]
    assert result["returncode"] == 0


def test_yield_after_returns_the_partial_output_and_a_later_attach_completes_it(
    gateway: GatewayProcess,
) -> None:
    """With ``yield_after`` 0.7 s, ``echo one; sleep 1.5; echo two`` answers ``yielded`` with
    ``one`` and offset 4; attaching from that offset gives only ``two`` and exit 0."""
    sandbox_id = gateway.create()
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        command = "echo one; sleep 1.5; echo two"
        send(ws, {"command": command, "request_id": "y", "yield_after": 0.7})
        yielded = recv(ws)
        assert yielded["type"] == "yielded" and yielded["output"] == "one\n"
        assert yielded["offset"] == {"stdout": 4, "stderr": 0}
        _, out, result = attach_all(ws, pid=yielded["pid"], since=yielded["offset"])
    assert out == "two\n"
    assert result["returncode"] == 0


class EventReader:
    """Reads an SSE response in a thread, collecting ``(id, event, data)``."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.response = requests.get(url, stream=True, timeout=60, headers=headers or {})
        assert self.response.status_code == 200, self.response.text
        assert self.response.headers["Content-Type"].startswith("text/event-stream")
        self.events: list[tuple[str | None, str, dict[str, Any]]] = []
        self.comments = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        event_id: str | None = None
        event = ""
        try:
            for raw in self.response.iter_lines(decode_unicode=True):
                line = raw or ""
                if line.startswith(":"):
                    self.comments += 1
                elif line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    self.events.append((event_id, event, json.loads(line[6:])))
                    event_id, event = None, ""
        except (requests.RequestException, ValueError, AttributeError):  # closed by close()
            pass

    def wait(self, predicate: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events):
                return
            time.sleep(0.05)
        raise AssertionError(f"events so far: {self.events}")

    def close(self) -> None:
        self.response.close()


def test_the_event_stream_delivers_exited_for_a_background_command_and_resumes(
    gateway: GatewayProcess,
) -> None:
    """The SSE stream gets ``started`` and ``exited`` (pid, return code 7, request id) with ids
    for a background command; reconnecting with ``Last-Event-ID`` of ``started`` replays
    only ``exited``."""
    sandbox_id = gateway.create()
    events_url = f"{gateway.url}/sandboxes/{sandbox_id}/events"
    reader = EventReader(events_url)
    try:
        with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
            send(ws, {"command": "sleep 0.5; exit 7", "request_id": "ev", "background": True})
            pid = recv(ws)["pid"]
        reader.wait(lambda evs: any(e[1] == "exited" for e in evs))
    finally:
        reader.close()
    started = next(e for e in reader.events if e[1] == "started")
    exited = next(e for e in reader.events if e[1] == "exited")
    assert (exited[2]["pid"], exited[2]["returncode"], exited[2]["request_id"]) == (pid, 7, "ev")
    assert started[0] is not None and exited[0] is not None
    # Resuming after the ``started`` event replays only what followed it.
    again = EventReader(events_url, {"Last-Event-ID": str(started[0])})
    try:
        again.wait(lambda evs: len(evs) >= 1)
        time.sleep(0.3)
    finally:
        again.close()
    assert [(e[0], e[1]) for e in again.events] == [(exited[0], "exited")]


def test_a_running_background_process_keeps_an_idle_sandbox_until_it_ends(
    make_gateway: Any,
) -> None:
    """Idle timeout 3 s: a background process of 6 s keeps the sandbox; once it ended, the
    event stream gets ``idle_warning``, then ``removed``."""
    gw: GatewayProcess = make_gateway("--idle-timeout", "3", "--reap-interval", "0.5")
    sandbox_id = gw.create()
    reader = EventReader(f"{gw.url}/sandboxes/{sandbox_id}/events")
    try:
        with connect(f"{gw.ws_url}/ws/{sandbox_id}") as ws:
            send(ws, {"command": "sleep 6", "background": True})
            assert recv(ws)["type"] == "started"
        time.sleep(5.0)
        assert gw.get(f"/sandboxes/{sandbox_id}").status_code == 200  # idle 5 s > 3 s: kept
        reader.wait(lambda evs: any(e[1] == "removed" for e in evs), timeout=30)
    finally:
        reader.close()
    names = [e[1] for e in reader.events]
    # An earlier warning is legitimate: on a loaded machine a sweep can find the new sandbox
    # idle (3 s timeout) before the process started. What counts is the one after it ended.
    after_exit = names[names.index("exited") :]
    assert "idle_warning" in after_exit, names
    assert after_exit.index("idle_warning") < after_exit.index("removed"), names
    assert next(e for e in reader.events if e[1] == "removed")[2]["reason"] == "idle"
    # ``removed`` is sent as the container goes; the registry forgets it right after.
    wait_for(lambda: gw.get(f"/sandboxes/{sandbox_id}").status_code == 404, timeout=10)
