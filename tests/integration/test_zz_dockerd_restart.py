"""A real Docker engine outage: stop dockerd under a running gateway and start it again.

Named to run last: it restarts the engine every other test uses. It needs a dockerd that the
project's own scripts started (scripts/ensure-docker.sh writes its pid, and starts it with
--live-restore so sandboxes outlive the restart), which is what CI and tests/run.sh on a fresh
machine have. In CI it never skips; elsewhere, with an engine it did not start, it says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest
import requests
from websockets.sync.client import connect

from tests.integration.conftest import REPO, GatewayProcess
from tests.integration.helpers import run, wait_for

PID_FILE = "/run/twistedgw-dockerd.pid"

# It stops the engine every other test uses: alone, after the parallel phase (tests/run.sh).
pytestmark = pytest.mark.serial


def our_dockerd(docker_client: Any) -> int | None:
    """The pid of a dockerd started by scripts/ensure-docker.sh with --live-restore."""
    try:
        pid = int(open(PID_FILE).read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    if not docker_client.info().get("LiveRestoreEnabled"):
        return None
    return pid


def test_dockerd_stop_and_start(make_gateway: Any, docker_client: Any) -> None:
    """While dockerd is down: 503 within 2 s, nothing reaped; when it is back: service resumes
    without a gateway restart, and the sandbox (kept by live-restore) is still there."""
    pid = our_dockerd(docker_client)
    if pid is None:
        message = "needs a dockerd started by scripts/ensure-docker.sh (with --live-restore)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    gateway: GatewayProcess = make_gateway("--reap-interval", "0.5")
    sandbox_id = gateway.create()
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "echo before > f")["success"]

    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(
            lambda: subprocess.run(["docker", "info"], capture_output=True).returncode != 0,
            timeout=30,
        )
        for _ in range(3):
            started = time.monotonic()
            response = requests.post(gateway.url + "/sandboxes", timeout=30)
            assert response.status_code == 503
            assert time.monotonic() - started < 2.0
        time.sleep(2)  # sweeps while the engine is away
        assert gateway.get(f"/sandboxes/{sandbox_id}").status_code == 200
    finally:
        subprocess.run([str(REPO / "scripts" / "ensure-docker.sh")], check=True, timeout=120)

    deadline = time.monotonic() + 30
    while (response := requests.post(gateway.url + "/sandboxes", timeout=60)).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not recover"
        time.sleep(0.5)
    assert gateway.get(f"/sandboxes/{sandbox_id}").status_code == 200
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "cat f")["output"] == "before\n"
    assert gateway.delete(response.json()["sandbox_id"]).status_code == 200
