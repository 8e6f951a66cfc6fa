"""Templates against the real engine (issue 18): the python template works as ``sandbox``, seed
creates keep the default image, unknown templates and missing images are explained, a pool per
template hands out its own containers, and a template built by the README's recipe works."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from websockets.sync.client import connect

from tests.integration.conftest import IMAGE, REPO, GatewayProcess
from tests.integration.helpers import run, wait_for
from twistedgw.runtime.labels import LABEL_INSTANCE, LABEL_SANDBOX_ID, LABEL_TEMPLATE
from twistedgw.testing.process import PYTHON_IMAGE


@pytest.fixture(scope="module")
def python_image(docker_client: Any) -> str:
    try:
        docker_client.images.get(PYTHON_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"these tests need the python template {PYTHON_IMAGE!r}; run sandbox-image/build.sh "
            "(./tests/run.sh does)",
            pytrace=False,
        )
    return PYTHON_IMAGE


def container_of(docker_client: Any, gateway: GatewayProcess, sandbox_id: str) -> Any:
    label = f"{LABEL_SANDBOX_ID}={sandbox_id}"
    (container,) = docker_client.containers.list(all=True, filters={"label": label})
    assert container.labels[LABEL_INSTANCE] == gateway.instance
    return container


def test_python_template_works_as_sandbox(
    make_gateway: Any, docker_client: Any, python_image: str
) -> None:
    """{"template": "python"}: a venv with pip, git and gcc all work as `sandbox` (uid 1000),
    a C program builds and runs, and `pip install --user` installs into the home; the home is
    the template's 1 GiB, and there is no set-id file the default image lacks; the seed create
    beside it gets the default image (without those tools)."""
    gateway: GatewayProcess = make_gateway("--template", f"python={python_image}")
    sandbox_id = gateway.create(json={"template": "python"})
    container = container_of(docker_client, gateway, sandbox_id)
    assert container.attrs["Config"]["Image"] == python_image
    assert container.labels[LABEL_TEMPLATE] == "python"
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "id -u")["output"] == "1000\n"
        venv = run(ws, "python3 -m venv v && v/bin/pip --version", timeout=120)
        assert venv["returncode"] == 0, venv
        assert "/home/sandbox/v/lib/python3" in venv["output"]
        for tool in ("git --version", "gcc --version", "curl --version", "jq --version"):
            result = run(ws, tool)
            assert result["returncode"] == 0, result
        built = run(ws, "printf 'int main(void){return 7;}' > a.c && gcc a.c -o a && ./a")
        assert built["returncode"] == 7, built
        package = (
            "mkdir -p p/hello && echo 'X = 42' > p/hello/__init__.py && printf "
            '\'[project]\\nname = "hello"\\nversion = "1"\\n[build-system]\\nrequires = '
            '["setuptools"]\\nbuild-backend = "setuptools.build_meta"\\n\' > p/pyproject.toml'
            " && pip install --user --no-index --no-build-isolation ./p"
            " && python3 -c 'import hello; print(hello.X)'"
        )
        installed = run(ws, package, timeout=120)
        assert installed["returncode"] == 0, installed
        assert installed["output"].endswith("42\n")
        home = run(ws, "df -k --output=size /home/sandbox | tail -1")["output"]
        assert int(home) == 1024 * 1024
        setid = "find / -xdev -perm /6000 -type f 2>/dev/null | sort"
        python_setid = run(ws, setid)["output"]

    seed = gateway.create()
    assert container_of(docker_client, gateway, seed).attrs["Config"]["Image"] == IMAGE
    with connect(f"{gateway.ws_url}/ws/{seed}") as ws:
        assert run(ws, "command -v git gcc pip3")["returncode"] != 0
        assert python_setid == run(ws, setid)["output"], "no set-id files beyond the default's"


def test_unknown_template_and_missing_image_are_explained(
    make_gateway: Any, python_image: str
) -> None:
    """An unknown template is a 400 listing the known ones; a template whose image is missing
    is a 503 naming the image and how to build it; GET /templates shows both."""
    missing = f"twistedgw-it-missing-{secrets.token_hex(4)}"
    gateway: GatewayProcess = make_gateway(
        "--template", f"python={python_image}", "--template", f"gone={missing}"
    )
    answer = requests.post(gateway.url + "/sandboxes", json={"template": "rust"}, timeout=30)
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "unknown template 'rust'; known templates: default, gone, python"
    }
    answer = requests.post(gateway.url + "/sandboxes", json={"template": "gone"}, timeout=30)
    assert answer.status_code == 503
    assert missing in answer.json()["error"] and "docker build" in answer.json()["error"]

    listing = {t["name"]: t for t in gateway.get("/templates").json()}
    assert listing["default"]["image"] == IMAGE and listing["default"]["present"]
    assert listing["gone"]["present"] is False and listing["gone"]["size"] is None
    python = listing["python"]
    assert python["image"] == python_image and python["size"] > listing["default"]["size"]
    assert re.match(r"\d{4}-\d\d-\d\dT", python["created"])
    assert python["resources"]["disk"] == 1 << 30 and python["exec_tmpfs"] is True


def test_pool_per_template_hands_out_its_own(
    make_gateway: Any, docker_client: Any, python_image: str
) -> None:
    """--pool-size python=1 keeps a started python container; a python create takes it (the
    id was pooled, its image is the template's), and the pool refills; the default template,
    with no pool, creates cold."""
    gateway: GatewayProcess = make_gateway(
        "--template", f"python={python_image}", "--pool-size", "python=1"
    )

    def ready() -> int:
        return int(gateway.get("/healthz").json()["pool"]["templates"]["python"]["ready"])

    wait_for(lambda: ready() == 1, timeout=90)
    label = f"{LABEL_INSTANCE}={gateway.instance}"
    pooled = {
        c.labels[LABEL_SANDBOX_ID]: c.labels[LABEL_TEMPLATE]
        for c in docker_client.containers.list(all=True, filters={"label": label})
    }
    assert list(pooled.values()) == ["python"]
    started = time.monotonic()
    sandbox_id = gateway.create(json={"template": "python"})
    took = time.monotonic() - started
    assert sandbox_id in pooled, "the python create came from the python pool"
    print(f"python pool hand-out: {took * 1000:.1f} ms")  # the figure: bench/, BENCHMARKS.md
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "git --version")["returncode"] == 0
    wait_for(lambda: ready() == 1, timeout=90)
    cold = gateway.create()
    assert cold not in pooled
    assert container_of(docker_client, gateway, cold).attrs["Config"]["Image"] == IMAGE


def readme_recipe() -> str:
    """The Dockerfile of the README's "Your own template" recipe."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- recipe: custom template -->\n```dockerfile\n(.*?)```", text, re.S)
    assert match, "README.md lost its custom template recipe"
    return match.group(1)


@pytest.fixture
def custom_image(docker_client: Any, tmp_path: Path) -> Iterator[str]:
    """The README's recipe, built FROM the image under test; removed afterwards."""
    tag = f"twistedgw-it-custom-{secrets.token_hex(4)}"
    (tmp_path / "Dockerfile").write_text(readme_recipe())
    docker_client.images.build(
        path=str(tmp_path), tag=tag, buildargs={"BASE_IMAGE": IMAGE}, rm=True, timeout=600
    )
    yield tag
    try:
        docker_client.images.remove(tag, force=True)
    except docker.errors.ImageNotFound:
        pass


def test_custom_template_from_the_readme_recipe(
    make_gateway: Any, docker_client: Any, custom_image: str
) -> None:
    """A template built by the README's recipe serves sandboxes: the agent starts, commands
    run as `sandbox` with the added package, on a read-only root, with the recipe's home
    size from its label."""
    gateway: GatewayProcess = make_gateway("--template", f"mine={custom_image}")
    sandbox_id = gateway.create(json={"template": "mine"})
    assert container_of(docker_client, gateway, sandbox_id).attrs["Config"]["Image"] == (
        custom_image
    )
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        assert run(ws, "id -un")["output"] == "sandbox\n"
        sqlite = run(ws, "sqlite3 :memory: 'select 6 * 7'")
        assert sqlite["output"] == "42\n", sqlite
        assert run(ws, "touch /usr/x")["returncode"] != 0  # read-only root
        home = run(ws, "df -k --output=size /home/sandbox | tail -1")["output"]
        assert int(home) == 512 * 1024
