"""Docker outages and a slow Docker, as one gateway sees them (through a socket proxy), plus
bursts of parallel creates and deletes."""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.integration.helpers import run
from tests.integration.sockproxy import DockerSocketProxy
from twistedgw.runtime.labels import LABEL_INSTANCE


@pytest.fixture
def proxy() -> Iterator[DockerSocketProxy]:
    directory = Path(tempfile.mkdtemp(prefix="tgw-proxy-"))
    proxy = DockerSocketProxy(directory / "docker.sock")
    proxy.up()
    yield proxy
    proxy.down()


def timed_post(gateway: GatewayProcess) -> tuple[float, requests.Response]:
    started = time.monotonic()
    response = requests.post(gateway.url + "/sandboxes", timeout=60)
    return time.monotonic() - started, response


def test_docker_outage_answers_503_fast_and_recovers(
    make_gateway: Any, proxy: DockerSocketProxy
) -> None:
    """With the engine gone: REST answers 503 JSON within 2 s, the reaper deletes nothing,
    sandboxes stay usable; when it is back everything resumes without a restart."""
    gateway: GatewayProcess = make_gateway(
        "--docker-url", proxy.url, "--reap-interval", "0.5", "--docker-timeout", "5"
    )
    sandbox_id = gateway.create()
    proxy.down()
    for _ in range(3):
        elapsed, response = timed_post(gateway)
        assert response.status_code == 503
        assert "Docker" in response.json()["error"]
        assert elapsed < 2.0
    elapsed_delete = time.monotonic()
    response = gateway.delete(sandbox_id)
    assert response.status_code == 503 and time.monotonic() - elapsed_delete < 2.0
    time.sleep(3)  # several sweeps while Docker is away
    assert gateway.get(f"/sandboxes/{sandbox_id}").status_code == 200
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "echo still here")["output"] == "still here\n"

    proxy.up()
    deadline = time.monotonic() + 15
    while True:
        _, response = timed_post(gateway)
        if response.status_code == 200:
            break
        assert time.monotonic() < deadline, "gateway did not recover after Docker came back"
        time.sleep(0.5)
    assert gateway.delete(sandbox_id).status_code == 200
    assert gateway.delete(response.json()["sandbox_id"]).status_code == 200


def test_slow_docker_is_bounded(make_gateway: Any, proxy: DockerSocketProxy) -> None:
    """When Docker answers too slowly, calls time out within --docker-timeout, later ones fail
    fast while the health check fails, and nothing hangs; speed back means service back."""
    gateway: GatewayProcess = make_gateway("--docker-url", proxy.url, "--docker-timeout", "2")
    proxy.slow(10)
    elapsed, response = timed_post(gateway)
    assert response.status_code == 503
    assert elapsed < 2 + 5 + 1
    time.sleep(3)  # the health check notices
    elapsed, response = timed_post(gateway)
    assert response.status_code == 503
    assert elapsed < 1.0
    assert gateway.get("/healthz").status_code == 200
    proxy.slow(0)
    deadline = time.monotonic() + 20
    while timed_post(gateway)[1].status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_parallel_creates_and_deletes(make_gateway: Any, docker_client: Any) -> None:
    """50 creates at once with a cap of 40: 40 succeed, 10 get 429, no duplicates and no
    orphans; then 40 deletes at once all succeed and leave no container."""
    gateway: GatewayProcess = make_gateway("--max-sandboxes", "40")
    results: list[requests.Response | Exception] = []
    lock = threading.Lock()

    def post() -> None:
        try:
            response = requests.post(gateway.url + "/sandboxes", timeout=120)
        except Exception as e:  # recorded and asserted on below
            response = e  # type: ignore[assignment]
        with lock:
            results.append(response)

    threads = [threading.Thread(target=post) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    codes = sorted(r.status_code for r in results if isinstance(r, requests.Response))
    assert codes == [200] * 40 + [429] * 10, codes
    ids = {
        r.json()["sandbox_id"]
        for r in results
        if isinstance(r, requests.Response) and r.status_code == 200
    }
    assert len(ids) == 40
    label = f"{LABEL_INSTANCE}={gateway.instance}"
    containers = docker_client.containers.list(all=True, filters={"label": label})
    assert len(containers) == 40

    deletes: list[int] = []

    def delete(sandbox_id: str) -> None:
        code = gateway.delete(sandbox_id).status_code
        with lock:
            deletes.append(code)

    threads = [threading.Thread(target=delete, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert deletes == [200] * 40
    assert docker_client.containers.list(all=True, filters={"label": label}) == []


def test_idempotent_create_over_http(make_gateway: Any, docker_client: Any) -> None:
    """Five concurrent POSTs with one Idempotency-Key make one container; a retry later gets
    the same sandbox."""
    gateway: GatewayProcess = make_gateway()
    key = secrets.token_hex(8)
    answers: list[str] = []

    def post() -> None:
        response = requests.post(
            gateway.url + "/sandboxes", headers={"Idempotency-Key": key}, timeout=60
        )
        answers.append(response.json()["sandbox_id"])

    threads = [threading.Thread(target=post) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(set(answers)) == 1 and len(answers) == 5
    again = requests.post(
        gateway.url + "/sandboxes", headers={"Idempotency-Key": key}, timeout=60
    ).json()["sandbox_id"]
    assert again == answers[0]
    label = f"{LABEL_INSTANCE}={gateway.instance}"
    assert len(docker_client.containers.list(all=True, filters={"label": label})) == 1


def test_container_removed_behind_our_back(make_gateway: Any, docker_client: Any) -> None:
    """docker rm -f of a sandbox: noticed from the event stream within a second or two, clients
    closed with a reason, and GET says removed with reason 'exited'."""
    gateway: GatewayProcess = make_gateway("--reap-interval", "3600")
    sandbox_id = gateway.create()
    docker_client.containers.get(f"twistedgw-{sandbox_id}").remove(force=True)
    deadline = time.monotonic() + 5
    while (response := gateway.get(f"/sandboxes/{sandbox_id}")).status_code != 404:
        assert time.monotonic() < deadline, "removal not noticed without a sweep"
        time.sleep(0.1)
    assert response.json()["reason"] == "exited"


def test_abandoned_create_is_not_leaked(make_gateway: Any) -> None:
    """A client that gives up mid-create does not leave an unknown container: the sandbox is
    finished and listed (and reaped like any other)."""
    gateway: GatewayProcess = make_gateway()
    with pytest.raises(requests.exceptions.Timeout):
        requests.post(gateway.url + "/sandboxes", timeout=0.2)
    deadline = time.monotonic() + 20
    while len(gateway.get("/sandboxes").json()) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
