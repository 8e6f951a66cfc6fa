"""Integration fixtures: a real dockerd, the real sandbox image, and the gateway as a real
``twistd sandboxgw`` process, driven over loopback with independent clients (requests and the
``websockets`` library).

These tests never skip: without a Docker engine or the image they fail with a message saying
how to get them (``tests/run.sh`` starts the engine and builds the image).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from twistedgw.runtime.labels import LABEL_INSTANCE

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SANDBOX_IMAGE", "sandbox-websocket-image")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """One ``twistd -n sandboxgw`` child process on a loopback port."""

    def __init__(self, instance: str, *args: str) -> None:
        self.instance = instance
        self.args = args
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        self.log_path = tmp / f"twistedgw-{instance}.log"
        self.state_dir = tmp / f"twistedgw-state-{instance}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, ready: bool = True) -> None:
        """Start the process and wait until /healthz answers and, with ``ready``, says the
        gateway has recovered its sandboxes (sandbox routes answer 503 until then)."""
        self.launch()
        self.wait_ready(timeout, ready)

    def launch(self) -> None:
        """Start the process without waiting for it to answer."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        command = [
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            "sandboxgw",
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--instance",
            self.instance,
            "--image",
            IMAGE,
            "--state-dir",
            str(self.state_dir),
            *self.args,
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )

    def wait_ready(self, timeout: float = 30.0, ready: bool = True) -> None:
        """Wait until /healthz answers 200 (and, with ``ready``, says ``ready``)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited early; see {self.log_path}:\n{self.tail()}")
            try:
                health = requests.get(self.url + "/healthz", timeout=1)
                if health.status_code == 200 and (health.json().get("ready", True) or not ready):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not answer within {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the process (by PID) and wait for it; returns its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

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
