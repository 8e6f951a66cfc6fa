"""Issue 19 against a real gateway and engine: ``/metrics`` scraped during a real flow, JSON
logs, ``--metrics-port``, the gateway's answers validated against its OpenAPI document, and
schemathesis fuzzing a live gateway.

Every gateway here has its own instance label, port and state directory (``make_gateway``),
so the module is safe under pytest-xdist; the fixture removes its containers afterwards.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import schemathesis
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess
from tests.integration.helpers import run
from twistedgw.testing.process import free_port
from twistedgw.web.auth import owner_id
from twistedgw.web.openapi import DOCUMENT

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _token_gateway(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, *args: str
) -> tuple[GatewayProcess, str]:
    token = "it-ops-" + secrets.token_hex(16)
    tokens = tmp_path / "tokens"
    tokens.write_text(token + "\n")
    return make_gateway("--tokens-file", str(tokens), *args), token


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def scrape(url: str, token: str | None = None) -> Samples:
    """Every sample of one scrape of ``url``, by name and labels."""
    response = requests.get(url, headers=_auth(token) if token else {}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def at(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_by_the_right_amounts_during_a_real_flow(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """Create, three commands (ok, failed, timed out), delete and a refused create, on a
    token gateway logging JSON: each counter and gauge moves by what happened, /metrics
    needs the token, and every log line is a JSON object with the flow's fields."""
    gw, token = _token_gateway(make_gateway, tmp_path, "--log-format", "json")
    metrics = gw.url + "/metrics"
    assert requests.get(metrics, timeout=30).status_code == 401
    before = scrape(metrics, token)

    response = requests.post(gw.url + "/sandboxes", headers=_auth(token), timeout=120)
    assert response.status_code == 200, response.text
    sandbox_id = response.json()["sandbox_id"]
    created = scrape(metrics, token)
    assert at(created, "twistedgw_sandboxes", status="created") == 1

    with connect(f"{gw.ws_url}/ws/{sandbox_id}", additional_headers=_auth(token)) as ws:
        assert run(ws, "echo hi")["returncode"] == 0
        assert run(ws, "exit 3")["returncode"] == 3
        assert run(ws, "sleep 5", timeout=0.5)["timed_out"] is True
        during = scrape(metrics, token)
        assert at(during, "twistedgw_websocket_clients") == 1
        assert at(during, "twistedgw_sandboxes", status="connected") == 1

    deadline = time.monotonic() + 10
    while at(scrape(metrics, token), "twistedgw_websocket_clients") != 0:
        assert time.monotonic() < deadline, "the closed client is still counted"
        time.sleep(0.1)
    deleted = requests.delete(f"{gw.url}/sandboxes/{sandbox_id}", headers=_auth(token), timeout=60)
    assert deleted.status_code == 200
    refused = requests.post(
        gw.url + "/sandboxes", headers=_auth(token), json={"bogus": 1}, timeout=30
    )
    assert refused.status_code == 400
    after = scrape(metrics, token)

    create = "twistedgw_sandbox_create_duration_seconds"
    assert moved(before, after, create + "_count", path="cold", outcome="ok") == 1
    assert moved(before, after, create + "_sum", path="cold", outcome="ok") > 0
    assert moved(before, after, create + "_count", path="cold", outcome="failed") == 0
    docker = "twistedgw_docker_call_duration_seconds_count"
    assert moved(before, after, docker, operation="create") == 1
    assert moved(before, after, docker, operation="remove") == 1
    started = "twistedgw_commands_started_total"
    assert moved(before, after, started, mode="foreground") == 3
    finished = "twistedgw_commands_finished_total"
    for outcome in ("ok", "failed", "timed_out"):
        assert moved(before, after, finished, outcome=outcome) == 1, outcome
    assert moved(before, after, finished, outcome="cancelled") == 0
    assert moved(before, after, "twistedgw_command_duration_seconds_count") == 3
    assert moved(before, after, "twistedgw_command_duration_seconds_sum") >= 0.5
    for direction in ("to_agent", "to_client"):
        assert moved(before, after, "twistedgw_websocket_bytes_total", direction=direction) > 0
    assert moved(before, after, "twistedgw_sandboxes_removed_total", reason="deleted") == 1
    for status in ("created", "connected", "idle", "paused"):
        assert at(after, "twistedgw_sandboxes", status=status) == 0
    assert at(after, "twistedgw_pool_size", template="default") == 0
    assert moved(before, after, "twistedgw_agent_connect_failures_total") == 0

    lines = [line for line in gw.log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    assert any(r.get("sandbox_id") == sandbox_id for r in records)
    access = [r for r in records if r.get("event") == "access" and r["path"] == "/sandboxes"]
    create_line = next(r for r in access if r["method"] == "POST" and r["status"] == 200)
    assert create_line["owner"] == owner_id(token)
    assert create_line["duration_ms"] > 0
    assert token not in gw.log_path.read_text()


def test_metrics_port_serves_metrics_apart_from_the_api(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """With --metrics-port the API port answers /metrics 404 (even with the token) and the
    loopback metrics port serves it without one."""
    port = free_port()
    gw, token = _token_gateway(make_gateway, tmp_path, "--metrics-port", str(port))
    answer = requests.get(gw.url + "/metrics", headers=_auth(token), timeout=30)
    assert answer.status_code == 404
    assert "metrics-port" in answer.json()["error"]
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert ("twistedgw_websocket_clients", frozenset()) in samples


class Conformance:
    """Checks each answer against the OpenAPI document: a documented status, and a body and
    headers as documented (schemathesis' response validation)."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token
        self.schema = schemathesis.openapi.from_dict(DOCUMENT)
        self.checked: list[tuple[str, str, int]] = []

    def call(self, method: str, template: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {**_auth(self.token), **kwargs.pop("headers", {})}
        response = requests.request(
            method, self.base + path, headers=headers, timeout=120, **kwargs
        )
        operation = self.schema[template][method]
        documented = DOCUMENT["paths"][template][method.lower()]["responses"]
        assert str(response.status_code) in documented, (method, path, response.status_code)
        operation.validate_response(response)
        self.checked.append((method, template, response.status_code))
        return response


def test_answers_of_the_main_flows_conform_to_the_openapi_document(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """Create, list, get, keepalive, files, snapshots, pause/resume, delete and errors:
    every answer has a documented status and matches its documented schema."""
    gw, token = _token_gateway(make_gateway, tmp_path)
    api = Conformance(gw.url, token)
    sb = "/sandboxes/{sandbox_id}"
    assert api.call("GET", "/healthz", "/healthz").json()["ready"] is True
    assert api.call("GET", "/openapi.json", "/openapi.json").json() == DOCUMENT
    api.call("GET", "/templates", "/templates")
    created = api.call(
        "POST", "/sandboxes", "/sandboxes", json={"idle_timeout": 600, "metadata": {"a": "b"}}
    )
    sid = created.json()["sandbox_id"]
    here = f"/sandboxes/{sid}"
    api.call("GET", "/sandboxes", "/sandboxes?details=true")
    api.call("GET", sb, here)
    api.call("GET", sb, here + "?details=true")
    api.call("POST", sb + "/keepalive", here + "/keepalive", json={"extend_by": 60})
    assert (
        api.call(
            "PUT", sb + "/files", here + "/files?path=d/x.txt&mkdirs=true", data=b"hi"
        ).status_code
        == 201
    )
    assert api.call("GET", sb + "/files", here + "/files?path=d/x.txt").content == b"hi"
    api.call("GET", sb + "/files", here + "/files?path=d/x.txt", headers={"Range": "bytes=0-0"})
    api.call("GET", sb + "/files/list", here + "/files/list?path=d")
    api.call("POST", sb + "/files/mkdir", here + "/files/mkdir?path=e/f")
    archive = api.call("GET", sb + "/files/archive", here + "/files/archive?path=d")
    assert "x.txt" in tarfile.open(fileobj=io.BytesIO(archive.content)).getnames()[-1]
    api.call("PUT", sb + "/files/archive", here + "/files/archive?path=g", data=archive.content)
    api.call("DELETE", sb + "/files", here + "/files?path=e&recursive=true")
    api.call("GET", sb + "/files", here + "/files?path=nope")  # 404
    snapshot = api.call("POST", sb + "/snapshots", here + "/snapshots").json()
    api.call("GET", "/snapshots", "/snapshots")
    api.call("DELETE", "/snapshots/{snapshot_id}", f"/snapshots/{snapshot['snapshot_id']}")
    api.call("POST", sb + "/pause", here + "/pause")
    api.call("GET", sb + "/files", here + "/files?path=d/x.txt")  # 409 while paused
    api.call("POST", sb + "/resume", here + "/resume")
    api.call("GET", "/ws/{sandbox_id}", f"/ws/{sid}")  # 426 without an upgrade
    api.call("POST", "/sandboxes", "/sandboxes", json={"bogus": True})  # 400
    api.call("POST", "/sandboxes", "/sandboxes", data=b"x", headers={"Content-Type": "text/plain"})
    api.call("GET", "/metrics", "/metrics")
    api.call("DELETE", sb, here)
    api.call("GET", sb, here)  # 404 with the removal reason
    api.call("DELETE", sb, here)
    statuses = {status for _, _, status in api.checked}
    assert {200, 201, 206, 400, 404, 409, 415, 426} <= statuses


#: schemathesis' checks: no 5xx, and every answer as documented (status, content type,
#: headers, body); and data outside the schema is refused with a 4xx.
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,negative_data_rejection"
)


def test_schemathesis_finds_no_server_error_and_no_nonconforming_answer(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """schemathesis fuzzes every operation of /openapi.json against a live gateway backed by
    the real engine (a few examples each, a fixed seed unless SCHEMATHESIS_SEED says
    otherwise): zero 5xx, every answer conforming, and no unhandled error in the log. The
    sandboxes it makes are deleted over the API afterwards (and the fixture removes the
    instance's containers)."""
    gw, token = _token_gateway(
        make_gateway, tmp_path, "--max-sandboxes", "3", "--agent-ready-timeout", "20"
    )
    st = Path(sys.executable).parent / "st"
    command = [
        str(st),
        "run",
        gw.url + "/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        CHECKS,
        "--phases",
        "examples,fuzzing",
        "--max-examples",
        os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "3"),
        "--seed",
        os.environ.get("SCHEMATHESIS_SEED", "19"),
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--no-color",
    ]
    try:
        done = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=480, check=False
        )
    finally:
        listing = requests.get(gw.url + "/sandboxes", headers=_auth(token), timeout=30)
        for sandbox in listing.json():
            requests.delete(
                f"{gw.url}/sandboxes/{sandbox['sandbox_id']}", headers=_auth(token), timeout=60
            )
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout, report
    log = gw.log_path.read_text(errors="replace")
    assert "Unhandled Error" not in log and "unhandled error on" not in log, gw.tail(80)
    assert requests.get(gw.url + "/sandboxes", headers=_auth(token), timeout=30).json() == []
