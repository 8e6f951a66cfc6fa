"""Reaping and restart recovery, against the real engine, with gateway processes of their own."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from typing import Any

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from twistedgw.runtime.labels import LABEL_SANDBOX_ID


def run(ws: Any, command: str) -> dict[str, Any]:
    ws.send(json.dumps({"command": command}))
    return dict(json.loads(ws.recv(timeout=30)))


def test_idle_sandboxes_are_reaped_connected_ones_are_not(
    make_gateway: Any, docker_client: Any
) -> None:
    """With a 2 s idle timeout, an idle sandbox is removed; one with a client stays."""
    gateway: GatewayProcess = make_gateway("--idle-timeout", "2", "--reap-interval", "0.5")
    idle = gateway.create()
    busy = gateway.create()
    with connect(f"{gateway.ws_url}/ws/{busy}") as ws:
        deadline = time.monotonic() + 20
        while gateway.get(f"/sandboxes/{idle}").status_code != 404:
            assert time.monotonic() < deadline, "idle sandbox was not reaped"
            time.sleep(0.2)
        assert gateway.get(f"/sandboxes/{busy}").json()["status"] == "connected"
        assert run(ws, "echo alive")["output"] == "alive\n"
    assert not docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_SANDBOX_ID}={idle}"}
    )


def test_restart_recovers_sandboxes(make_gateway: Any) -> None:
    """After SIGKILL and after a clean stop, a new gateway process lists the same sandboxes with
    their original created_at, and their files are intact."""
    first: GatewayProcess = make_gateway()
    sandbox_id = first.create()
    before = first.get(f"/sandboxes/{sandbox_id}").json()
    with connect(f"{first.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "echo survived > state.txt")["success"]
    first.stop(signal.SIGKILL)

    second: GatewayProcess = make_gateway(instance=first.instance)
    deadline = time.monotonic() + 15
    while second.get(f"/sandboxes/{sandbox_id}").status_code != 200:
        assert time.monotonic() < deadline, "sandbox not recovered after SIGKILL"
        time.sleep(0.1)
    after = second.get(f"/sandboxes/{sandbox_id}").json()
    assert after["created_at"] == before["created_at"]
    assert after["ip_address"] == before["ip_address"]
    with connect(f"{second.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "cat state.txt")["output"] == "survived\n"
    assert second.stop(signal.SIGTERM) == 0
    assert "Main loop terminated." in second.tail()

    third: GatewayProcess = make_gateway(instance=first.instance)
    deadline = time.monotonic() + 15
    while third.get(f"/sandboxes/{sandbox_id}").status_code != 200:
        assert time.monotonic() < deadline, "sandbox not recovered after a clean stop"
        time.sleep(0.1)


def test_unreachable_docker_is_503_json(make_gateway: Any) -> None:
    """With no engine at the configured address, create answers 503 JSON promptly and the
    gateway keeps serving. It cannot know which sandboxes exist, so the listing is a 503 with
    Retry-After too (not an empty list), and /healthz says it is not ready."""
    gateway: GatewayProcess = make_gateway(
        "--docker-url", "unix:///nonexistent/docker.sock", ready=False
    )
    started = time.monotonic()
    response = requests.post(gateway.url + "/sandboxes", timeout=30)
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert "Docker" in response.json()["error"]
    listing = gateway.get("/sandboxes")
    assert listing.status_code == 503 and listing.headers["Retry-After"] == "1"
    health = gateway.get("/healthz")
    assert health.status_code == 200 and health.json()["ready"] is False


def test_sigterm_closes_clients_with_going_away_and_exits_0(make_gateway: Any) -> None:
    """SIGTERM closes attached WebSockets with 1001 and a reason, then exits 0 promptly;
    the sandbox survives."""
    gateway: GatewayProcess = make_gateway()
    sandbox_id = gateway.create()
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "true")["success"]
        started = time.monotonic()
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "gateway shutting down")
        assert gateway.process.wait(15) == 0
        assert time.monotonic() - started < 10
    again: GatewayProcess = make_gateway(instance=gateway.instance)
    wait_until = time.monotonic() + 15
    while again.get(f"/sandboxes/{sandbox_id}").status_code != 200:
        assert time.monotonic() < wait_until
        time.sleep(0.1)


def test_restart_with_clients_attached_and_commands_running(make_gateway: Any) -> None:
    """SIGKILL the gateway while one sandbox is idle, one has a client attached and one runs a
    command: the client sees its connection drop, the command's sandbox keeps running it, and
    after a restart all three are listed with their created_at, their idle clocks resumed from
    the saved last activity, and clients reconnect and carry on."""
    first: GatewayProcess = make_gateway("--reap-interval", "0.3")
    idle, attached, busy = first.create(), first.create(), first.create()
    with connect(f"{first.ws_url}/ws/{idle}") as ws:
        assert run(ws, "true")["success"]
    before = {s["sandbox_id"]: s for s in first.get("/sandboxes?details=true").json()}
    time.sleep(1)  # a sweep saves the state file
    stack = contextlib.ExitStack()
    client = stack.enter_context(connect(f"{first.ws_url}/ws/{attached}"))
    worker = stack.enter_context(connect(f"{first.ws_url}/ws/{busy}"))
    # A session command outlives its connection (a plain one dies with it, like a terminal's
    # foreground job on hang-up).
    worker.send(
        json.dumps(
            {"command": "sleep 2; echo finished > done.txt", "request_id": "w", "session": "s"}
        )
    )
    time.sleep(0.3)
    first.stop(signal.SIGKILL)
    for ws in (client, worker):
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    stack.close()

    second: GatewayProcess = make_gateway(instance=first.instance)
    deadline = time.monotonic() + 15
    while len(second.get("/sandboxes").json()) != 3:
        assert time.monotonic() < deadline, "not every sandbox was recovered"
        time.sleep(0.1)
    after = {s["sandbox_id"]: s for s in second.get("/sandboxes?details=true").json()}
    for sandbox_id in (idle, attached, busy):
        assert after[sandbox_id]["created_at"] == before[sandbox_id]["created_at"]
    # The idle clock resumed from the saved activity instead of restarting at zero.
    assert after[idle]["last_activity"] == pytest.approx(before[idle]["last_activity"], abs=1)
    assert after[idle]["status"] == "idle"
    time.sleep(2.5)
    with connect(f"{second.ws_url}/ws/{busy}") as ws:
        assert run(ws, "cat done.txt")["output"] == "finished\n"
    with connect(f"{second.ws_url}/ws/{attached}") as ws:
        assert run(ws, "echo back")["output"] == "back\n"
