"""The bound on replies the gateway makes itself (error replies, pongs) that a client leaves
unread: agent output is paced by backpressure, these are not, so a client that never reads is
dropped once they pile up."""

from __future__ import annotations

from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketServerProtocol

from twistedgw.proxy.client import OWN_REPLY_BACKLOG, ClientSide
from twistedgw.proxy.flow import WRITE_BUFFER


class StuckTransport:
    """A TCP transport whose peer never reads: everything written stays unsent."""

    def __init__(self, unsent: int = 0) -> None:
        self.dataBuffer = b"x" * unsent
        self.offset = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.dataBuffer += data

    def abortConnection(self) -> None:
        self.aborted = True


def _client(transport: StuckTransport) -> tuple[ClientSide, list[bytes]]:
    client = ClientSide()
    client.transport = transport  # type: ignore[assignment]
    client.state = WebSocketServerProtocol.STATE_OPEN
    client.peer = "tcp4:127.0.0.1:1"
    sent: list[bytes] = []

    def send(payload: bytes, isBinary: bool = False, **_: Any) -> None:
        sent.append(payload)
        transport.write(payload)

    client.sendMessage = send  # type: ignore[method-assign,assignment]
    return client, sent


def test_own_replies_flow_while_the_send_buffer_drains() -> None:
    """Within the send buffer, every error reply is sent and the client stays."""
    transport = StuckTransport()
    client, sent = _client(transport)
    reply = b"e" * 1000
    for _ in range(WRITE_BUFFER // len(reply)):
        client._send_own(reply)
    assert len(sent) == WRITE_BUFFER // len(reply)
    assert not transport.aborted


def test_client_leaving_own_replies_unread_is_dropped() -> None:
    """Once the client's unsent bytes pass the send buffer, at most OWN_REPLY_BACKLOG more
    bytes of the gateway's own replies are queued; the next one aborts the connection and is
    not queued, so memory held for a client that never reads is bounded."""
    transport = StuckTransport(unsent=WRITE_BUFFER + 1)
    client, sent = _client(transport)
    reply = b"e" * 700  # about the size of a capped error reply
    attempts = OWN_REPLY_BACKLOG // len(reply) + 10
    for _ in range(attempts):
        client._send_own(reply)
    assert transport.aborted
    assert sum(map(len, sent)) <= OWN_REPLY_BACKLOG
    assert len(sent) < attempts


def test_pongs_count_towards_the_same_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pongs to a client that never reads are bounded the same way (200k pings queued 26 MB
    of pongs before)."""
    transport = StuckTransport(unsent=WRITE_BUFFER + 1)
    client, _ = _client(transport)
    pongs: list[bytes | None] = []
    # Record what would go on the wire instead of framing it.
    monkeypatch.setattr(
        WebSocketServerProtocol, "sendPong", lambda self, payload=None: pongs.append(payload)
    )
    for _ in range(OWN_REPLY_BACKLOG // 127 + 10):
        client.sendPong(b"p" * 125)
    assert transport.aborted
    assert len(pongs) <= OWN_REPLY_BACKLOG // 127 + 1
