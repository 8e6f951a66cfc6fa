"""Per-create resources (``cpus``, ``memory``, ``disk``) and the ``egress`` create option
over REST (in memory), and how they reach the container (limits and labels)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python import usage

from twistedgw.config import GatewayConfig
from twistedgw.egress.policy import EgressPolicy, parse_patterns
from twistedgw.lifecycle.errors import InvalidSettings
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.lifecycle.options import LifecyclePolicy
from twistedgw.lifecycle.resources import ResourcePolicy
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.hardening import ContainerLimits
from twistedgw.runtime.interface import ContainerInfo, ContainerSpec
from twistedgw.runtime.labels import labels_for, settings_from
from twistedgw.sandbox import Resources, SandboxSettings
from twistedgw.tap import Options
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.testing.rest import request
from twistedgw.web.api import GatewayAPI

GIB = 1024**3
MIB = 1024**2


async def _ready_at_once(info: ContainerInfo) -> None:
    return None


@pytest.fixture
def treq(clock: Clock) -> StubTreq:
    policy = LifecyclePolicy(
        resources=ResourcePolicy(
            defaults=Resources(cpus=1.0, memory=GIB, disk=256 * MIB),
            maxima=Resources(cpus=4.0, memory=8 * GIB, disk=2 * GIB),
        ),
        egress=EgressPolicy(allow=parse_patterns(["*.example.org"]), max_patterns=2),
    )
    manager = SandboxManager(
        SandboxRegistry(), FakeRuntime(), clock, wait_ready=_ready_at_once, policy=policy
    )
    return StubTreq(GatewayAPI(manager).resource())


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


@pytest_twisted.ensureDeferred
async def test_resources_within_the_maxima_are_taken_and_shown(treq: StubTreq) -> None:
    """cpus, memory and disk within the maxima are accepted; ``?details=true`` shows them
    (unset ones at the server's values); plain GET stays the seed's four fields."""
    code, created = await create(treq, {"cpus": 2, "memory": "4g", "disk": 512 * MIB})
    assert code == 200, created
    shown = await details(treq, created["sandbox_id"])
    assert shown["resources"] == {"cpus": 2.0, "memory": 4 * GIB, "disk": 512 * MIB}
    code, created = await create(treq, {"memory": "2g"})
    assert code == 200
    shown = await details(treq, created["sandbox_id"])
    assert shown["resources"] == {"cpus": 1.0, "memory": 2 * GIB, "disk": 256 * MIB}
    code, _, raw = await request(treq, "GET", f"/sandboxes/{created['sandbox_id']}")
    assert set(json.loads(raw)) == {"sandbox_id", "status", "created_at", "ip_address"}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"cpus": 4.5}, ["'cpus'", "maximum of 4"]),
        ({"memory": "9g"}, ["'memory'", "maximum of 8589934592 bytes (8g)"]),
        ({"disk": "3g"}, ["'disk'", "maximum of 2147483648 bytes (2g)"]),
        ({"cpus": 0}, ["'cpus'"]),
        ({"cpus": True}, ["'cpus'"]),
        ({"memory": "lots"}, ["'memory'"]),
        ({"disk": 1024}, ["'disk'", "at least"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_resources_beyond_a_maximum_are_400_naming_field_and_maximum(
    treq: StubTreq, body: dict[str, Any], words: list[str]
) -> None:
    """Beyond a maximum (or not a valid value): 400 whose message names the field (and the
    maximum)."""
    code, answer = await create(treq, body)
    assert code == 400
    for word in words:
        assert word in answer["error"]


@pytest_twisted.ensureDeferred
async def test_egress_option_is_checked_and_shown(treq: StubTreq) -> None:
    """``egress`` within the server list is accepted (network ``none``, shown under details);
    wider patterns, too many, or with ``network: bridge`` are 400."""
    code, created = await create(treq, {"egress": ["pypi.example.org:443"]})
    assert code == 200, created
    shown = await details(treq, created["sandbox_id"])
    assert shown["egress"] == ["pypi.example.org:443"] and shown["network"] == "none"
    for body in (
        {"egress": ["example.com"]},
        {"egress": ["a.example.org", "b.example.org", "c.example.org"]},
        {"egress": ["a.example.org"], "network": "bridge"},
        {"egress": "a.example.org"},
    ):
        code, answer = await create(treq, body)
        assert code == 400, body
        assert "egress" in answer["error"]


def test_tmp_is_never_smaller_than_one_mebibyte() -> None:
    """A tiny home keeps /tmp (and /var/tmp) at 1 MiB, not at its proportional share (here
    half a MiB); a larger one keeps the proportion."""
    limits = ContainerLimits(home_size="256m", tmp_size="128m")
    tiny = limits.for_resources(Resources(cpus=1.0, memory=GIB, disk=MIB)).run_options()
    assert f"size={MIB}," in tiny["tmpfs"]["/tmp"]
    assert f"size={MIB}," in tiny["tmpfs"]["/var/tmp"]
    small = limits.for_resources(Resources(cpus=1.0, memory=GIB, disk=4 * MIB)).run_options()
    assert f"size={2 * MIB}," in small["tmpfs"]["/tmp"]


def test_resources_become_container_limits_and_labels() -> None:
    """A creator's resources set the container's CPUs, memory and tmpfs sizes (/tmp keeps the
    server's proportion to the home), and survive in labels (gateway restarts)."""
    limits = ContainerLimits(home_size="256m", tmp_size="128m")
    options = limits.for_resources(Resources(cpus=2.5, memory=3 * GIB, disk=GIB)).run_options()
    assert options["nano_cpus"] == 2_500_000_000
    assert options["mem_limit"] == options["memswap_limit"] == str(3 * GIB)
    assert f"size={GIB}," in options["tmpfs"]["/home/sandbox"]
    assert f"size={GIB // 2}," in options["tmpfs"]["/tmp"]
    assert limits.for_resources(None) is limits
    settings = SandboxSettings(
        idle_timeout=10.0,
        network="none",
        egress=("a.example.org:443",),
        resources=Resources(cpus=2.5, memory=3 * GIB, disk=GIB),
    )
    spec = ContainerSpec("0" * 32, 1.0, "secret", settings)
    assert settings_from(labels_for(spec, "default"), {}) == settings


@pytest.mark.parametrize(
    "args",
    [
        ("--max-cpus", "0.5"),
        ("--max-memory", "512m"),
        ("--max-disk", "128m"),
        ("--max-disk", "lots"),
        ("--egress-allow-cidr", "10.0.0.0/33"),
        ("--egress-allow", "exa mple.com"),
        ("--egress-max", "0"),
    ],
)
def test_bad_resource_and_egress_options_are_usage_errors(args: tuple[str, ...]) -> None:
    """Maxima below the server's defaults, bad sizes, ranges or patterns stop start-up."""
    options = Options()
    with pytest.raises(usage.UsageError):
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", *args])


def test_options_become_the_lifecycle_policy() -> None:
    """The operator's options reach the policy that checks creation bodies."""
    options = Options()
    args = ["--max-cpus", "4", "--max-memory", "8g", "--egress-allow", "*.example.org,a.test:8443"]
    options.parseOptions([*args, "--egress-allow-cidr", "10.1.0.0/16", "--egress-max", "5"])
    config = GatewayConfig.from_options(options)
    assert config.resources.maxima == Resources(cpus=4.0, memory=8 * GIB, disk=GIB)
    assert config.resources.defaults == Resources(cpus=1.0, memory=GIB, disk=256 * MIB)
    assert config.egress.max_patterns == 5
    assert [str(p) for p in config.egress.allow or ()] == ["*.example.org", "a.test:8443"]
    assert [str(n) for n in config.egress.allow_cidrs] == ["10.1.0.0/16"]


@pytest.mark.parametrize(
    ("most", "human"),
    [(8 * GIB, "8g"), (1536 * MIB, "1536m"), (3 * MIB + 512 * 1024, "3584k"), (5 * MIB + 1, None)],
)
def test_a_size_over_the_maximum_names_the_maximum_in_bytes_and_units(
    most: int, human: str | None
) -> None:
    """The refusal gives the maximum in bytes and in the largest whole unit (g, m, k, else
    b): what ``--max-memory``/``--max-disk`` were set to, readable."""
    policy = ResourcePolicy(maxima=Resources(cpus=4.0, memory=most, disk=most))
    with pytest.raises(InvalidSettings) as refused:
        policy.from_body({"memory": most + 1024**3})
    expected = human if human is not None else f"{most}b"
    assert str(refused.value) == (
        f"'memory' exceeds the server maximum of {most} bytes ({expected})"
    )
