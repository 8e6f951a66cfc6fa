"""Integration fixtures: a real dockerd, the real sandbox image, and the gateway as a real
``twistd sandboxgw`` process, driven over loopback with independent clients (requests and the
``websockets`` library).

These tests never skip: without a Docker engine or the image they fail with a message saying
how to get them (``tests/run.sh`` starts the engine and builds the image).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from twistedgw.runtime.labels import LABEL_INSTANCE
from twistedgw.testing.process import IMAGE, REPO
from twistedgw.testing.process import GatewayProcess as _GatewayProcess

# What the test modules import from here.
__all__ = ["IMAGE", "REPO", "TWISTD", "GatewayProcess", "remove_instance_containers"]

#: The venv's twistd, next to the running interpreter.
TWISTD = str(Path(sys.executable).parent / "twistd")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as e:
        pytest.fail(
            f"integration tests need a running Docker engine ({e}); run ./tests/run.sh, "
            "which starts one",
            pytrace=False,
        )
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"integration tests need the image {IMAGE!r}; run sandbox-image/build.sh "
            "(./tests/run.sh does)",
            pytrace=False,
        )
    yield client
    client.close()


class GatewayProcess(_GatewayProcess):
    """One ``twistd -n sandboxgw`` child process on a loopback port (the shared harness,
    ``twistedgw.testing.process``), with REST helpers for tests."""

    # -- REST helpers ------------------------------------------------------------------------

    def create(self, **kwargs: Any) -> str:
        response = requests.post(self.url + "/sandboxes", timeout=60, **kwargs)
        assert response.status_code == 200, response.text
        return str(response.json()["sandbox_id"])

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)

    def delete(self, sandbox_id: str) -> requests.Response:
        return requests.delete(f"{self.url}/sandboxes/{sandbox_id}", timeout=60)


def remove_instance_containers(client: Any, instance: str) -> None:
    """Remove the containers of one test gateway instance (by our own label, nothing else)."""
    for container in client.containers.list(
        all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"}
    ):
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture
def make_gateway(docker_client: Any) -> Iterator[Any]:
    """Factory fixture: start gateways (own instance label each); stop and clean up after."""
    started: list[GatewayProcess] = []

    def make(*args: str, instance: str | None = None, ready: bool = True) -> GatewayProcess:
        gateway = GatewayProcess(instance or f"it-{secrets.token_hex(4)}", *args)
        gateway.start(ready=ready)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()
    for instance in {g.instance for g in started}:
        remove_instance_containers(docker_client, instance)


@pytest.fixture(scope="module")
def gateway(docker_client: Any) -> Iterator[GatewayProcess]:
    """A gateway shared by a module's tests."""
    gw = GatewayProcess(f"it-{secrets.token_hex(4)}", "--reap-interval", "1")
    gw.start()
    yield gw
    gw.stop()
    remove_instance_containers(docker_client, gw.instance)
