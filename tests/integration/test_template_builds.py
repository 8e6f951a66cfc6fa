"""Building templates (issue 18): on an unchanged tree ``./start.sh`` rebuilds nothing and
serves the python template; a change in a template's directory rebuilds that template only."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import IMAGE, REPO, remove_instance_containers
from twistedgw.testing.process import PYTHON_IMAGE, free_port


def image_id(docker_client: Any, name: str) -> str:
    return str(docker_client.images.get(name).id)


def test_second_start_rebuilds_nothing_and_serves_python(
    docker_client: Any, tmp_path: Path
) -> None:
    """./start.sh on a tree whose images are built: build.sh reports both images up to date
    and runs no docker build, the image ids stay, and the gateway serves `python`."""
    before = {name: image_id(docker_client, name) for name in (IMAGE, PYTHON_IMAGE)}
    port = free_port()
    instance = f"it-start-{secrets.token_hex(4)}"
    log = tmp_path / "start.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(REPO / "start.sh"),
                str(port),
                "--instance",
                instance,
                "--state-dir",
                str(tmp_path / "state"),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        up = False
        while not up and time.monotonic() < deadline and process.poll() is None:
            try:
                up = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok
            except requests.RequestException:
                time.sleep(0.2)
        text = log.read_text(errors="replace")
        assert up, text[-3000:]
        templates = requests.get(f"http://127.0.0.1:{port}/templates", timeout=30).json()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        remove_instance_containers(docker_client, instance)
    assert f"image up to date: {IMAGE}" in text
    assert f"template python up to date: {PYTHON_IMAGE}" in text
    assert "docker build" not in text
    assert {name: image_id(docker_client, name) for name in before} == before
    assert {t["name"]: t["image"] for t in templates} == {
        "default": IMAGE,
        "python": PYTHON_IMAGE,
    }


@pytest.fixture
def scratch_prefix(docker_client: Any) -> Any:
    """A template image prefix of this test's own; its images are removed afterwards."""
    prefix = f"twistedgw-it-{secrets.token_hex(4)}-"
    yield prefix
    for image in docker_client.images.list():
        for tag in image.tags:
            if tag.startswith(prefix):
                docker_client.images.remove(tag, force=True)


def test_a_template_change_rebuilds_that_template_once(
    docker_client: Any, tmp_path: Path, scratch_prefix: str
) -> None:
    """In a copy of the tree with a file added to templates/python/, build.sh keeps the
    default image (its hash is unchanged), builds the template under its own name, and a
    second run builds nothing."""
    shutil.copytree(REPO / "sandbox-image", tmp_path / "sandbox-image")
    (tmp_path / "twistedgw").mkdir()
    shutil.copy(REPO / "twistedgw" / "protocol.py", tmp_path / "twistedgw" / "protocol.py")
    (tmp_path / "sandbox-image" / "templates" / "python" / "NOTES").write_text("changed\n")
    env = {
        **os.environ,
        "SANDBOX_IMAGE": IMAGE,
        "TEMPLATE_IMAGE_PREFIX": scratch_prefix,
        "SANDBOX_TEMPLATES": "python",
    }
    build = [str(tmp_path / "sandbox-image" / "build.sh")]
    default_before = image_id(docker_client, IMAGE)

    first = subprocess.run(build, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"image up to date: {IMAGE}" in first.stderr
    assert f"built template python as {scratch_prefix}python" in first.stderr
    assert image_id(docker_client, IMAGE) == default_before
    built = docker_client.images.get(f"{scratch_prefix}python")
    official = docker_client.images.get(PYTHON_IMAGE)
    assert built.labels["org.twistedgw.image-hash"] != official.labels["org.twistedgw.image-hash"]

    second = subprocess.run(build, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"template python up to date: {scratch_prefix}python" in second.stderr
    assert "docker build" not in second.stderr
    assert image_id(docker_client, f"{scratch_prefix}python") == built.id
