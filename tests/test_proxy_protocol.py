"""The gateway answers every client message per PROTOCOL.md (in memory, fake agent on loopback).

Each test waits for the reply with a deadline, so a message that gets no answer fails the test
instead of hanging it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from tests.proxygw import Gateway, proxy_gateway
from tests.wsclient import TestClient
from twistedgw.lifecycle.options import settings_from_body

#: Seconds a reply may take before the test calls it missing.
REPLY_DEADLINE = 5.0
SEED_RESULT_FIELDS = {"request_id", "command", "success", "output", "error", "returncode"}


@pytest_twisted.async_yield_fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with proxy_gateway(max_message_size=4 * 1024 * 1024) as gw:
        yield gw


async def reply(client: TestClient) -> Any:
    """The next message from the gateway; fails (TimeoutError) if none comes in time."""
    return await client.messages.get().addTimeout(REPLY_DEADLINE, reactor)


async def open_client(gateway: Gateway) -> TestClient:
    sandbox = await gateway.manager.create()
    return await gateway.client(sandbox.sandbox_id)


@pytest_twisted.ensureDeferred
async def test_lone_surrogate_command_gets_a_json_reply(gateway: Gateway) -> None:
    """``{"command": "echo \\ud800"}`` gets an invalid_command reply (issue 10, defect 3),
    and the connection keeps working."""
    client = await open_client(gateway)
    client.sendMessage(b'{"command": "echo \\ud800", "request_id": "s1"}', isBinary=False)
    error = await reply(client)
    assert (error["error_code"], error["request_id"]) == ("invalid_command", "s1")
    assert error["command"] == "echo \ufffd"
    assert (await client.command("echo after"))["output"] == "after\n"
    assert gateway.agent.received == [
        {
            "command": "echo after",
            "request_id": gateway.agent.received[0]["request_id"],
            "timeout": 900.0,
        }
    ]


@pytest_twisted.ensureDeferred
async def test_lone_surrogate_in_an_extra_field_is_not_forwarded(gateway: Gateway) -> None:
    """An unknown key holding a lone surrogate does not stop the command: it runs, and the
    agent gets only the protocol's fields."""
    client = await open_client(gateway)
    client.sendMessage(b'{"command": "echo ok", "x\\udfff": "\\ud800"}', isBinary=False)
    result = await reply(client)
    assert result["output"] == "ok\n"
    assert set(gateway.agent.received[0]) == {"command", "request_id", "timeout"}


@pytest_twisted.ensureDeferred
async def test_integer_timeout_beyond_float_range_gets_invalid_timeout(gateway: Gateway) -> None:
    """``"timeout": 10**400`` as a JSON integer gets an invalid_timeout reply (issue 11,
    defect 7), not silence."""
    client = await open_client(gateway)
    payload = b'{"command": "echo", "request_id": "t", "timeout": 1' + b"0" * 400 + b"}"
    client.sendMessage(payload, isBinary=False)
    error = await reply(client)
    assert (error["error_code"], error["request_id"]) == ("invalid_timeout", "t")
    assert gateway.agent.received == []


@pytest_twisted.ensureDeferred
async def test_gateway_error_reply_has_the_agents_shape(gateway: Gateway) -> None:
    """A command error made by the gateway has the seed's fields plus duration_ms 0.0 and
    truncated false, the same shape as the agent's (issue 9)."""
    client = await open_client(gateway)
    client.send_json({"command": "sleep 1", "request_id": "over", "timeout": 3601})
    error = await reply(client)
    assert error["error_code"] == "invalid_timeout"
    assert set(error) >= SEED_RESULT_FIELDS | {"type", "timestamp", "error_code"}
    assert (error["type"], error["success"], error["returncode"]) == ("error", False, -1)
    assert (error["duration_ms"], error["truncated"]) == (0.0, False)


@pytest_twisted.ensureDeferred
async def test_error_reply_echoes_only_a_prefix_of_a_huge_command(gateway: Gateway) -> None:
    """An invalid 2 MB command is answered with a 256-character prefix (issue 11, defect 5)."""
    client = await open_client(gateway)
    client.send_json({"command": "x" * (2 * 1024 * 1024) + "\x00", "request_id": "big"})
    error = await reply(client)
    assert error["error_code"] == "invalid_command"
    assert error["command"] == "x" * 256 + "\u2026"
    assert error["command_truncated"] is True


@pytest_twisted.ensureDeferred
async def test_creation_env_and_command_env_follow_one_rule(gateway: Gateway) -> None:
    """A 256-character variable name is accepted at creation and on a command alike (creation
    used to stop at 128); the command forwards it to the agent."""
    name = "V" * 256
    settings = settings_from_body(gateway.manager.policy, {"env": {name: "1"}})
    sandbox = await gateway.manager.create(settings)
    client = await gateway.client(sandbox.sandbox_id)
    client.send_json({"command": "echo env", "env": {name: "2"}})
    assert (await reply(client))["output"] == "env\n"
    assert gateway.agent.received[-1]["env"] == {name: "2"}


@pytest_twisted.ensureDeferred
async def test_a_bug_in_the_gateway_still_gets_an_internal_error_reply(gateway: Gateway) -> None:
    """If handling a message raises, the client gets an ``internal_error`` reply (and the
    failure is logged) instead of silence."""
    client = await open_client(gateway)

    def broken() -> float:
        raise RuntimeError("a bug")

    manager = gateway.manager
    manager.now = broken  # type: ignore[method-assign]
    try:
        client.send_json({"command": "echo x", "request_id": "bug"})
        error = await reply(client)
    finally:
        del manager.now  # back to the class's method
    assert (error["type"], error["error_code"], error["success"]) == (
        "error",
        "internal_error",
        False,
    )
    assert (error["duration_ms"], error["truncated"]) == (0.0, False)
