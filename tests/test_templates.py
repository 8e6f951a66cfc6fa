"""Templates (issue 18) over the fake runtime: choosing one per create, the operator's
options, image-label resource defaults within the maxima, per-template warm pools, and the
REST answers (GET /templates, 400 for an unknown template, 503 for a missing image)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python import usage

from twistedgw.config import GatewayConfig
from twistedgw.lifecycle.errors import InvalidSettings
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy, settings_from_body
from twistedgw.lifecycle.resources import DEFAULT_MAXIMA
from twistedgw.lifecycle.templates import TemplateCatalog, limits_for_labels
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.hardening import ContainerLimits
from twistedgw.runtime.interface import ContainerInfo, ContainerSpec, ImageFacts, ImageMissing
from twistedgw.runtime.labels import LABEL_TEMPLATE, labels_for, settings_from
from twistedgw.sandbox import Resources, SandboxSettings
from twistedgw.state import _settings_from_json, _settings_json
from twistedgw.tap import Options
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.testing.rest import request
from twistedgw.web.api import GatewayAPI

PYTHON_LABELS = {
    "org.twistedgw.home-size": "1g",
    "org.twistedgw.tmp-size": "512m",
    "org.twistedgw.memory": "2g",
    "org.twistedgw.exec-tmpfs": "true",
}
BASE = ContainerLimits(memory="1g", home_size="256m", tmp_size="128m")


async def _ready(info: ContainerInfo) -> None:
    return None


def facts(labels: dict[str, str] | None = None) -> ImageFacts:
    return ImageFacts("sha256:1", 600 << 20, "2026-11-26T10:00:00Z", labels or {})


@pytest.fixture
def images() -> dict[str, ImageFacts]:
    """What the fake engine holds: the default image and the python template's."""
    return {"gw-default": facts(), "gw-python": facts(PYTHON_LABELS)}


def make_manager(
    runtime: FakeRuntime, clock: Clock, pool_sizes: dict[str, int] | None = None
) -> SandboxManager:
    templates = {"default": "gw-default", "python": "gw-python", "broken": "gw-missing"}
    return SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        policy=LifecyclePolicy(idle_timeout=100, templates=("default", "broken", "python")),
        templates=TemplateCatalog(templates, base=BASE, maxima=DEFAULT_MAXIMA),
        pool_sizes=pool_sizes,
    )


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


# -- options -------------------------------------------------------------------------------


def test_template_and_pool_options() -> None:
    """--template NAME=IMAGE is repeatable; --pool-size N is the default template's pool and
    NAME=N another template's."""
    options = parse(
        "--template",
        "python=twistedgw-python",
        "--template",
        "data=my/data:1",
        "--pool-size",
        "2",
        "--pool-size",
        "python=3",
    )
    config = GatewayConfig.from_options(options)
    assert config.templates == {"python": "twistedgw-python", "data": "my/data:1"}
    assert config.pool_sizes == {"default": 2, "python": 3}
    assert options["pool-size"] == 2


@pytest.mark.parametrize(
    "args",
    [
        ("--template", "python"),
        ("--template", "Py thon=img"),
        ("--template", "default=img"),
        ("--pool-size", "python=1"),  # no such template
        ("--pool-size", "-1"),
        ("--pool-size", "many"),
        ("--max-memory", "lots"),
    ],
)
def test_bad_template_options_are_refused(args: tuple[str, ...]) -> None:
    """Malformed templates, the default's name, and pools of undeclared templates are
    refused at start-up."""
    with pytest.raises(usage.UsageError):
        parse(*args)


def test_creation_body_template() -> None:
    """Without ``template`` a create gets the default; a known name is kept; an unknown name
    or a non-string is refused with the list of known templates."""
    policy = LifecyclePolicy(templates=("default", "python"))
    assert settings_from_body(policy, {}).template == "default"
    assert settings_from_body(policy, None).template == "default"
    assert settings_from_body(policy, {"template": "python"}).template == "python"
    for bad in ("rust", 7, "", ["python"]):
        with pytest.raises(InvalidSettings, match="known templates: default, python"):
            settings_from_body(policy, {"template": bad})


# -- resource defaults ---------------------------------------------------------------------


def test_image_labels_set_resources_within_the_maxima() -> None:
    """A template's labels replace the operator's sizes and memory, capped by the maxima;
    invalid labels are ignored; exec-tmpfs is opt-in."""
    maxima = Resources(cpus=1.0, memory=4 << 30, disk=768 << 20)
    limits = limits_for_labels(BASE, PYTHON_LABELS, maxima)
    assert (limits.home_size, limits.tmp_size, limits.memory) == (str(768 << 20), "512m", "2g")
    assert limits.exec_tmpfs and limits.cpus == BASE.cpus
    assert limits_for_labels(BASE, {"org.twistedgw.home-size": "huge"}, maxima) == BASE
    assert limits_for_labels(BASE, {}, maxima) == BASE


def test_exec_tmpfs_drops_noexec() -> None:
    """Docker mounts tmpfs noexec unless told exec: only templates that ask get exec."""
    plain = BASE.run_options()["tmpfs"]
    assert not any("exec" in flags for flags in plain.values())
    python = limits_for_labels(BASE, PYTHON_LABELS).run_options()["tmpfs"]
    assert all(",exec," in flags for flags in python.values())
    assert "size=1g" in python["/home/sandbox"]


def test_template_survives_labels_and_state() -> None:
    """A container's template is in its labels (always, even the default) and in the state
    file's record of a pool hand-out."""
    for template in ("default", "python"):
        settings = SandboxSettings(idle_timeout=60, template=template)
        spec = ContainerSpec("a" * 32, 1.0, "secret", settings)
        labels = labels_for(spec, "inst")
        assert labels[LABEL_TEMPLATE] == template
        assert settings_from(labels, {}).template == template
        assert _settings_from_json(_settings_json(settings)).template == template
    assert _settings_from_json({"idle_timeout": 5}).template == "default"


# -- creation ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_uses_the_templates_image_and_limits(
    clock: Clock, images: dict[str, ImageFacts]
) -> None:
    """A python create gets the python image with its labels' limits; a seed create (no
    template) gets the default image and the operator's limits."""
    runtime = FakeRuntime()
    runtime.images = images
    manager = make_manager(runtime, clock)
    python = await manager.create(SandboxSettings(idle_timeout=100, template="python"))
    seed = await manager.create(settings_from_body(manager.policy, None))
    by_id = {spec.sandbox_id: spec for spec in runtime.specs}
    assert by_id[python.sandbox_id].image == "gw-python"
    limits = by_id[python.sandbox_id].limits
    assert limits is not None and limits.home_size == "1g" and limits.exec_tmpfs
    assert by_id[seed.sandbox_id].image == "gw-default"
    assert by_id[seed.sandbox_id].limits == BASE
    assert seed.settings.template == "default" and python.settings.template == "python"


@pytest_twisted.ensureDeferred
async def test_missing_template_image_fails_the_create(
    clock: Clock, images: dict[str, ImageFacts]
) -> None:
    """A template whose image is missing fails with ImageMissing, one the catalog does not
    know with InvalidSettings; neither leaves anything."""
    runtime = FakeRuntime()
    runtime.images = images
    manager = make_manager(runtime, clock)
    with pytest.raises(ImageMissing):
        await manager.create(SandboxSettings(idle_timeout=100, template="broken"))
    with pytest.raises(InvalidSettings, match="known templates: default, broken, python"):
        await manager.create(SandboxSettings(idle_timeout=100, template="undeclared"))
    assert runtime.containers == {} and len(manager.registry) == 0


@pytest_twisted.ensureDeferred
async def test_pool_per_template(clock: Clock, images: dict[str, ImageFacts]) -> None:
    """Each template keeps its own pool: a python create takes a pooled python container, a
    seed create a pooled default one, and each pool refills on its own."""
    runtime = FakeRuntime()
    runtime.images = images
    manager = make_manager(runtime, clock, pool_sizes={"default": 1, "python": 2})
    manager.startService()
    await manager.reconcile()
    status = manager.pool_status()
    assert status["ready"] == 3 and status["size"] == 3
    assert status["templates"]["python"] == {"size": 2, "ready": 2, "filling": 0}
    pooled = {s.sandbox_id: s.settings.template for s in manager._pool}
    python = await manager.create(SandboxSettings(idle_timeout=50, template="python"))
    seed = await manager.create(SandboxSettings(idle_timeout=50))
    assert pooled[python.sandbox_id] == "python" and python.from_pool
    assert pooled[seed.sandbox_id] == "default" and seed.from_pool
    by_id = {spec.sandbox_id: spec for spec in runtime.specs}
    assert by_id[python.sandbox_id].image == "gw-python"
    assert manager.pool_status()["templates"]["python"]["ready"] == 2  # refilled
    await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_pool_of_a_missing_image_backs_off_alone(
    clock: Clock, images: dict[str, ImageFacts]
) -> None:
    """A template pool whose image is missing retries with back-off, without holding up the
    default template's pool."""
    runtime = FakeRuntime()
    runtime.images = images
    manager = make_manager(runtime, clock, pool_sizes={"default": 1, "broken": 1})
    manager.startService()
    await manager.reconcile()
    assert manager.pool_status()["templates"]["default"]["ready"] == 1
    assert "broken" in manager._pool_retry
    await manager.create(SandboxSettings(idle_timeout=50))  # hands out, refills default
    assert manager.pool_status()["templates"]["default"]["ready"] == 1
    await manager.stopService()


# -- REST ----------------------------------------------------------------------------------


async def call(treq: StubTreq, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs = {"data": json.dumps(body), "headers": {"Content-Type": "application/json"}}
    code, _, raw = await request(treq, method, path, **kwargs)
    return code, json.loads(raw)


@pytest_twisted.ensureDeferred
async def test_rest_templates(clock: Clock, images: dict[str, ImageFacts]) -> None:
    """GET /templates lists each template with image, presence, size, build date and its
    resources; an unknown template is a 400 naming the known ones; a missing image a 503."""
    runtime = FakeRuntime()
    runtime.images = images
    manager = make_manager(runtime, clock)
    treq = StubTreq(GatewayAPI(manager).resource())

    code, listing = await call(treq, "GET", "/templates")
    assert code == 200
    assert [t["name"] for t in listing] == ["default", "broken", "python"]
    python = listing[2]
    assert python["image"] == "gw-python" and python["present"] is True
    assert python["size"] == 600 << 20 and python["created"] == "2026-11-26T10:00:00Z"
    assert python["resources"] == {"cpus": 1.0, "memory": 2 << 30, "disk": 1 << 30}
    assert python["tmp_size"] == 512 << 20 and python["exec_tmpfs"] is True
    assert listing[0]["default"] is True and listing[1]["present"] is False

    code, error = await call(treq, "POST", "/sandboxes", {"template": "rust"})
    assert code == 400
    assert error["error"] == "unknown template 'rust'; known templates: default, broken, python"

    code, error = await call(treq, "POST", "/sandboxes", {"template": "broken"})
    assert code == 503 and "not present" in error["error"]

    code, created = await call(treq, "POST", "/sandboxes", {"template": "python"})
    assert code == 200 and set(created) == {"sandbox_id", "status", "message"}
    code, details = await call(treq, "GET", f"/sandboxes/{created['sandbox_id']}?details=true")
    assert details["template"] == "python"
    code, seed = await call(treq, "GET", f"/sandboxes/{created['sandbox_id']}")
    assert "template" not in seed  # the seed's fields, exactly
