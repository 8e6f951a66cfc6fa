"""The warm pool against the real engine: hand-out, refill, restart, fallbacks."""

from __future__ import annotations

import signal
import time
from typing import Any

import requests
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.integration.helpers import run, wait_for
from twistedgw.runtime.labels import LABEL_INSTANCE, LABEL_SANDBOX_ID


def pool_ready(gateway: GatewayProcess) -> int:
    return int(gateway.get("/healthz").json()["pool"]["ready"])


def containers(docker_client: Any, gateway: GatewayProcess) -> list[Any]:
    label = f"{LABEL_INSTANCE}={gateway.instance}"
    return list(docker_client.containers.list(all=True, filters={"label": label}))


def test_pool_hands_out_refills_and_survives_restart(make_gateway: Any, docker_client: Any) -> None:
    """Pooled containers are handed out once, replaced, not listed or reaped while pooled,
    and after a SIGKILL restart the pool and the handed-out sandbox are both recovered."""
    gateway: GatewayProcess = make_gateway(
        "--pool-size", "2", "--idle-timeout", "2", "--reap-interval", "0.5"
    )
    wait_for(lambda: pool_ready(gateway) == 2, timeout=60)
    time.sleep(3)  # longer than the idle timeout: pooled containers are not reaped
    assert pool_ready(gateway) == 2
    assert gateway.get("/sandboxes").json() == []
    pooled = {c.labels[LABEL_SANDBOX_ID] for c in containers(docker_client, gateway)}

    sandbox_id = gateway.create(json={"idle_timeout": 600})
    assert sandbox_id in pooled
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "echo warm > f; cat f")["output"] == "warm\n"
    wait_for(lambda: pool_ready(gateway) == 2, timeout=60)
    assert len(containers(docker_client, gateway)) == 3

    gateway.stop(signal.SIGKILL)
    again: GatewayProcess = make_gateway(
        "--pool-size",
        "2",
        "--idle-timeout",
        "2",
        "--reap-interval",
        "0.5",
        instance=gateway.instance,
    )
    wait_for(lambda: again.get(f"/sandboxes/{sandbox_id}").status_code == 200, timeout=15)
    wait_for(lambda: pool_ready(again) == 2, timeout=30)
    assert len(containers(docker_client, again)) == 3, "the pool was adopted, not rebuilt"
    assert [s["sandbox_id"] for s in again.get("/sandboxes").json()] == [sandbox_id]
    with connect(f"{again.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "cat f")["output"] == "warm\n"

    handed = {again.create() for _ in range(4)}
    assert len(handed) == 4 and sandbox_id not in handed


def test_pool_falls_back_to_cold_for_options_it_cannot_honour(make_gateway: Any) -> None:
    """A create with env or metadata gets a fresh container with them applied; the pool is
    untouched."""
    gateway: GatewayProcess = make_gateway("--pool-size", "1")
    wait_for(lambda: pool_ready(gateway) == 1, timeout=60)
    response = requests.post(
        gateway.url + "/sandboxes",
        timeout=60,
        json={"env": {"GREETING": "cold"}, "metadata": {"team": "a"}},
    )
    sandbox_id = response.json()["sandbox_id"]
    assert pool_ready(gateway) == 1
    assert gateway.get(f"/sandboxes/{sandbox_id}").json()["metadata"] == {"team": "a"}
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "echo $GREETING")["output"] == "cold\n"
