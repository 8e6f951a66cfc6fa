"""The seed's usage flow against the real engine and image, with independent clients."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from twistedgw.runtime.labels import LABEL_INSTANCE, LABEL_SANDBOX_ID

SEED_RESULT_FIELDS = {
    "request_id",
    "command",
    "success",
    "output",
    "error",
    "returncode",
    "timestamp",
}


def run(ws: Any, command: str, **fields: Any) -> dict[str, Any]:
    ws.send(json.dumps({"command": command, **fields}))
    return dict(json.loads(ws.recv(timeout=30)))


def status_of(gateway: GatewayProcess, sandbox_id: str) -> str:
    return str(gateway.get(f"/sandboxes/{sandbox_id}").json()["status"])


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_seed_usage_flow(gateway: GatewayProcess, docker_client: Any) -> None:
    """Create, list, get, connect, run commands, disconnect, reconnect, delete: as the seed says."""
    response = requests.post(gateway.url + "/sandboxes", timeout=60)
    assert response.status_code == 200
    created = response.json()
    assert created["status"] == "created"
    assert created["message"] == "Sandbox container created successfully"
    sandbox_id = created["sandbox_id"]
    assert len(sandbox_id) == 32 and int(sandbox_id, 16) >= 0

    listing = gateway.get("/sandboxes").json()
    assert sandbox_id in [entry["sandbox_id"] for entry in listing]
    info = gateway.get(f"/sandboxes/{sandbox_id}").json()
    assert set(info) == {"sandbox_id", "status", "created_at", "ip_address"}
    assert info["status"] == "idle"  # the seed's word for a sandbox nobody attached to yet
    assert abs(info["created_at"] - time.time()) < 120
    container = docker_client.containers.get(f"twistedgw-{sandbox_id}")
    assert info["ip_address"] == container.attrs["NetworkSettings"]["IPAddress"]

    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert status_of(gateway, sandbox_id) == "connected"
        result = run(ws, "echo hello", request_id="my-id")
        assert SEED_RESULT_FIELDS <= set(result)
        assert result["request_id"] == "my-id"
        assert result["command"] == "echo hello"
        assert (result["success"], result["output"], result["returncode"]) == (True, "hello\n", 0)
        assert result["timestamp"][:4].isdigit() and "T" in result["timestamp"]

        result = run(ws, "echo oops >&2; exit 3")
        assert result["success"] is False
        assert result["returncode"] == 3
        assert result["error"] == "oops\n"
        assert result["request_id"]  # filled in by the gateway

        assert run(ws, "echo kept > notes.txt")["success"] is True
    wait_for(lambda: status_of(gateway, sandbox_id) == "idle")

    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "cat notes.txt")["output"] == "kept\n"

    response = gateway.delete(sandbox_id)
    assert response.status_code == 200
    assert response.json() == {"message": f"Sandbox {sandbox_id} successfully deleted"}
    response = gateway.get(f"/sandboxes/{sandbox_id}")
    assert response.status_code == 404
    assert "error" in response.json()
    assert gateway.delete(sandbox_id).status_code == 404
    assert not docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_SANDBOX_ID}={sandbox_id}"}
    )


def test_errors_are_json(gateway: GatewayProcess) -> None:
    """Unknown ids are JSON 404s on REST and HTTP 404 on the WebSocket handshake."""
    for path in ("/sandboxes/" + "0" * 32, "/sandboxes/..%2f..%2fetc", "/sandboxes/" + "x" * 3000):
        response = gateway.get(path)
        assert response.status_code == 404
        assert "error" in response.json()
    response = requests.post(
        gateway.url + "/sandboxes",
        data=b"{broken",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400
    assert "error" in response.json()
    with pytest.raises(InvalidStatus) as info:
        connect(f"{gateway.ws_url}/ws/{'0' * 32}")
    assert info.value.response.status_code == 404


def test_messages_in_flight_and_bad_input(gateway: GatewayProcess) -> None:
    """Many commands in flight pair with their request_ids; bad messages get JSON errors."""
    sandbox_id = gateway.create()
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        ws.send(json.dumps({"command": "sleep 1; echo slow", "request_id": "slow"}))
        for i in range(20):
            ws.send(json.dumps({"command": f"echo {i}", "request_id": f"r{i}"}))
        results = [json.loads(ws.recv(timeout=30)) for _ in range(21)]
        by_id = {r["request_id"]: r for r in results}
        assert by_id["slow"]["output"] == "slow\n"
        assert results[-1]["request_id"] == "slow"
        for i in range(20):
            assert by_id[f"r{i}"]["output"] == f"{i}\n"

        ws.send("{not json")
        error = json.loads(ws.recv(timeout=10))
        assert error["success"] is False and SEED_RESULT_FIELDS <= set(error)
        ws.send(json.dumps({"request_id": "no-command"}))
        error = json.loads(ws.recv(timeout=10))
        assert (error["request_id"], error["success"]) == ("no-command", False)
        assert run(ws, "echo alive")["output"] == "alive\n"
    gateway.delete(sandbox_id)


def test_container_hardening_and_agent_secret(gateway: GatewayProcess, docker_client: Any) -> None:
    """Our container is labelled, publishes the agent on 127.0.0.1 only, runs unprivileged,
    and its agent refuses anyone without the per-sandbox secret."""
    sandbox_id = gateway.create()
    container = docker_client.containers.get(f"twistedgw-{sandbox_id}")
    labels = container.labels
    assert labels[LABEL_SANDBOX_ID] == sandbox_id
    assert labels[LABEL_INSTANCE] == gateway.instance
    bindings = container.attrs["NetworkSettings"]["Ports"]["8765/tcp"]
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}
    host_config = container.attrs["HostConfig"]
    assert host_config["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host_config["SecurityOpt"]
    port = int(bindings[0]["HostPort"])
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as info:
            connect(f"ws://127.0.0.1:{port}/agent", additional_headers=headers)
        assert info.value.response.status_code == 401
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "id -u")["output"] == "1000\n"
        # The secret does not leak into the command environment.
        assert "SANDBOX_AGENT_SECRET" not in run(ws, "env")["output"]
    gateway.delete(sandbox_id)


def test_container_death_closes_client(gateway: GatewayProcess, docker_client: Any) -> None:
    """A container killed behind the gateway's back closes attached clients with a reason and
    disappears from the registry."""
    sandbox_id = gateway.create()
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "true")["success"] is True
        docker_client.containers.get(f"twistedgw-{sandbox_id}").kill()
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=30)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1011
        # The gateway first waits to see whether the agent comes back; it learns that the
        # container exited meanwhile (or, if Docker's event is late, that the agent is lost).
        reason = info.value.rcvd.reason
        assert reason.startswith("sandbox exited: container exited with code") or "agent" in reason
    # The module gateway reconciles every second.
    wait_for(lambda: gateway.get(f"/sandboxes/{sandbox_id}").status_code == 404, timeout=15)


def test_twistd_help_lists_options(gateway: GatewayProcess) -> None:
    """`twistd sandboxgw --help` documents every option."""
    import subprocess

    from tests.integration.conftest import REPO, TWISTD

    output = subprocess.run(
        [TWISTD, "sandboxgw", "--help"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    for option in ("--port", "--image", "--idle-timeout", "--reap-interval", "--docker-threads"):
        assert option in output
