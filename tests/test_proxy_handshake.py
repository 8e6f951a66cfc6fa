"""The proxy's two handshakes, in memory: a client's WebSocket upgrade (``ClientSide._accept``:
who is refused with which status and reason) and the gateway's connection to an agent
(``connect_agent``: URL, secret, options, failures), and the agent listings
(``list_sessions``, ``list_processes``)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twistedgw.agents import AgentUnavailable
from twistedgw.lifecycle.errors import SandboxNotFound
from twistedgw.proxy.agent import AgentSide, connect_agent, list_processes, list_sessions
from twistedgw.proxy.client import ClientSide
from twistedgw.web.auth import Authenticator, owner_id

TOKEN = "token-alpha-0123456789"
SANDBOX = "a" * 32


class FakeSandbox:
    sandbox_id = SANDBOX


class FakeManager:
    def __init__(self, agent: Deferred[Any] | None = None) -> None:
        self.registry: dict[str, Any] = {SANDBOX: FakeSandbox()}
        self.lookups: list[tuple[str, str | None]] = []
        self.agent = agent

    def lookup(self, sandbox_id: str, owner: str | None = None) -> Any:
        self.lookups.append((sandbox_id, owner))
        if sandbox_id not in self.registry:
            raise SandboxNotFound(sandbox_id)
        return self.registry[sandbox_id]

    def open_agent(self, sandbox: Any) -> Deferred[Any]:
        assert self.agent is not None
        return self.agent


class FakeFactory:
    def __init__(self, manager: FakeManager, tokens: list[str]) -> None:
        self.manager = manager
        self.authenticator = Authenticator.from_tokens(tokens)


def accept(
    manager: FakeManager,
    path: str,
    tokens: list[str] = [],  # noqa: B006 - never mutated
    headers: dict[str, str] | None = None,
    params: dict[str, list[str]] | None = None,
) -> tuple[ClientSide, list[Any]]:
    """Run the upgrade's check; returns the protocol and what the check ended with."""
    client = ClientSide()
    client.factory = FakeFactory(manager, tokens)  # type: ignore[assignment]
    request = ConnectionRequest(
        "tcp:127.0.0.1:5000", headers or {}, "127.0.0.1", path, params or {}, 13, None, [], []
    )
    outcome: list[Any] = []
    client.onConnect(request).addBoth(outcome.append)
    return client, outcome


def denied(outcome: list[Any]) -> tuple[int, str]:
    [result] = outcome
    assert isinstance(result, Failure) and result.check(ConnectionDeny)
    return result.value.code, result.value.reason


def test_upgrade_without_a_valid_token_is_401() -> None:
    """On a token gateway, no token or a wrong one is 401 with its reason, before any
    sandbox lookup (so ids do not leak)."""
    manager = FakeManager()
    for params in ({}, {"access_token": ["wrong-token-0123456789"]}):
        _, outcome = accept(manager, f"/ws/{SANDBOX}", [TOKEN], params=params)
        assert denied(outcome) == (401, "missing or invalid API token")
    assert manager.lookups == []


def test_upgrade_to_an_unknown_sandbox_is_404() -> None:
    """An unknown sandbox, or a path outside ``/ws/``, is 404 ``sandbox not found``; the
    lookup names the token's owner."""
    manager = FakeManager()
    _, outcome = accept(manager, "/ws/" + "b" * 32, [TOKEN], params={"access_token": [TOKEN]})
    assert denied(outcome) == (404, "sandbox not found")
    _, outcome = accept(manager, "/xx/" + SANDBOX, [TOKEN], {"authorization": f"Bearer {TOKEN}"})
    assert denied(outcome) == (404, "sandbox not found")
    assert manager.lookups == [("b" * 32, owner_id(TOKEN)), ("", owner_id(TOKEN))]


def test_upgrade_with_an_unreachable_agent_is_503() -> None:
    """An agent that cannot be reached is 503 ``sandbox agent unreachable``."""
    manager = FakeManager(fail(AgentUnavailable("gone")))
    _, outcome = accept(manager, f"/ws/{SANDBOX}")
    assert denied(outcome) == (503, "sandbox agent unreachable")
    assert manager.lookups == [(SANDBOX, None)]


class FakeLink(AgentSide):
    def __init__(self) -> None:
        super().__init__()
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


def test_upgrade_pairs_the_client_with_its_agent() -> None:
    """A good upgrade keeps the sandbox and agent, and makes the client the agent's listener."""
    link = FakeLink()
    client, outcome = accept(FakeManager(succeed(link)), f"/ws/{SANDBOX}")
    assert outcome == [None]
    assert client.sandbox is not None and client.sandbox.sandbox_id == SANDBOX
    assert client.agent is link and link.listener is client and link.closes == 0


def test_a_sandbox_deleted_while_connecting_is_404_and_the_agent_closed() -> None:
    """If the sandbox goes while the agent connection is being made, the upgrade is 404 and
    the new agent connection is closed, not left open."""
    link = FakeLink()
    opening: Deferred[Any] = Deferred()
    manager = FakeManager(opening)
    client, outcome = accept(manager, f"/ws/{SANDBOX}")
    manager.registry.clear()
    opening.callback(link)
    assert denied(outcome) == (404, "sandbox not found")
    assert link.closes == 1 and client.agent is None and link.listener is None


def test_a_client_gone_while_connecting_is_refused_too() -> None:
    """If the client left during the agent connect, the new agent connection is closed."""
    link = FakeLink()
    opening: Deferred[Any] = Deferred()
    client, outcome = accept(FakeManager(opening), f"/ws/{SANDBOX}")
    client._lost = True
    opening.callback(link)
    assert denied(outcome) == (404, "sandbox not found")
    assert link.closes == 1


def test_a_new_client_starts_with_nothing_in_flight() -> None:
    """A fresh client protocol has no sandbox, agent, or commands in flight."""
    client = ClientSide()
    assert (client.sandbox, client.agent, client.in_flight) == (None, None, {})
    assert client._sent_at == {} and not client._attached and not client._lost


# -- connect_agent ---------------------------------------------------------------------------


def _answer_handshake(protocol: Any, transport: StringTransport) -> None:
    key = re.search(rb"Sec-WebSocket-Key: (\S+)", transport.value())
    assert key is not None
    accept_key = base64.b64encode(
        hashlib.sha1(key.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    protocol.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key + b"\r\n\r\n"
    )


def test_connect_agent_over_tcp_sends_the_secret_and_its_options() -> None:
    """The agent is reached at ``ws://host:port/agent`` with ``Authorization: Bearer
    <secret>``, the message limits, the handshake timeout, a 2 s close timeout, no Nagle and
    no UTF-8 check of the agent's text; the connect fires with the ``AgentSide``."""
    reactor = MemoryReactorClock()
    d = connect_agent(reactor, "10.0.0.5", 4321, "s3cret", timeout=7.5, max_message_size=999)
    results: list[Any] = []
    d.addBoth(results.append)
    host, port, factory, connect_timeout, _ = reactor.tcpClients[0]
    assert (host, port, connect_timeout) == ("10.0.0.5", 4321, 7)
    ws = factory._wrappedFactory  # the endpoint wraps the WebSocket factory
    assert ws.url == "ws://10.0.0.5:4321/agent"
    assert ws.noisy is False
    assert (ws.maxMessagePayloadSize, ws.maxFramePayloadSize) == (999, 999)
    assert ws.openHandshakeTimeout == 7.5
    assert ws.closeHandshakeTimeout == 2
    assert ws.tcpNoDelay is True
    assert ws.utf8validateIncoming is False
    transport = StringTransport()
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    head = transport.value()
    assert head.startswith(b"GET /agent HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer s3cret\r\n" in head
    assert b"\r\nHost: 10.0.0.5:4321\r\n" in head
    _answer_handshake(protocol, transport)
    [agent] = results
    assert isinstance(agent, AgentSide) and agent is protocol._wrappedProtocol


def test_connect_agent_over_a_unix_socket() -> None:
    """With ``unix_socket`` the agent is reached over that socket as ``ws://localhost/agent``
    (a connect timeout of at least a second)."""
    reactor = MemoryReactorClock()
    connect_agent(reactor, "ignored", 1, "s", timeout=0.5, unix_socket="/run/a.sock")
    assert reactor.tcpClients == []
    path, factory, connect_timeout, _ = reactor.unixClients[0]
    assert (path, connect_timeout) == ("/run/a.sock", 1)
    assert factory._wrappedFactory.url == "ws://localhost/agent"
    transport = StringTransport()
    factory.buildProtocol(UNIXAddress(path)).makeConnection(transport)
    assert b"\r\nHost: localhost:80\r\n" in transport.value()


def test_connect_agent_reports_a_refused_connection_as_unavailable() -> None:
    """A refused TCP connect is ``AgentUnavailable`` saying ``agent unreachable``."""
    reactor = MemoryReactorClock()
    failures: list[Failure] = []
    connect_agent(reactor, "10.0.0.5", 4321, "s").addErrback(failures.append)
    _, _, factory, _, _ = reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    [failure] = failures
    assert failure.check(AgentUnavailable)
    assert str(failure.value).startswith("agent unreachable: ")


# -- listings --------------------------------------------------------------------------------


class ListingAgent:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.listener: Any = "own listener"

    def send_json(self, payload: bytes) -> None:
        self.sent.append(json.loads(payload))


def _listing(call: Any, clock: Clock) -> tuple[ListingAgent, list[Any]]:
    agent = ListingAgent()
    results: list[Any] = []
    Deferred.fromCoroutine(call(clock, agent)).addBoth(results.append)
    return agent, results


def test_list_sessions_asks_once_and_reads_only_its_reply() -> None:
    """``list_sessions`` sends one ``list_sessions`` with a ``gateway-`` request id, ignores
    other messages, and returns the session names of its reply; the agent's listener is
    cleared after."""
    clock = Clock()
    agent, results = _listing(list_sessions, clock)
    [sent] = agent.sent
    assert sent["type"] == "list_sessions"
    assert re.fullmatch(r"gateway-[0-9a-f]{16}", sent["request_id"])
    listener = agent.listener
    for noise in (
        b"not json",
        json.dumps({"type": "processes", "request_id": sent["request_id"], "sessions": []}),
        json.dumps({"type": "sessions", "request_id": "other", "sessions": []}),
        json.dumps({"type": "sessions", "request_id": sent["request_id"], "sessions": {}}),
    ):
        listener.agent_message(noise if isinstance(noise, bytes) else noise.encode(), False)
    assert results == []
    sessions = [{"session": "a"}, {"session": 5}, "b", {"session": "c", "busy": True}]
    reply = {"type": "sessions", "request_id": sent["request_id"], "sessions": sessions}
    listener.agent_message(json.dumps(reply).encode(), False)
    assert results == [{"a", "c"}]
    assert agent.listener is None


def test_list_processes_returns_the_process_entries() -> None:
    """``list_processes`` sends ``processes`` and returns the dict entries of its reply."""
    clock = Clock()
    agent, results = _listing(list_processes, clock)
    [sent] = agent.sent
    assert sent["type"] == "processes"
    reply = {"type": "processes", "request_id": sent["request_id"], "processes": [{"pid": 3}, 4]}
    agent.listener.agent_message(json.dumps(reply).encode(), False)
    assert results == [[{"pid": 3}]]


def test_a_listing_times_out_as_unavailable() -> None:
    """No reply within the timeout is ``AgentUnavailable`` naming what was listed."""
    clock = Clock()
    agent, results = _listing(list_sessions, clock)
    clock.advance(1.9)
    assert results == []
    clock.advance(0.1)
    [failure] = results
    assert failure.check(AgentUnavailable)
    assert str(failure.value) == "agent did not list its sessions within 2 s"
    assert agent.listener is None


def test_a_listing_fails_when_the_agent_closes() -> None:
    """The agent closing before its reply is ``AgentUnavailable`` with the close code."""
    clock = Clock()
    agent, results = _listing(list_processes, clock)
    agent.listener.agent_closed(1006, None)
    [failure] = results
    assert failure.check(AgentUnavailable)
    assert str(failure.value) == "agent closed while listing processes (1006)"
