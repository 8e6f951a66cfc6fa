"""The twistd plugin's options and wiring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IServiceCollection
from twisted.python import usage

from twistedgw.tap import Options, agent_message_limit, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults() -> None:
    """Defaults match the documented ones."""
    options = parse()
    # Without tokens: loopback only (tests/test_secure_defaults.py).
    assert options["port"] == "tcp:8003:interface=127.0.0.1"
    assert options["image"] == "sandbox-websocket-image"
    assert options["idle-timeout"] == 3600.0
    assert options["docker-threads"] == 8
    assert options["default-timeout"] <= options["max-timeout"]


def test_bare_port_becomes_endpoint() -> None:
    """A bare port number is shorthand for tcp:PORT; endpoint strings pass through."""
    assert parse("--port", "8080", "--insecure-no-auth")["port"] == "tcp:8080"
    assert parse("--port", "tcp:0:interface=127.0.0.1")["port"] == "tcp:0:interface=127.0.0.1"


@pytest.mark.parametrize(
    "args",
    [
        ("--idle-timeout", "0"),
        ("--idle-timeout", "soon"),
        ("--docker-threads", "-1"),
        ("--port", "70000"),
        ("--image", ""),
        ("--instance", "a/b"),
        ("--default-timeout", "100", "--max-timeout", "10"),
        ("--max-output", "100", "--output-kill-limit", "10"),
    ],
)
def test_bad_options_are_usage_errors(args: tuple[str, ...]) -> None:
    """Invalid values are refused with a UsageError (twistd prints it and exits)."""
    with pytest.raises(usage.UsageError):
        parse(*args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--idle-timeout", "soon"), "idle-timeout must be a number, not 'soon'"),
        (("--idle-timeout", "0"), "idle-timeout must be greater than 0"),
        (("--idle-timeout", "inf"), "idle-timeout must be greater than 0"),
        (("--docker-threads", "-1"), "docker-threads must be greater than 0"),
        (("--docker-threads", "2.5"), "docker-threads must be a number, not '2.5'"),
        (("--max-lifetime", "-1"), "--max-lifetime must be 0 or more"),
    ],
)
def test_a_bad_number_is_refused_naming_the_option_and_the_rule(
    args: tuple[str, ...], message: str
) -> None:
    """The usage error twistd prints names the option, the value and what it must be."""
    with pytest.raises(usage.UsageError) as refused:
        parse(*args)
    assert message in str(refused.value)


def test_make_service_wires_named_services() -> None:
    """makeService builds the service tree without starting anything."""
    service = makeService(parse("--port", "tcp:0"))
    collection = IServiceCollection(service)
    names = {s.name for s in collection}
    assert {"docker-runtime", "sandbox-manager", "reaper", "http"} <= names
    assert not service.running


def test_agent_leg_admits_a_full_result() -> None:
    """The agent leg accepts a result with both streams at the cap, fully escaped."""
    assert agent_message_limit(1024, 1024 * 1024) >= 12 * 1024 * 1024
    assert agent_message_limit(100 * 1024 * 1024, 1024) == 100 * 1024 * 1024


def named(service: Any, name: str) -> Any:
    return IServiceCollection(service).getServiceNamed(name)


def test_options_reach_the_services_they_configure(tmp_path: Path) -> None:
    """Each operator option lands where it acts: the runtime's image, instance, limits and
    agent settings, the manager's lifecycle policy, pool and state file, and the tokens."""
    tokens = tmp_path / "tokens"
    tokens.write_text("token-alpha-0123456789\n")
    service = makeService(
        parse(
            "--port", "tcp:0:interface=127.0.0.1",
            "--image", "img:test",
            "--instance", "inst-1",
            "--memory", "512m",
            "--cpus", "0.5",
            "--pids-limit", "64",
            "--idle-timeout", "120",
            "--max-idle-timeout", "240",
            "--default-lifetime", "300",
            "--max-lifetime", "600",
            "--max-sandboxes", "7",
            "--pool-size", "2",
            "--state-dir", str(tmp_path / "state"),
            "--tokens-file", str(tokens),
            "--max-output", "2048",
            "--output-kill-limit", "4096",
        )
    )  # fmt: skip
    runtime = named(service, "docker-runtime")
    assert (runtime.image, runtime.instance) == ("img:test", "inst-1")
    assert runtime.limits.memory == "512m"
    assert runtime.limits.cpus == 0.5
    assert runtime.limits.pids == 64
    assert runtime.limits.read_only_root
    assert runtime._agent_env["AGENT_MAX_OUTPUT"] == "2048"
    assert runtime._agent_env["AGENT_KILL_OUTPUT"] == "4096"
    manager = named(service, "sandbox-manager")
    assert manager.runtime is runtime
    policy = manager.policy
    assert (
        policy.idle_timeout,
        policy.max_idle_timeout,
        policy.default_lifetime,
        policy.max_lifetime,
        policy.max_sandboxes,
    ) == (120, 240, 300, 600, 7)
    # --cpus and --memory are also the defaults of per-create resources (issue 17)
    assert policy.resources.defaults.cpus == 0.5
    assert policy.resources.defaults.memory == 512 * 1024 * 1024
    assert manager.pool_size == 2
    assert manager._state.path is not None
    assert manager._state.path.parent == tmp_path / "state"
    site = named(service, "http").factory
    assert site.protocol.policy.authenticator.enabled
    assert site.resource is not None
    assert not service.running


def test_zero_lifetimes_mean_no_limit() -> None:
    """``--default-lifetime 0`` and ``--max-lifetime 0`` (the defaults) set no lifetime."""
    manager = named(makeService(parse("--port", "tcp:0")), "sandbox-manager")
    assert manager.policy.default_lifetime is None
    assert manager.policy.max_lifetime is None
    site = named(makeService(parse("--port", "tcp:0")), "http").factory
    assert not site.protocol.policy.authenticator.enabled
