"""The gateway's leg to an agent: what ``connect_agent`` leaves behind when it gives up."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twistedgw.agents import AgentUnavailable
from twistedgw.proxy.agent import connect_agent


def test_timeout_after_tcp_connected_closes_the_connection() -> None:
    """When the agent accepts TCP but never completes the WebSocket handshake, the timeout
    fails the connect with ``AgentUnavailable`` and closes that connection at once (not only
    when Autobahn's own handshake timer fires later)."""
    reactor = MemoryReactorClock()
    d = connect_agent(reactor, "127.0.0.1", 4321, "secret", timeout=2)
    failures: list[AgentUnavailable] = []
    closed_when_failed: list[bool] = []
    transport = StringTransport()

    def failed(failure: object) -> None:
        # What the caller sees at the moment it hears of the failure.
        closed_when_failed.append(transport.disconnecting)
        failures.append(failure.value)  # type: ignore[attr-defined]

    d.addErrback(failed)
    reactor.advance(1)  # the TCP connect takes a while
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 4321)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    assert transport.value().startswith(b"GET /agent HTTP/1.1")  # handshake sent, no answer
    assert not transport.disconnecting
    reactor.advance(1)  # connect_agent's timeout (2 s since the call) fires
    assert len(failures) == 1
    assert isinstance(failures[0], AgentUnavailable)
    assert "did not answer within 2 s" in str(failures[0])
    assert closed_when_failed == [True]


@pytest.mark.parametrize("timeout", [1, 5])
def test_timeout_before_tcp_connected_fails_cleanly(timeout: int) -> None:
    """A connect that never reaches TCP is reported as ``AgentUnavailable`` at the timeout."""
    reactor = MemoryReactorClock()
    d = connect_agent(reactor, "127.0.0.1", 4321, "secret", timeout=timeout)
    failures: list[object] = []
    d.addErrback(failures.append)
    reactor.advance(timeout - 0.5)
    assert failures == []
    reactor.advance(0.5)
    assert len(failures) == 1
    assert failures[0].check(AgentUnavailable)  # type: ignore[attr-defined]
