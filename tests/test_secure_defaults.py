"""Secure defaults: a gateway without API tokens listens on loopback only, and listening
beyond it without tokens needs ``--insecure-no-auth``. Bind checks only: these tests read the
listening socket's address and never connect from another address."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import IServiceCollection
from twisted.python import usage

from twistedgw.config import GatewayConfig
from twistedgw.tap import Options, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


async def listening_address(options: Options) -> Any:
    """Start only the gateway's HTTP listener and return its bound address."""
    http = IServiceCollection(makeService(options)).getServiceNamed("http")
    http.startService()
    try:
        port = await http._waitingForPort
        return port.getHost()
    finally:
        await http.stopService()


@pytest.fixture(autouse=True)
def no_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWISTEDGW_TOKENS", raising=False)


@pytest_twisted.ensureDeferred
async def test_without_tokens_the_gateway_listens_on_loopback_only() -> None:
    """``--port tcp:0`` (no interface) without tokens binds 127.0.0.1, so no non-loopback
    address of this machine reaches it; ``tcp6`` binds ::1."""
    address = await listening_address(parse("--port", "tcp:0"))
    assert address.host == "127.0.0.1"
    assert parse("--port", "0")["port"] == "tcp:0:interface=127.0.0.1"
    assert parse("--port", "tcp6:0")["port"] == r"tcp6:0:interface=\:\:1"
    assert GatewayConfig.from_options(parse("--port", "tcp6:0")).listens_on_loopback_only
    wide = GatewayConfig.from_options(parse("--port", "tcp:0", "--insecure-no-auth"))
    assert not wide.listens_on_loopback_only  # and so the gateway warns


def test_other_interfaces_without_tokens_need_insecure_no_auth() -> None:
    """Naming a non-loopback interface without tokens is a usage error that names the flag;
    loopback interfaces and Unix sockets are fine."""
    for port in (
        "tcp:8003:interface=0.0.0.0",
        r"tcp6:8003:interface=\:\:",
        "tcp:1:interface=10.0.0.1",
    ):
        with pytest.raises(usage.UsageError, match="--insecure-no-auth"):
            parse("--port", port)
    assert parse("--port", "tcp:1:interface=127.0.0.2")["port"] == "tcp:1:interface=127.0.0.2"
    assert parse("--port", "unix:/tmp/x.sock")["port"] == "unix:/tmp/x.sock"


@pytest_twisted.ensureDeferred
async def test_insecure_no_auth_or_tokens_keep_all_interfaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``--insecure-no-auth``, or with tokens, ``tcp:PORT`` listens on all interfaces
    as before."""
    address = await listening_address(parse("--port", "tcp:0", "--insecure-no-auth"))
    assert address.host == "0.0.0.0"
    monkeypatch.setenv("TWISTEDGW_TOKENS", "a-long-enough-token-for-the-test-0123456789")
    assert parse("--port", "tcp:0")["port"] == "tcp:0"
    address = await listening_address(parse("--port", "tcp:0"))
    assert address.host == "0.0.0.0"
