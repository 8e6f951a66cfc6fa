"""The gateway with ``--backend swarm`` on the second, swarm-mode engine: the seed flow, the
reaper, recovery after SIGKILL (two gateways sharing sandboxes: test_swarm_cluster.py)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.integration.swarm import (
    check_default_engine,
    make_swarm_gateway,
    pytestmark_swarm,
    run,
    services_of,
    swarm_client,
    wait_for,
)
from twistedgw.runtime.labels import LABEL_SANDBOX_ID

pytestmark = pytestmark_swarm
__all__ = ["make_swarm_gateway", "swarm_client"]


def test_swarm_seed_flow(make_swarm_gateway: Any, swarm_client: Any) -> None:
    """Create, list, get, connect, run, reconnect (files kept), delete: as the seed says,
    each sandbox a Swarm service that is gone after the delete."""
    gateway: GatewayProcess = make_swarm_gateway()
    sandbox_id = gateway.create()
    assert [s.name for s in services_of(swarm_client, sandbox_id)] == [f"twistedgw-{sandbox_id}"]
    assert sandbox_id in [e["sandbox_id"] for e in gateway.get("/sandboxes").json()]
    info = gateway.get(f"/sandboxes/{sandbox_id}").json()
    assert info["status"] == "idle"
    (container,) = swarm_client.containers.list(
        filters={"label": f"{LABEL_SANDBOX_ID}={sandbox_id}"}
    )
    assert (
        info["ip_address"] == container.attrs["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
    )
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        result = run(ws, "echo hello; id -u", request_id="r1")
        assert (result["success"], result["output"]) == (True, "hello\n1000\n")
        # The engine's --no-new-privileges (a service spec cannot ask for it).
        assert run(ws, "grep NoNewPrivs /proc/self/status")["output"].split() == [
            "NoNewPrivs:",
            "1",
        ]
        assert run(ws, "echo kept > notes.txt")["success"] is True
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "cat notes.txt")["output"] == "kept\n"
    response = gateway.delete(sandbox_id)
    assert response.status_code == 200, response.text
    assert gateway.get(f"/sandboxes/{sandbox_id}").status_code == 404
    assert services_of(swarm_client, sandbox_id) == []


def test_swarm_idle_sandbox_is_reaped(make_swarm_gateway: Any, swarm_client: Any) -> None:
    """With a 2 s idle timeout an idle sandbox's service is removed; a connected one stays."""
    gateway: GatewayProcess = make_swarm_gateway("--idle-timeout", "2", "--reap-interval", "0.5")
    idle = gateway.create()
    busy = gateway.create()
    with connect(f"{gateway.ws_url}/ws/{busy}") as ws:
        wait_for(lambda: gateway.get(f"/sandboxes/{idle}").status_code == 404, what="reap")
        assert run(ws, "echo alive")["output"] == "alive\n"
    wait_for(lambda: services_of(swarm_client, idle) == [], what="service removal")
    assert len(services_of(swarm_client, busy)) == 1


def test_swarm_recovery_after_sigkill(make_swarm_gateway: Any, tmp_path: Path) -> None:
    """After SIGKILL, a new gateway process on the same instance serves the same sandbox
    (same created_at, files intact) and resumes its idle clock and "ever connected" from the
    cluster (the state label written by the first one's sweep), not from a local file: the
    second one has a state directory of its own, as a replacement on another host would."""
    first: GatewayProcess = make_swarm_gateway("--reap-interval", "0.5")
    sandbox_id = first.create()
    before = first.get(f"/sandboxes/{sandbox_id}").json()
    with connect(f"{first.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "echo survived > state.txt")["success"]
    detail = f"/sandboxes/{sandbox_id}?details=true"
    left_at = first.get(detail).json()["last_activity"]
    time.sleep(2)  # a few sweeps: the state label is written
    first.stop(signal.SIGKILL)
    time.sleep(1)
    second: GatewayProcess = make_swarm_gateway(
        "--state-dir", str(tmp_path), instance=first.instance
    )
    wait_for(lambda: second.get(f"/sandboxes/{sandbox_id}").status_code == 200, what="recovery")
    after = second.get(detail).json()
    assert after["created_at"] == before["created_at"]
    assert after["state"] == "idle"  # not "created": it remembers the client
    assert abs(after["last_activity"] - left_at) < 1.0  # not reset to its own start
    with connect(f"{second.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "cat state.txt")["output"] == "survived\n"


def test_default_engine_still_serves_a_published_port(swarm_client: Any) -> None:
    """With the swarm engine up beside it (and after the tests above), the default engine
    still has docker0 and a container's published loopback port answers."""
    assert swarm_client.info()["Swarm"]["LocalNodeState"] == "active"
    check_default_engine()
