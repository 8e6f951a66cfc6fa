"""The WebSocket proxy over loopback, against a fake agent speaking the agent protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.proxygw import Gateway, proxy_gateway
from twistedgw import protocol
from twistedgw.lifecycle.options import settings_from_body
from twistedgw.proxy.client import finished_request


@pytest_twisted.async_yield_fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with proxy_gateway(max_message_size=64 * 1024) as gw:
        yield gw


@pytest_twisted.ensureDeferred
async def test_command_round_trip_and_request_id(gateway: Gateway) -> None:
    """A command reaches the agent with a request_id; the result comes back unchanged."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    result = await client.command("echo hi", request_id="r1")
    assert result["request_id"] == "r1"
    assert result["output"] == "hi\n"
    assert result["success"] is True
    result = await client.command("echo again")
    assert len(result["request_id"]) == 32
    assert gateway.agent.received[-1]["request_id"] == result["request_id"]


@pytest_twisted.ensureDeferred
async def test_concurrent_commands_pair_by_request_id(gateway: Gateway) -> None:
    """Several commands in flight on one connection each get their own result."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    client.send_json({"command": "sleep 0.2", "request_id": "slow"})
    client.send_json({"command": "echo fast", "request_id": "fast"})
    first = await client.messages.get()
    second = await client.messages.get()
    assert (first["request_id"], second["request_id"]) == ("fast", "slow")


@pytest_twisted.ensureDeferred
async def test_bad_messages_get_errors_and_connection_stays(gateway: Gateway) -> None:
    """Malformed JSON, a missing command and binary frames get error results; then it works."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    client.sendMessage(b"{nope", isBinary=False)
    error = await client.messages.get()
    assert error["success"] is False and error["error_code"] == "invalid_json"
    assert set(error) >= {"request_id", "command", "output", "error", "returncode", "timestamp"}
    client.send_json({"request_id": "x"})
    error = await client.messages.get()
    assert (error["error_code"], error["request_id"]) == ("missing_command", "x")
    client.sendMessage(b'{"command": "echo hi"}', isBinary=True)
    error = await client.messages.get()
    assert error["error_code"] == "binary_message"
    result = await client.command("echo still here")
    assert result["output"] == "still here\n"
    assert gateway.agent.received == [
        {"command": "echo still here", "request_id": result["request_id"], "timeout": 900.0}
    ]


@pytest_twisted.ensureDeferred
async def test_terminal_frames_pass_the_proxy_both_ways_and_other_binary_is_refused(
    gateway: Gateway,
) -> None:
    """A terminal input frame (PTYs, opt-in) goes to the agent as a binary frame, and the
    agent's binary output frame comes back as one; a binary frame that is not terminal input
    gets ``binary_message`` and never reaches the agent."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    frame = protocol.BINARY_STDIN_HEAD.pack(protocol.BINARY_STDIN, 42) + b"\x03ls\r\xff"
    client.sendMessage(frame, isBinary=True)
    assert await client.messages.get() == protocol.binary_output_frame(42, 0, b"\x03ls\r\xff")
    assert gateway.agent.factory.received_binary == [frame]
    for bad in (b"\x02\x00\x00", b"\x01" + bytes(12)):
        client.sendMessage(bad, isBinary=True)
        error = await client.messages.get()
        assert error["error_code"] == "binary_message"
    assert gateway.agent.factory.received_binary == [frame]
    assert gateway.agent.received == []


@pytest_twisted.ensureDeferred
async def test_status_connected_then_idle(gateway: Gateway) -> None:
    """Status is connected while any client is attached and idle after the last leaves."""
    sandbox = await gateway.manager.create()
    assert sandbox.status == "idle"
    a = await gateway.client(sandbox.sandbox_id)
    b = await gateway.client(sandbox.sandbox_id)
    assert sandbox.status == "connected"
    a.sendClose(1000)
    await a.closed
    assert sandbox.status == "connected"
    b.sendClose(1000)
    await b.closed
    await _settle()
    assert sandbox.status == "idle"
    assert sandbox.sandbox_id in gateway.manager.registry
    assert gateway.runtime.removed == []


@pytest_twisted.ensureDeferred
async def test_unknown_sandbox_handshake_refused(gateway: Gateway) -> None:
    """A WebSocket to an unknown sandbox never opens."""
    with pytest.raises(ConnectionError):
        await gateway.client("0" * 32)


@pytest_twisted.ensureDeferred
async def test_agent_death_closes_client_with_reason() -> None:
    """If the agent connection drops and the agent does not come back (container died), the
    command in flight gets an error reply, then the client gets 1011 and a reason (after a
    recovery wait of 0.3 s, not the fixture's 3 s: the wait is real time)."""
    async with proxy_gateway(64 * 1024, agent_recovery_timeout=0.3) as gateway:
        await _agent_death_closes_client_with_reason(gateway)


async def _agent_death_closes_client_with_reason(gateway: Gateway) -> None:
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    client.send_json({"command": "sleep 10", "request_id": "slow"})
    await _until(lambda: any(m.get("request_id") == "slow" for m in gateway.agent.received))
    await gateway.agent.vanish()
    reply = await client.messages.get()
    assert (reply["request_id"], reply["command"]) == ("slow", "sleep 10")
    assert (reply["success"], reply["error_code"]) == (False, "agent_unavailable")
    code, reason = await client.closed
    assert code == 1011
    assert reason is not None and "agent" in reason
    await _settle()
    assert sandbox.status == "idle"
    assert sandbox.agent_restarts == 0


@pytest_twisted.ensureDeferred
async def test_agent_restart_is_reported_then_client_closed_4001(gateway: Gateway) -> None:
    """The agent dies and its supervisor brings it back: the command in flight gets an
    ``agent_restarted`` error, an ``agent_restarted`` message lists the lost request and
    session, and the client is closed with 4001; a new client works at once, and the first
    command for the lost session is told ``session_lost`` instead of silently getting a new
    shell."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    assert (await client.command("echo hi", session="main"))["output"] == "hi\n"
    client.send_json({"command": "sleep 10", "request_id": "slow"})
    await _until(lambda: any(m.get("request_id") == "slow" for m in gateway.agent.received))
    gateway.agent.restart()
    reply = await client.messages.get()
    assert (reply["type"], reply["request_id"], reply["error_code"]) == (
        "error",
        "slow",
        "agent_restarted",
    )
    assert reply["success"] is False and reply["command"] == "sleep 10"
    notice = await client.messages.get()
    assert notice["type"] == "agent_restarted"
    assert (notice["lost_requests"], notice["lost_sessions"]) == (["slow"], ["main"])
    assert await client.closed == (4001, "sandbox agent restarted: reconnect")
    assert sandbox.agent_restarts == 1 and sandbox.lost_sessions == {"main"}

    again = await gateway.client(sandbox.sandbox_id)
    lost = await again.command("echo back", session="main")
    assert (lost["error_code"], lost["success"]) == ("session_lost", False)
    assert "main" in lost["error"]
    assert (await again.command("echo back", session="main"))["output"] == "back\n"
    assert (await again.command("echo plain"))["output"] == "plain\n"
    assert sandbox.lost_sessions == set()


@pytest_twisted.ensureDeferred
async def test_client_arriving_during_a_restart_waits_for_the_agent(gateway: Gateway) -> None:
    """A handshake that finds the agent down while it restarts waits for it (instead of 503)
    and is served once it is back."""
    from twisted.internet.task import deferLater

    sandbox = await gateway.manager.create()
    await gateway.agent.vanish()
    deferLater(reactor, 0.3, lambda: None).addCallback(lambda _: gateway.agent.come_back(reactor))
    client = await gateway.client(sandbox.sandbox_id)
    assert (await client.command("echo served"))["output"] == "served\n"
    assert sandbox.agent_restarts == 1


@pytest_twisted.ensureDeferred
async def test_finished_commands_are_not_reported_lost(gateway: Gateway) -> None:
    """Only commands whose result has not come back are reported after a restart."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    assert (await client.command("echo done", request_id="done"))["output"] == "done\n"
    gateway.agent.restart()
    notice = await client.messages.get()
    assert notice == {**notice, "type": "agent_restarted", "lost_requests": []}
    assert (await client.closed)[0] == 4001


def test_finished_request_reads_results_but_not_output_or_control_replies() -> None:
    """The in-flight bookkeeping ends a command on its result or error reply only."""
    import json

    def encoded(message: dict[str, Any]) -> bytes:
        return json.dumps(message, ensure_ascii=False).encode()

    big = "x" * 100_000
    assert finished_request(
        encoded({"type": "result", "request_id": 'a"\u00e9', "command": big})
    ) == ('a"\u00e9')
    assert finished_request(encoded({"type": "result", "request_id": "a", "command": "c"})) == "a"
    assert finished_request(encoded({"request_id": "seed", "command": "c"})) == "seed"
    error = {"type": "error", "request_id": "e", "command": "c", "error_code": "spawn_failed"}
    assert finished_request(encoded(error)) == "e"
    control = {"type": "error", "request_id": "e", "error": "x", "error_code": "stdin_closed"}
    assert finished_request(encoded(control)) is None
    chunk = {"type": "output", "request_id": "a", "stream": "stdout", "data": "x"}
    assert finished_request(encoded(chunk)) is None
    listing = {"type": "sessions", "request_id": "a", "sessions": []}
    assert finished_request(encoded(listing)) is None
    assert finished_request(b"not json") is None


def test_a_yielded_answer_ends_a_command_but_started_does_not() -> None:
    """``yield_after``: ``yielded`` is the last message about the command on its connection;
    ``started`` (``ack``) comes before its result (issue 14)."""
    from twistedgw import protocol

    offset = {"stdout": 3, "stderr": 0}
    yielded = protocol.yielded_message("y", 42, "ab\n", "", offset)
    assert finished_request(protocol.encode(yielded)) == "y"
    assert finished_request(protocol.encode(protocol.started_message("y", 42))) is None


@pytest_twisted.ensureDeferred
async def test_delete_closes_attached_clients(gateway: Gateway) -> None:
    """Deleting a connected sandbox closes its clients with code 4000 and says why."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    await gateway.manager.delete(sandbox.sandbox_id)
    code, reason = await client.closed
    assert code == 4000
    assert reason == "sandbox deleted"


@pytest_twisted.ensureDeferred
async def test_shutdown_closes_with_going_away(gateway: Gateway) -> None:
    """close_all (used on shutdown) closes clients with 1001."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    gateway.factory.close_all(1001, "gateway shutting down")
    code, reason = await client.closed
    assert (code, reason) == (1001, "gateway shutting down")


@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_1009(gateway: Gateway) -> None:
    """A message over the size limit closes the connection with 1009."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    client.send_json({"command": "echo " + "x" * 100_000})
    code, _ = await client.closed
    assert code == 1009


async def _settle() -> Any:
    """Let the reactor run pending close callbacks."""
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.05, lambda: None)


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    """Let the reactor run until ``predicate()`` holds."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await _settle_briefly()
    raise AssertionError("condition not reached in time")


async def _settle_briefly() -> Any:
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_handshake_checks_token_and_owner(gateway: Gateway) -> None:
    """With tokens, the WebSocket handshake needs the owner's token (header or query)."""
    from twistedgw.web.auth import Authenticator, owner_id

    alpha, bravo = "token-alpha-0123456789", "token-bravo-0123456789"
    gateway.factory.authenticator = Authenticator.from_tokens([alpha, bravo])
    settings = settings_from_body(gateway.manager.policy, None, owner=owner_id(alpha))
    sandbox = await gateway.manager.create(settings)
    with pytest.raises(ConnectionError):
        await gateway.client(sandbox.sandbox_id)
    with pytest.raises(ConnectionError):
        await gateway.client(f"{sandbox.sandbox_id}?access_token={bravo}")
    client = await gateway.client(f"{sandbox.sandbox_id}?access_token={alpha}")
    assert (await client.command("echo ok"))["output"] == "ok\n"


@pytest_twisted.ensureDeferred
async def test_partial_messages_of_all_clients_are_bounded(gateway: Gateway) -> None:
    """Partial messages count against one budget for all clients together: the client whose
    fragment passes it is closed with 1013, and its bytes are released."""
    gateway.factory.max_buffered = 40_000
    sandbox = await gateway.manager.create()
    first = await gateway.client(sandbox.sandbox_id)
    second = await gateway.client(sandbox.sandbox_id)
    first.beginMessage(isBinary=False)
    first.sendMessageFrame(b'{"command": "echo ' + b"a" * 30_000, sync=True)
    await _settle()
    assert gateway.factory.buffered >= 30_000
    second.beginMessage(isBinary=False)
    second.sendMessageFrame(b'{"command": "echo ' + b"b" * 20_000, sync=True)
    code, reason = await second.closed
    assert code == 1013 and reason is not None and "busy" in reason
    first.sendMessageFrame(b'"}', sync=True)
    first.endMessage()
    assert (await first.messages.get())["output"].startswith("a")
    assert gateway.factory.buffered == 0


@pytest_twisted.ensureDeferred
async def test_a_background_command_is_forwarded_and_not_reported_lost(gateway: Gateway) -> None:
    """``background`` reaches the agent; its result is not this connection's, so an agent
    restart does not list it among the lost requests (issue 14)."""
    sandbox = await gateway.manager.create()
    client = await gateway.client(sandbox.sandbox_id)
    client.send_json({"command": "sleep 5", "request_id": "bg", "background": True})
    client.send_json({"command": "sleep 5", "request_id": "fg", "yield_after": 2})
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.2, lambda: None)
    sent = {m["request_id"]: m for m in gateway.agent.received if "request_id" in m}
    assert sent["bg"]["background"] is True and sent["fg"]["yield_after"] == 2.0
    gateway.agent.restart()
    notice = await client.messages.get()
    while notice.get("type") != "agent_restarted":
        notice = await client.messages.get()
    assert notice["lost_requests"] == ["fg"]
