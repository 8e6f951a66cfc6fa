"""Fixtures for the Swarm tests: a second, swarm-mode engine beside the default one.

``swarm_client`` (session) starts it through ``scripts/ensure-swarm.sh`` (under a file lock,
so parallel workers start it once; the Swarm tests are also grouped with ``xdist_group``),
stops it at the end only if this session started it and is not an xdist worker (others may
still use it; ``tests/run.sh`` starts it before and stops it after), and, before and after,
checks that the
default engine still serves a published port (``scripts/check-default-engine.sh``): a second
dockerd once broke every published port of the default one.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from tests.integration.conftest import GatewayProcess
from twistedgw.runtime.labels import LABEL_INSTANCE, LABEL_SANDBOX_ID
from twistedgw.testing.process import REPO

SWARM_SOCKET = "/run/twistedgw-swarm/docker.sock"
SWARM_URL = f"unix://{SWARM_SOCKET}"
LOCK = "/run/twistedgw-swarm.lock"
#: Every Swarm test module carries this mark: one xdist worker runs them all.
pytestmark_swarm = [pytest.mark.integration, pytest.mark.xdist_group("swarm")]


def script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def check_default_engine() -> None:
    """The default engine's docker0 exists and a published loopback port answers."""
    result = script("check-default-engine.sh")
    assert result.returncode == 0, result.stderr


def engine_running() -> bool:
    try:
        with open("/run/twistedgw-swarm/dockerd.pid") as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "dockerd"
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def swarm_client() -> Iterator[Any]:
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        check_default_engine()
        started = not engine_running()
        result = script("ensure-swarm.sh")
        assert result.returncode == 0, f"could not start the swarm engine:\n{result.stderr}"
    client = docker.DockerClient(base_url=SWARM_URL, timeout=60)
    try:
        yield client
    finally:
        client.close()
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Under pytest-xdist other workers may still use it (--dist loadfile ignores the
            # group): then tests/run.sh, which started it first, stops it.
            if started and not os.environ.get("PYTEST_XDIST_WORKER"):
                stopped = script("ensure-swarm.sh", "stop")
                assert stopped.returncode == 0, stopped.stderr
            check_default_engine()


def remove_instance_services(client: Any, instance: str) -> None:
    """Remove one test instance's services and volumes on the swarm engine (by our label)."""
    label = f"{LABEL_INSTANCE}={instance}"
    for service in client.services.list(filters={"label": label}):
        try:
            service.remove()
        except docker.errors.NotFound:
            pass
    for volume in client.volumes.list(filters={"label": label}):
        for _ in range(100):
            try:
                volume.remove()
                break
            except docker.errors.NotFound:
                break
            except docker.errors.APIError:
                time.sleep(0.1)


def run(ws: Any, command: str, **fields: Any) -> dict[str, Any]:
    """Send one command and return the next message (its result: these commands print little)."""
    ws.send(json.dumps({"command": command, **fields}))
    return dict(json.loads(ws.recv(timeout=30)))


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 0.1 s until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout} s")


def services_of(client: Any, sandbox_id: str) -> list[Any]:
    """The swarm services labelled as sandbox ``sandbox_id``'s."""
    return list(client.services.list(filters={"label": f"{LABEL_SANDBOX_ID}={sandbox_id}"}))


def swarm_gateway(instance: str, *args: str) -> GatewayProcess:
    return GatewayProcess(instance, "--backend", "swarm", "--docker-url", SWARM_URL, *args)


@pytest.fixture
def make_swarm_gateway(swarm_client: Any) -> Iterator[Any]:
    """Factory: gateways on the swarm engine (each its own instance unless told); stopped,
    and their services and volumes removed, afterwards."""
    started: list[GatewayProcess] = []

    def make(*args: str, instance: str | None = None) -> GatewayProcess:
        gateway = swarm_gateway(instance or f"sw-{secrets.token_hex(4)}", *args)
        gateway.start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        if gateway.alive():
            gateway.stop()
    for instance in {g.instance for g in started}:
        remove_instance_services(swarm_client, instance)
