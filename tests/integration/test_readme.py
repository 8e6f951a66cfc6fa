"""Every example of README.md runs here against a real gateway (the markers and their kinds:
``tests/readme_blocks.py``; ``tests/test_readme_markers.py`` fails on an unmarked block).

``python`` and ``shell`` blocks run as they are: python with the venv's interpreter, shell with
bash (``set -e``, ``pipefail``, the venv's ``twistedgw`` and ``python3`` first on PATH), in a
scratch directory, with the README's ``localhost:8003`` / ``127.0.0.1:8003`` replaced by the
test gateway's address and ``TWISTEDGW_URL`` set to it; ``expect="TEXT"``: the block's stdout
contains TEXT. The other examples have a test each below, with the substitutions their text
implies (a sandbox the test made for ``<sandbox_id>``, the test gateway's token for ``$TOKEN``,
a test-owned image name and free ports); each says what it checks. Every gateway here has an
instance of its own (its containers removed afterwards) and free ports, so the module is safe
under pytest-xdist.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from tests.integration.conftest import IMAGE, REPO, GatewayProcess, remove_instance_containers
from tests.integration.helpers import recv, run, send, wait_for
from tests.readme_blocks import Block, readme_blocks, special_block
from twistedgw.testing.process import free_port, gateway_env

pytestmark = pytest.mark.integration

RUN_EXAMPLES = [b for b in readme_blocks() if b.kind in ("python", "shell")]
VENV_BIN = Path(sys.executable).parent


def at_gateway(code: str, gateway: GatewayProcess) -> str:
    """The README's default address (port 8003) replaced by the test gateway's."""
    address = gateway.url.removeprefix("http://")
    return code.replace("localhost:8003", address).replace("127.0.0.1:8003", address)


def example_env(gateway: GatewayProcess, **more: str) -> dict[str, str]:
    env = gateway_env()
    env.pop("TWISTEDGW_TOKEN", None)
    env["TWISTEDGW_URL"] = gateway.url
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    env.update(more)
    return env


def run_shell(
    code: str, cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a shell example with bash -e -o pipefail; fail the test with its output if it
    fails."""
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{code}\n--- stdout:\n{result.stdout}\n--- {result.stderr}"
    return result


# A curl that fails on an HTTP error (and says so), so `set -e` stops at a failing route.
CURL_FAILS = 'curl() { command curl --fail-with-body -sS "$@"; }\n'


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def token_gateway(
    docker_client: Any, tmp_path_factory: Any
) -> Iterator[tuple[GatewayProcess, str, int]]:
    """A gateway with an API token and a ``--metrics-port``: (gateway, token, metrics port)."""
    token = "it-readme-" + secrets.token_hex(16)
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(token + "\n")
    metrics_port = free_port()
    gw = GatewayProcess(
        f"it-{secrets.token_hex(4)}",
        "--tokens-file",
        str(tokens),
        "--metrics-port",
        str(metrics_port),
    )
    gw.start()
    yield gw, token, metrics_port
    gw.stop()
    remove_instance_containers(docker_client, gw.instance)


# -- python and shell blocks, as they are ----------------------------------------------------


@pytest.mark.parametrize(
    "example", RUN_EXAMPLES, ids=[f"{e.kind}-line{e.line}" for e in RUN_EXAMPLES]
)
def test_readme_example_runs(gateway: GatewayProcess, example: Block, tmp_path: Path) -> None:
    """A python or shell block of the README exits 0 against the module's gateway and prints
    each of its marker's expect="..." texts."""
    code = at_gateway(example.code, gateway) + "\n"
    env = example_env(gateway)
    if example.kind == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    where = f"README.md line {example.line}"
    assert result.returncode == 0, f"{where}:\n{result.stdout}\n{result.stderr}"
    for text in example.expect:
        assert text in result.stdout, f"{where}: {text!r} not in:\n{result.stdout}"


# -- Files, snapshots and pause --------------------------------------------------------------


def test_readme_files_example(
    token_gateway: tuple[GatewayProcess, str, int], tmp_path: Path
) -> None:
    """The curl block of "Files, snapshots and pause", with a real sandbox and the token (curl
    failing on any HTTP error): the uploaded bytes come back whole and as a byte range, the
    sandbox made from the snapshot holds them too, and pause and resume answer."""
    gw, token, _ = token_gateway
    sandbox_id = gw.create(headers=auth(token))
    payload = secrets.token_hex(2048).encode()  # 4096 printable bytes
    (tmp_path / "model.bin").write_bytes(payload)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello.py").write_text("print('hello')\n")
    code = (
        at_gateway(special_block("files").code, gw)
        .replace("<sandbox_id>", sandbox_id)
        # in the single-quoted JSON body, then in the double-quoted URL
        .replace('"<snapshot_id>"}\'', '"\'"$(readme_snapshot_id)"\'"}\'')
        .replace("<snapshot_id>", "$(readme_snapshot_id)")
    )
    # <snapshot_id>: the one snapshot of this test's token (made by the block's POST).
    prelude = CURL_FAILS + (
        'readme_snapshot_id() { command curl -sS -H "$AUTH" "$GW/snapshots"'
        " | jq -r '.[0].snapshot_id'; }\n"
    )
    out = run_shell(prelude + code, tmp_path, example_env(gw, TOKEN=token)).stdout

    assert (tmp_path / "model.bin").read_bytes() == payload  # -o model.bin, and the tar
    assert f'"size": {len(payload)}' in out  # the upload's answer
    assert payload[:1024].decode() in out and payload[:1025].decode() not in out  # the range
    assert re.search(rf"(?i)content-length: {len(payload)}\r?\n", out)  # HEAD
    assert '"name": "model.bin"' in out  # the listing
    assert '"paused": true' in out and '"paused": false' in out
    sandboxes = requests.get(gw.url + "/sandboxes", headers=auth(token), timeout=30).json()
    restored = [s["sandbox_id"] for s in sandboxes if s["sandbox_id"] != sandbox_id]
    assert len(restored) == 1, sandboxes  # the sandbox made from the snapshot
    copy = requests.get(
        f"{gw.url}/sandboxes/{restored[0]}/files",
        params={"path": "data/model.bin"},
        headers=auth(token),
        timeout=30,
    )
    assert copy.status_code == 200 and copy.content == payload
    assert requests.get(gw.url + "/snapshots", headers=auth(token), timeout=30).json() == []
    for sandbox in sandboxes:
        requests.delete(
            f"{gw.url}/sandboxes/{sandbox['sandbox_id']}", headers=auth(token), timeout=60
        )


# -- Port previews ---------------------------------------------------------------------------


def test_readme_port_preview_example(
    token_gateway: tuple[GatewayProcess, str, int], tmp_path: Path
) -> None:
    """The port-preview block, with the background command its comment names started over
    the WebSocket: python's http.server answers through the token route, and the signed URL
    the block's POST returns serves it without the token."""
    gw, token, _ = token_gateway
    sandbox_id = gw.create(headers=auth(token))
    block = special_block("preview")
    command = json.loads(re.search(r"#   (\{.*\})", block.code).group(1))  # type: ignore[union-attr]
    with connect(f"{gw.ws_url}/ws/{sandbox_id}", additional_headers=auth(token)) as ws:
        send(ws, {**command, "request_id": "server"})
        assert recv(ws)["type"] == "started"
    url = f"{gw.url}/sandboxes/{sandbox_id}/ports/8000/"
    wait_for(lambda: requests.get(url, headers=auth(token), timeout=10).status_code == 200, 30)

    env = example_env(gw, GW=gw.url, SB=sandbox_id, AUTH=f"Authorization: Bearer {token}")
    out = run_shell(CURL_FAILS + block.code, tmp_path, env).stdout
    assert "Directory listing for /" in out  # the token route
    signed = json.loads(out[out.index('{"path"') :])
    assert signed["port"] == 8000 and signed["path"].startswith(f"/previews/{sandbox_id}/8000/")
    assert signed["url"] == gw.url + signed["path"]
    page = requests.get(signed["url"], timeout=10)  # no token
    assert page.status_code == 200 and "Directory listing for /" in page.text
    requests.delete(f"{gw.url}/sandboxes/{sandbox_id}", headers=auth(token), timeout=60)


# -- OpenAPI: the schemathesis line ----------------------------------------------------------


def test_readme_schemathesis_example(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """The README's `st run` line against a live gateway with a token, as written but with
    --max-examples 1 instead of 20 and a fixed seed (to stay within a minute, and give the
    same cases every run; test_operations.py fuzzes more), a 60 s request timeout instead of
    st's 10 s (under four parallel workers an archive upload into a live sandbox, which
    starts a file worker as the sandbox user, once took longer) and the venv's st: it exits 0,
    every check passed. The sandboxes it made are deleted afterwards."""
    token = "it-readme-st-" + secrets.token_hex(16)
    tokens = tmp_path / "tokens"
    tokens.write_text(token + "\n")
    gw = make_gateway(
        "--tokens-file", str(tokens), "--max-sandboxes", "3", "--agent-ready-timeout", "20"
    )
    code = special_block("schemathesis").code
    assert "--max-examples 20" in code
    code = at_gateway(code, gw).replace(
        "--max-examples 20", "--max-examples 1 --seed 19 --request-timeout 60"
    )
    code = code.replace(".venv/bin/st", str(VENV_BIN / "st"))
    try:
        out = run_shell(code, tmp_path, example_env(gw, TOKEN=token), timeout=480).stdout
    finally:
        listing = requests.get(gw.url + "/sandboxes", headers=auth(token), timeout=30)
        for sandbox in listing.json():
            requests.delete(
                f"{gw.url}/sandboxes/{sandbox['sandbox_id']}", headers=auth(token), timeout=60
            )
    assert " passed" in out, out[-4000:]


# -- Templates: the Dockerfile, docker build and ./start.sh --template ------------------------


def start_sh_instance(port: int, tmp_path: Path) -> tuple[str, str]:
    """What replaces ``./start.sh`` (and its port) in a README example: this checkout's
    start.sh on a free port, with an instance and a state directory of the test's own."""
    instance = f"it-readme-{secrets.token_hex(4)}"
    args = f"{REPO}/start.sh {port} --instance {instance} --state-dir {tmp_path / 'state'}"
    return instance, args


def start_sh_env() -> dict[str, str]:
    """start.sh's environment: as a user has it (no PYTHONPATH), the image under test, and no
    templates of build.sh's (this machine's CI builds them before the tests; not needed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SANDBOX_TEMPLATES"] = "none"
    return env


def stop_session(process: subprocess.Popen[Any]) -> None:
    """Stop a process group this test started (by its id) and wait for its leader."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_healthy(port: int, process: subprocess.Popen[Any], log: Path, timeout: float) -> None:
    """Wait until the gateway on ``port`` says it is ready (its sandbox routes answer)."""

    def up() -> bool:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return health.ok and bool(health.json().get("ready", True))
        except requests.RequestException:
            return False

    try:
        wait_for(up, timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(log.read_text(errors="replace")[-3000:]) from None


@pytest.fixture
def template_tag(docker_client: Any) -> Iterator[str]:
    """A test-owned image name for the README's template; removed afterwards."""
    tag = f"twistedgw-it-readme-{secrets.token_hex(4)}"
    yield tag
    try:
        docker_client.images.remove(tag, force=True)
    except docker.errors.ImageNotFound:
        pass


def test_readme_template_example(docker_client: Any, template_tag: str, tmp_path: Path) -> None:
    """The template recipe as a user follows it: the Dockerfile block saved as the path its
    first line names, then the bash block (docker build, ./start.sh --template mine=...)
    with a test-owned tag (FROM the image under test) and start.sh on a free port: a sandbox
    of template "mine" runs `sqlite3 --version`."""
    dockerfile = special_block("dockerfile").code
    first = dockerfile.splitlines()[0]
    assert first == "# my-template/Dockerfile"
    (tmp_path / "my-template").mkdir()
    (tmp_path / "my-template" / "Dockerfile").write_text(dockerfile + "\n")
    port = free_port()
    instance, start = start_sh_instance(port, tmp_path)
    code = special_block("template").code
    assert "docker build -t my-template " in code and "./start.sh " in code
    code = (
        code.replace("-t my-template ", f"-t {template_tag} --build-arg BASE_IMAGE={IMAGE} ")
        .replace("mine=my-template", f"mine={template_tag}")
        .replace("./start.sh", start)
    )
    log = tmp_path / "example.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", code],
            cwd=tmp_path,
            env=start_sh_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_healthy(port, process, log, timeout=600)
        gw_url = f"http://127.0.0.1:{port}"
        created = requests.post(gw_url + "/sandboxes", json={"template": "mine"}, timeout=120)
        assert created.status_code == 200, created.text
        sandbox_id = created.json()["sandbox_id"]
        with connect(f"ws://127.0.0.1:{port}/ws/{sandbox_id}") as ws:
            result = run(ws, "sqlite3 --version")
        assert result["returncode"] == 0 and result["output"].startswith("3."), result
    finally:
        stop_session(process)
        remove_instance_containers(docker_client, instance)


# -- Metrics: the scrape configuration and the five queries ----------------------------------


def test_readme_scrape_config_and_queries(
    token_gateway: tuple[GatewayProcess, str, int],
) -> None:
    """The scrape configuration (its port 9464 being the gateway's --metrics-port) scrapes a
    live gateway's exposition at its target and metrics path; and every metric the five
    PromQL queries (and the pool one below them) name is in that exposition, with the labels
    they group or filter by, after a create and a command."""
    gw, token, metrics_port = token_gateway
    config = yaml.safe_load(special_block("scrape-config").code.replace("9464", str(metrics_port)))
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "twistedgw"
    ((target,),) = [c["targets"] for c in job["static_configs"]]
    assert target == f"127.0.0.1:{metrics_port}"
    scheme, path = job.get("scheme", "http"), job.get("metrics_path", "/metrics")
    sandbox_id = gw.create(headers=auth(token))
    with connect(f"{gw.ws_url}/ws/{sandbox_id}", additional_headers=auth(token)) as ws:
        assert run(ws, "true")["returncode"] == 0
    scraped = requests.get(f"{scheme}://{target}{path}", timeout=30)  # as Prometheus would
    assert scraped.status_code == 200, scraped.text
    samples: dict[str, set[str]] = {}  # sample name -> the label names its samples carry
    for family in text_string_to_metric_families(scraped.text):
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
        }.get(family.type, ("",))
        for suffix in suffixes:
            samples.setdefault(family.name + suffix, set())
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    readme = (REPO / "README.md").read_text()
    pool_query = re.search(r"`(sum\(twistedgw_pool_ready\) == 0)`", readme)
    assert pool_query
    queries = special_block("promql").code + "\n" + pool_query.group(1)
    names = set(re.findall(r"\btwistedgw_[a-z_]+", queries))
    assert len(names) >= 5
    assert names <= set(samples), names - set(samples)
    # The labels the queries use, on the metrics that have samples after a create and a
    # command (the error counter has none on a healthy engine).
    create = samples["twistedgw_sandbox_create_duration_seconds_bucket"]
    assert {"le", "path", "outcome"} <= create
    assert "outcome" in samples["twistedgw_commands_finished_total"]
    requests.delete(f"{gw.url}/sandboxes/{sandbox_id}", headers=auth(token), timeout=60)


# -- Logs: --log-format json | jq ------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_readme_json_log_example(docker_client: Any, tmp_path: Path) -> None:
    """The `./start.sh 8003 --log-format json | jq` line with start.sh on a free port: after a
    few requests and the gateway's SIGTERM, jq has written one JSON object per line, each an
    access line or above info, and the access lines of those requests are among them."""
    port = free_port()
    instance, start = start_sh_instance(port, tmp_path)
    code = special_block("json-log").code
    assert code.startswith("./start.sh 8003 ")
    code = code.replace("./start.sh 8003", start)
    out_path, log = tmp_path / "jq.out", tmp_path / "stderr.log"
    with out_path.open("wb") as out, log.open("wb") as err:
        process = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", code],
            cwd=tmp_path,
            env=start_sh_env(),
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        wait_healthy(port, process, log, timeout=240)
        gw_url = f"http://127.0.0.1:{port}"
        assert requests.get(gw_url + "/sandboxes", timeout=30).status_code == 200
        assert requests.get(gw_url + "/sandboxes/nope", timeout=30).status_code == 404
        # SIGTERM to the gateway alone (start.sh exec'd twistd), so that jq sees the end of
        # its input and flushes what it holds.
        (gateway_pid,) = [
            pid
            for pid in child_pids(process.pid)
            if b"twistd" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        os.kill(gateway_pid, signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        stop_session(process)
        remove_instance_containers(docker_client, instance)
    lines = out_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(r["level"] != "info" or r.get("event") == "access" for r in records)
    access = {(r["method"], r["path"], r["status"]) for r in records if r.get("event") == "access"}
    assert {("GET", "/sandboxes", 200), ("GET", "/sandboxes/nope", 404)} <= access, records
