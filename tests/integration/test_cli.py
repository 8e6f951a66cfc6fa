"""The ``twistedgw`` CLI as a user runs it: a subprocess of the venv's console script against
a real gateway (``--url``/``TWISTEDGW_URL``), plus ``serve`` starting a gateway itself."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import GatewayProcess, remove_instance_containers
from twistedgw.runtime.labels import LABEL_INSTANCE, LABEL_SANDBOX_ID
from twistedgw.testing.process import IMAGE, free_port, gateway_env

pytestmark = pytest.mark.integration

#: The console script setup.py declares, installed in the venv.
CLI = str(Path(sys.executable).parent / "twistedgw")


def cli(
    *args: str, url: str | None = None, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = gateway_env()
    environ.pop("TWISTEDGW_TOKEN", None)
    if url is not None:
        environ["TWISTEDGW_URL"] = url
    environ.update(env or {})
    return subprocess.run(
        [CLI, *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_create_ls_exec_keepalive_ps_attach_rm(gateway: GatewayProcess) -> None:
    """``create`` (with ``--env``) prints a 32-character id that ``ls`` and ``ls -q`` list;
    ``exec`` keeps stdout, stderr and exit 7 apart, passes argv words and piped stdin, and
    exits 143 for a SIGTERM; ``keepalive`` names the sandbox; ``ps`` lists the piped command,
    ``attach`` to its pid replays its output with status 0; ``rm`` exits 0 and the sandbox is
    404."""
    created = cli("create", "--idle-timeout", "600", "--env", "WHO=cli", url=gateway.url)
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    assert len(sandbox_id) == 32
    try:
        listed = cli("ls", url=gateway.url)
        assert sandbox_id in listed.stdout
        assert sandbox_id in cli("ls", "-q", url=gateway.url).stdout.split()

        run = cli(
            "exec", sandbox_id, "--", 'echo "out $WHO"; echo err >&2; exit 7', url=gateway.url
        )
        assert (run.returncode, run.stdout, run.stderr) == (7, "out cli\n", "err\n")
        argv = cli("exec", sandbox_id, "--", "printf", "%s|", "a b", "c", url=gateway.url)
        assert argv.stdout == "a b|c|" and argv.returncode == 0
        piped = cli("exec", sandbox_id, "--", "tr a-z A-Z", url=gateway.url, stdin="shout\n")
        assert piped.stdout == "SHOUT\n"
        killed = cli("exec", sandbox_id, "--", "kill -TERM $$", url=gateway.url)
        assert killed.returncode == 128 + signal.SIGTERM

        alive = cli("keepalive", sandbox_id, url=gateway.url)
        assert alive.returncode == 0 and sandbox_id in alive.stdout

        ps = cli("ps", sandbox_id, url=gateway.url)
        assert ps.returncode == 0 and "tr a-z A-Z" in ps.stdout
        pid = next(line.split()[0] for line in ps.stdout.splitlines() if "tr a-z A-Z" in line)
        attached = cli("attach", sandbox_id, pid, url=gateway.url)
        assert (attached.returncode, attached.stdout) == (0, "SHOUT\n")
    finally:
        removed = cli("rm", sandbox_id, url=gateway.url)
    assert removed.returncode == 0
    assert gateway.get(f"/sandboxes/{sandbox_id}").status_code == 404


def test_ctrl_c_on_exec_cancels_the_command_in_the_sandbox(gateway: GatewayProcess) -> None:
    """SIGINT to ``exec`` of a running ``sleep 60`` exits 130 with no traceback, and ``ps`` then
    shows the command in the sandbox no longer running, with exit code -9."""
    sandbox_id = gateway.create()
    environ = gateway_env()
    environ["TWISTEDGW_URL"] = gateway.url
    process = subprocess.Popen(
        [CLI, "exec", sandbox_id, "--", "echo started; sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "started\n"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in err
    ps = cli("ps", sandbox_id, url=gateway.url)
    line = next(line for line in ps.stdout.splitlines() if "sleep 60" in line)
    assert "running" not in line and "-9" in line.split()


def test_cp_files_and_directories_both_ways(gateway: GatewayProcess, tmp_path: Path) -> None:
    """``cp`` uploads a 3 MiB file and a directory tree to ``ID:PATH`` (checked in the sandbox)
    and downloads both back intact, leaving no ``.part`` file; a missing remote file is a
    one-line ``no such file`` error and creates nothing locally."""
    sandbox_id = gateway.create()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x.txt").write_text("x\n")

    assert cli("cp", str(big), f"{sandbox_id}:data/big.bin", url=gateway.url).returncode == 0
    assert cli("cp", str(tree), f"{sandbox_id}:tree", url=gateway.url).returncode == 0
    check = cli(
        "exec", sandbox_id, "--", "wc -c < data/big.bin; cat tree/sub/x.txt", url=gateway.url
    )
    assert check.stdout == f"{3 * 1024 * 1024}\nx\n"

    back = tmp_path / "back"
    back.mkdir()
    assert cli("cp", f"{sandbox_id}:data/big.bin", str(back), url=gateway.url).returncode == 0
    assert (back / "big.bin").read_bytes() == big.read_bytes()
    assert not list(back.glob("*.part"))
    assert cli("cp", f"{sandbox_id}:tree", str(back / "t2"), url=gateway.url).returncode == 0
    assert (back / "t2" / "sub" / "x.txt").read_text() == "x\n"

    missing = cli("cp", f"{sandbox_id}:nope.txt", str(back), url=gateway.url)
    assert_one_line_error(missing, "no such file")
    assert not (back / "nope.txt").exists()


def test_errors_are_one_line_without_a_traceback(
    gateway: GatewayProcess, make_gateway: Any, tmp_path: Path
) -> None:
    """A non-zero status and one stderr line without a traceback for: an unreachable gateway
    (``ls``, ``exec``), an unknown sandbox (``exec``, ``keepalive``, ``rm``), a refused
    ``--memory``, and a wrong ``$TWISTEDGW_TOKEN`` (401); the right ``--token`` works."""
    down = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(cli("ls", url=down), "cannot reach the gateway")
    assert_one_line_error(cli("exec", "0" * 32, "--", "true", url=down), "cannot reach")
    unknown = "0" * 32
    assert_one_line_error(cli("exec", unknown, "--", "true", url=gateway.url), "not found")
    assert_one_line_error(cli("keepalive", unknown, url=gateway.url), "not found")
    assert_one_line_error(cli("rm", unknown, url=gateway.url), "not found")
    assert_one_line_error(cli("create", "--memory", "64g", url=gateway.url), "memory")

    tokens = tmp_path / "tokens"
    tokens.write_text("the-right-token-0123456789\n")
    guarded = make_gateway("--tokens-file", str(tokens))
    wrong = cli("ls", url=guarded.url, env={"TWISTEDGW_TOKEN": "not-the-token-0123456789"})
    assert_one_line_error(wrong, "401")
    right = cli("--token", "the-right-token-0123456789", "ls", "-q", url=guarded.url)
    assert right.returncode == 0, right.stderr


def test_serve_runs_the_gateway_plugin_on_the_given_port_and_instance(
    docker_client: Any, tmp_path: Path
) -> None:
    """``twistedgw serve`` starts a gateway that becomes ready on the given ``--port``; a sandbox
    created through it gets a container labelled with the given ``--instance``; SIGTERM
    stops it with status 0."""
    port = free_port()
    instance = f"it-{secrets.token_hex(4)}"
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            CLI,
            "serve",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--instance",
            instance,
            "--image",
            IMAGE,
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=gateway_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                if health.status_code == 200 and health.json().get("ready"):
                    break
            except requests.RequestException:
                pass
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "twistedgw serve never answered"
            time.sleep(0.2)
        sandbox_id = cli("create", url=f"http://127.0.0.1:{port}").stdout.strip()
        container = docker_client.containers.list(
            filters={"label": f"{LABEL_SANDBOX_ID}={sandbox_id}"}
        )
        assert container and container[0].labels[LABEL_INSTANCE] == instance
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        log.close()
        remove_instance_containers(docker_client, instance)
