"""Per-create resources on a real engine: what a creator asks for is what the container gets,
within the operator's maxima."""

from __future__ import annotations

from typing import Any

import requests
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.integration.helpers import run
from twistedgw.testing.process import PYTHON_IMAGE

MIB = 1024**2


def test_cpus_memory_and_disk_per_create(make_gateway: Any, docker_client: Any) -> None:
    """``cpus``, ``memory`` and ``disk`` become the container's CPU quota, memory limit and
    tmpfs sizes (seen from inside too), are shown under ``?details=true``, and a value beyond
    a maximum is a 400 naming the field and the maximum; a create without them keeps the
    server's values."""
    gateway: GatewayProcess = make_gateway(
        "--max-cpus", "2", "--max-memory", "2g", "--max-disk", "512m"
    )
    sandbox_id = gateway.create(json={"cpus": 1.5, "memory": "1536m", "disk": "512m"})
    host_config = docker_client.containers.get(f"twistedgw-{sandbox_id}").attrs["HostConfig"]
    assert host_config["NanoCpus"] == 1_500_000_000
    assert host_config["Memory"] == host_config["MemorySwap"] == 1536 * MIB
    assert f"size={512 * MIB}," in host_config["Tmpfs"]["/home/sandbox"]
    assert f"size={256 * MIB}," in host_config["Tmpfs"]["/tmp"]
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        home = run(ws, "df -k --output=size /home/sandbox | tail -1")["output"].strip()
        assert int(home) == 512 * 1024
    details = gateway.get(f"/sandboxes/{sandbox_id}?details=true").json()
    assert details["resources"] == {"cpus": 1.5, "memory": 1536 * MIB, "disk": 512 * MIB}

    too_much = requests.post(gateway.url + "/sandboxes", json={"memory": "3g"}, timeout=30)
    assert too_much.status_code == 400
    assert "'memory'" in too_much.json()["error"] and "(2g)" in too_much.json()["error"]

    plain = gateway.create()
    host_config = docker_client.containers.get(f"twistedgw-{plain}").attrs["HostConfig"]
    assert host_config["NanoCpus"] == 1_000_000_000 and host_config["Memory"] == 1024 * MIB
    shown = gateway.get(f"/sandboxes/{plain}?details=true").json()["resources"]
    assert shown == {"cpus": 1.0, "memory": 1024 * MIB, "disk": 256 * MIB}


def test_template_defaults_under_the_creators_request(
    make_gateway: Any, docker_client: Any
) -> None:
    """With the default maxima, the python template's labels apply (memory 2g, home 1g, /tmp
    512m, exec); a creator's ``memory`` goes over them and keeps the rest; beyond
    ``--max-memory`` (2g by default) is a 400 whatever the template; ``?details=true`` and
    ``GET /templates`` agree."""
    gateway: GatewayProcess = make_gateway("--template", f"python={PYTHON_IMAGE}")
    templates = {t["name"]: t for t in gateway.get("/templates").json()}
    assert templates["python"]["resources"] == {
        "cpus": 1.0,
        "memory": 2048 * MIB,
        "disk": 1024 * MIB,
    }

    python = gateway.create(json={"template": "python"})
    host_config = docker_client.containers.get(f"twistedgw-{python}").attrs["HostConfig"]
    assert host_config["Memory"] == 2048 * MIB
    details = gateway.get(f"/sandboxes/{python}?details=true").json()
    assert details["template"] == "python"
    assert details["resources"] == templates["python"]["resources"]

    smaller = gateway.create(json={"template": "python", "memory": "1g"})
    host_config = docker_client.containers.get(f"twistedgw-{smaller}").attrs["HostConfig"]
    assert host_config["Memory"] == 1024 * MIB
    assert f"size={1024 * MIB}," in host_config["Tmpfs"]["/home/sandbox"]
    assert (
        f"size={512 * MIB}," in host_config["Tmpfs"]["/tmp"]
        and ",exec," in host_config["Tmpfs"]["/tmp"]
    )
    details = gateway.get(f"/sandboxes/{smaller}?details=true").json()
    assert details["resources"] == {"cpus": 1.0, "memory": 1024 * MIB, "disk": 1024 * MIB}

    too_much = requests.post(
        gateway.url + "/sandboxes", json={"template": "python", "memory": "3g"}, timeout=30
    )
    assert too_much.status_code == 400
    assert "'memory'" in too_much.json()["error"] and "(2g)" in too_much.json()["error"]
