"""Two gateways on one swarm (``--backend swarm``, one instance): they serve the same
sandboxes, keep their state in the cluster (service labels), and reap each sandbox once."""

from __future__ import annotations

import json
import time
from typing import Any

from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.integration.swarm import (
    make_swarm_gateway,
    pytestmark_swarm,
    run,
    services_of,
    swarm_client,
    wait_for,
)
from twistedgw.runtime.labels import LABEL_STATE

pytestmark = pytestmark_swarm
__all__ = ["make_swarm_gateway", "swarm_client"]


def test_two_gateways_share_sandboxes(make_swarm_gateway: Any, swarm_client: Any) -> None:
    """Two gateways on one swarm (one instance): a sandbox created on A is found at once and
    run through B, and deleted through B; another made on B is run (a WebSocket straight to
    A, A's first request about it) and deleted through A."""
    a: GatewayProcess = make_swarm_gateway("--reap-interval", "30")
    b: GatewayProcess = make_swarm_gateway("--reap-interval", "30", instance=a.instance)
    sandbox_id = a.create()
    # No waiting for B's next sweep: an unknown id makes B look in the cluster first.
    assert b.get(f"/sandboxes/{sandbox_id}").status_code == 200
    with connect(f"{b.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "echo via-b > f.txt && echo ok")["output"] == "ok\n"
    with connect(f"{a.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "cat f.txt")["output"] == "via-b\n"
    assert b.delete(sandbox_id).status_code == 200
    assert services_of(swarm_client, sandbox_id) == []
    wait_for(lambda: a.get(f"/sandboxes/{sandbox_id}").status_code == 404, what="A forgets it")
    other = b.create()
    # A WebSocket straight to A, the first A hears of it: upgraded after A's lookup.
    with connect(f"{a.ws_url}/ws/{other}") as ws:
        assert run(ws, "echo via-a")["output"] == "via-a\n"
    assert a.delete(other).status_code == 200
    assert services_of(swarm_client, other) == []


def test_busy_on_one_gateway_is_not_reaped_by_the_other(
    make_swarm_gateway: Any, swarm_client: Any
) -> None:
    """A client attached through B keeps the sandbox alive although A (which never saw a
    client) sweeps too: B's state reaches A through the service's state label. Once idle,
    the sandbox is reaped once, by one gateway."""
    options = ("--idle-timeout", "3", "--reap-interval", "0.5")
    a: GatewayProcess = make_swarm_gateway(*options)
    b: GatewayProcess = make_swarm_gateway(*options, instance=a.instance)
    sandbox_id = a.create()
    with connect(f"{b.ws_url}/ws/{sandbox_id}") as ws:
        time.sleep(6)  # twice the idle timeout, A sweeping all along
        assert a.get(f"/sandboxes/{sandbox_id}").status_code == 200
        assert run(ws, "echo still-here")["output"] == "still-here\n"
        (service,) = services_of(swarm_client, sandbox_id)
        state = json.loads(service.attrs["Spec"]["Labels"][LABEL_STATE])
        assert state["ever_connected"] is True
    wait_for(lambda: services_of(swarm_client, sandbox_id) == [], what="reap after idle")
    # Both processes share one log file (it is named after the instance).
    line = f"reaped sandbox {sandbox_id}"
    wait_for(lambda: line in a.tail(1000), what="the reap's log line")
    time.sleep(2)  # a second reaper would have logged by now
    assert a.tail(1000).count(line) == 1


def test_idempotent_retry_on_the_other_gateway(make_swarm_gateway: Any) -> None:
    """A create retried with the same Idempotency-Key on another gateway (before that one's
    next sweep) returns the sandbox the first try made, not a second one."""
    a: GatewayProcess = make_swarm_gateway("--reap-interval", "30")
    b: GatewayProcess = make_swarm_gateway("--reap-interval", "30", instance=a.instance)
    headers = {"Idempotency-Key": "retry-1"}
    first = a.create(headers=headers)
    again = b.create(headers=headers)
    assert again == first
    assert [s["sandbox_id"] for s in b.get("/sandboxes").json()] == [first]
