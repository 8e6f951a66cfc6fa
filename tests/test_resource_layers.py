"""One resource model for templates and per-create resources (issues 17 and 18 together):
server defaults < a template's image labels < the creator's ``cpus``/``memory``/``disk``,
every value within one set of maxima (``--max-cpus``, ``--max-memory``, ``--max-disk``), in
memory over the fake runtime."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python import usage

from twistedgw.config import GatewayConfig
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy
from twistedgw.lifecycle.resources import ResourcePolicy
from twistedgw.lifecycle.templates import TemplateCatalog
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.hardening import ContainerLimits, size_bytes
from twistedgw.runtime.interface import ContainerInfo, ContainerSpec, ImageFacts
from twistedgw.runtime.labels import labels_for, settings_from
from twistedgw.sandbox import ResourceRequest, Resources, SandboxSettings
from twistedgw.tap import Options
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.testing.rest import request
from twistedgw.web.api import GatewayAPI

GIB = 1 << 30
MIB = 1 << 20

#: The operator's --cpus 1 --memory 1g --home-size 256m --tmp-size 128m.
BASE = ContainerLimits(cpus=1.0, memory="1g", home_size="256m", tmp_size="128m")
SERVER = Resources(cpus=1.0, memory=GIB, disk=256 * MIB)
#: --max-cpus 2 --max-memory 2g --max-disk 1g.
MAXIMA = Resources(cpus=2.0, memory=2 * GIB, disk=GIB)
#: The python template's labels (sandbox-image/templates/python/Dockerfile).
PYTHON_LABELS = {
    "org.twistedgw.home-size": "1g",
    "org.twistedgw.tmp-size": "512m",
    "org.twistedgw.memory": "2g",
    "org.twistedgw.exec-tmpfs": "true",
}
#: A template whose labels ask for more than the maxima allow.
GREEDY_LABELS = {
    "org.twistedgw.home-size": "512m",
    "org.twistedgw.tmp-size": "4g",
    "org.twistedgw.memory": "8g",
}


async def _ready(info: ContainerInfo) -> None:
    return None


def make_manager(clock: Clock, pool_sizes: dict[str, int] | None = None) -> SandboxManager:
    runtime = FakeRuntime()
    runtime.images = {
        "gw-default": ImageFacts("sha256:d", 1, "", {}),
        "gw-python": ImageFacts("sha256:p", 1, "", PYTHON_LABELS),
        "gw-greedy": ImageFacts("sha256:g", 1, "", GREEDY_LABELS),
    }
    policy = LifecyclePolicy(
        idle_timeout=100,
        templates=("default", "greedy", "python"),
        resources=ResourcePolicy(defaults=SERVER, maxima=MAXIMA),
    )
    catalog = TemplateCatalog(
        {"default": "gw-default", "python": "gw-python", "greedy": "gw-greedy"},
        base=BASE,
        maxima=MAXIMA,
    )
    return SandboxManager(
        SandboxRegistry(),
        runtime,
        clock,
        wait_ready=_ready,
        policy=policy,
        templates=catalog,
        pool_sizes=pool_sizes,
    )


async def create(treq: StubTreq, body: dict[str, Any]) -> tuple[int, Any]:
    code, _, raw = await request(
        treq,
        "POST",
        "/sandboxes",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    return code, json.loads(raw)


async def details(treq: StubTreq, sandbox_id: str) -> Any:
    code, _, raw = await request(treq, "GET", f"/sandboxes/{sandbox_id}?details=true")
    assert code == 200
    return json.loads(raw)


def spec_of(manager: SandboxManager, sandbox_id: str) -> ContainerSpec:
    runtime = manager.runtime
    assert isinstance(runtime, FakeRuntime)
    return next(spec for spec in runtime.specs if spec.sandbox_id == sandbox_id)


@pytest.mark.parametrize(
    ("body", "shown", "tmp"),
    [
        # server defaults only
        ({}, {"cpus": 1.0, "memory": GIB, "disk": 256 * MIB}, 128 * MIB),
        # the creator over the server's: /tmp keeps the server's proportion (half the home)
        ({"disk": "1g"}, {"cpus": 1.0, "memory": GIB, "disk": GIB}, 512 * MIB),
        # the template's labels over the server's
        ({"template": "python"}, {"cpus": 1.0, "memory": 2 * GIB, "disk": GIB}, 512 * MIB),
        # the creator over the template's: fields left out keep the template's values
        (
            {"template": "python", "memory": "1g"},
            {"cpus": 1.0, "memory": GIB, "disk": GIB},
            512 * MIB,
        ),
        (
            {"template": "python", "cpus": 2, "disk": "512m"},
            {"cpus": 2.0, "memory": 2 * GIB, "disk": 512 * MIB},
            256 * MIB,
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_server_then_template_then_creator(
    clock: Clock, body: dict[str, Any], shown: dict[str, Any], tmp: int
) -> None:
    """Each layer overrides the one before field by field; ``?details=true`` shows the
    template and what the sandbox got, and the container is made with exactly that."""
    manager = make_manager(clock)
    treq = StubTreq(GatewayAPI(manager).resource())
    code, created = await create(treq, body)
    assert code == 200, created
    answer = await details(treq, created["sandbox_id"])
    assert answer["template"] == body.get("template", "default")
    assert answer["resources"] == shown
    limits = spec_of(manager, created["sandbox_id"]).limits
    assert limits is not None
    options = limits.run_options()
    assert options["nano_cpus"] == int(shown["cpus"] * 1e9)
    assert size_bytes(options["mem_limit"]) == shown["memory"]
    assert (size_bytes(limits.home_size), size_bytes(limits.tmp_size)) == (shown["disk"], tmp)
    # The python template's exec tmpfs stays whatever the creator asks.
    assert limits.exec_tmpfs == (body.get("template") == "python")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"template": "python", "memory": "3g"}, ["'memory'", "maximum of 2147483648 bytes (2g)"]),
        ({"template": "python", "disk": "2g"}, ["'disk'", "maximum of 1073741824 bytes (1g)"]),
        ({"template": "python", "cpus": 3}, ["'cpus'", "maximum of 2"]),
        ({"memory": "3g"}, ["'memory'", "(2g)"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_creator_beyond_the_maxima_is_400_whatever_the_template(
    clock: Clock, body: dict[str, Any], words: list[str]
) -> None:
    """The template's larger defaults do not widen what a creator may ask for: beyond the one
    set of maxima is a 400 naming the field and the maximum, and no container is made."""
    manager = make_manager(clock)
    treq = StubTreq(GatewayAPI(manager).resource())
    code, answer = await create(treq, body)
    assert code == 400
    for word in words:
        assert word in answer["error"]
    assert isinstance(manager.runtime, FakeRuntime) and manager.runtime.specs == []


@pytest_twisted.ensureDeferred
async def test_template_labels_beyond_the_maxima_are_capped(clock: Clock) -> None:
    """A template's labels beyond the maxima give the maxima (memory 8g -> 2g, /tmp 4g -> 1g);
    a creator's ``disk`` then scales /tmp, never beyond ``--max-disk``."""
    manager = make_manager(clock)
    treq = StubTreq(GatewayAPI(manager).resource())
    code, created = await create(treq, {"template": "greedy"})
    assert code == 200, created
    answer = await details(treq, created["sandbox_id"])
    assert answer["resources"] == {"cpus": 1.0, "memory": 2 * GIB, "disk": 512 * MIB}
    limits = spec_of(manager, created["sandbox_id"]).limits
    assert limits is not None and limits.tmp_size == str(GIB)
    code, created = await create(treq, {"template": "greedy", "disk": "1g"})
    assert code == 200, created
    limits = spec_of(manager, created["sandbox_id"]).limits
    # 1g home with the template's tmp:home of 2:1 would be a 2g /tmp: capped at --max-disk.
    assert limits is not None and (limits.home_size, limits.tmp_size) == (str(GIB), str(GIB))


@pytest_twisted.ensureDeferred
async def test_templates_listing_and_details_share_one_shape(clock: Clock) -> None:
    """``GET /templates`` shows each template's resources as a create of it gets them, in the
    shape of ``?details=true``'s ``resources``."""
    manager = make_manager(clock)
    treq = StubTreq(GatewayAPI(manager).resource())
    code, _, raw = await request(treq, "GET", "/templates")
    assert code == 200
    listed = {entry["name"]: entry["resources"] for entry in json.loads(raw)}
    for name in ("default", "python", "greedy"):
        code, created = await create(treq, {"template": name})
        assert code == 200, created
        assert (await details(treq, created["sandbox_id"]))["resources"] == listed[name]


@pytest_twisted.ensureDeferred
async def test_pool_serves_its_template_but_never_creator_resources_or_egress(
    clock: Clock,
) -> None:
    """A python create without resources takes a pooled python container (and shows the
    template's resources); with ``cpus``/``memory``/``disk`` or ``egress`` it is made cold,
    with what it asked for."""
    manager = make_manager(clock, pool_sizes={"python": 2})
    manager.startService()
    try:
        await manager.reconcile()
        assert manager.pool_status()["templates"]["python"]["ready"] == 2
        pooled = {sandbox.sandbox_id for sandbox in manager._pool}
        treq = StubTreq(GatewayAPI(manager).resource())

        code, created = await create(treq, {"template": "python"})
        assert code == 200 and created["sandbox_id"] in pooled
        answer = await details(treq, created["sandbox_id"])
        assert answer["resources"] == {"cpus": 1.0, "memory": 2 * GIB, "disk": GIB}

        for body in (
            {"template": "python", "memory": "2g"},
            {"template": "python", "egress": ["pypi.org:443"]},
        ):
            code, created = await create(treq, body)
            assert code == 200, created
            assert created["sandbox_id"] not in pooled, body
        answer = await details(treq, created["sandbox_id"])
        assert answer["template"] == "python" and answer["egress"] == ["pypi.org:443"]
        assert answer["network"] == "none"
    finally:
        await manager.stopService()


def test_what_a_sandbox_got_survives_in_labels_over_the_images() -> None:
    """The container's resource labels (bytes) override the python image's own
    ``org.twistedgw.memory`` (``2g``) that Docker merges into a container's labels, so a
    restarted gateway reads back what the sandbox got."""
    got = Resources(cpus=2.0, memory=GIB, disk=512 * MIB)
    asked = ResourceRequest(cpus=2.0, memory=GIB)
    settings = SandboxSettings(idle_timeout=10.0, template="python", requested=asked, resources=got)
    labels = {**PYTHON_LABELS, **labels_for(ContainerSpec("0" * 32, 1.0, "s", settings), "i")}
    assert settings_from(labels, {}) == settings


@pytest_twisted.ensureDeferred
async def test_idempotency_key_matches_the_request_not_what_it_resolved_to(
    clock: Clock,
) -> None:
    """A retry with the same Idempotency-Key and body gets the same sandbox (its resolved
    resources are not part of the comparison); another ``memory`` is a 422."""
    manager = make_manager(clock)
    treq = StubTreq(GatewayAPI(manager).resource())
    body = {"template": "python", "memory": "1g"}

    async def keyed(body: dict[str, Any]) -> tuple[int, Any]:
        code, _, raw = await request(
            treq,
            "POST",
            "/sandboxes",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Idempotency-Key": "k1"},
        )
        return code, json.loads(raw)

    code, first = await keyed(body)
    assert code == 200, first
    code, again = await keyed(body)
    assert (code, again["sandbox_id"]) == (200, first["sandbox_id"])
    code, other = await keyed({**body, "memory": "2g"})
    assert code == 422, other


def test_one_set_of_maxima_with_room_for_the_python_template() -> None:
    """Unset, --max-memory is 2g and --max-disk 1g (or the server's value if larger);
    --max-home-size is gone; a server default beyond its maximum stops start-up."""
    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
    config = GatewayConfig.from_options(options)
    assert config.resources.maxima == Resources(cpus=1.0, memory=2 * GIB, disk=GIB)
    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--memory", "4g"])
    assert GatewayConfig.from_options(options).resources.maxima.memory == 4 * GIB
    for args in (
        ["--max-home-size", "1g"],
        ["--tmp-size", "2g"],
        ["--max-memory", "512m"],
        ["--home-size", "2g", "--max-disk", "1g"],
    ):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(["--port", "tcp:0:interface=127.0.0.1", *args])
