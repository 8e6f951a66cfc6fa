"""The twistd plugin's options and wiring."""

from __future__ import annotations

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
