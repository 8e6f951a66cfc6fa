"""A small Autobahn WebSocket client for tests: queue of messages, open and close Deferreds."""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint


class TestClient(WebSocketClientProtocol):  # type: ignore[misc]
    """Collects text messages as parsed JSON; ``opened`` and ``closed`` fire on those events."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[TestClient] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.messages: DeferredQueue[Any] = DeferredQueue()

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put(payload if isBinary else json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        self.closed.callback((code, reason))

    def send_json(self, message: Any) -> None:
        self.sendMessage(json.dumps(message).encode(), isBinary=False)

    async def command(self, command: str, **fields: Any) -> Any:
        """Send one command and return the next message."""
        self.send_json({"command": command, **fields})
        return await self.messages.get()


async def connect(reactor: Any, port: int, path: str, **options: Any) -> TestClient:
    """Open a WebSocket to 127.0.0.1:port/path and wait for the handshake."""
    factory = WebSocketClientFactory(url=f"ws://127.0.0.1:{port}{path}", reactor=reactor)
    factory.protocol = TestClient
    if options:
        factory.setProtocolOptions(**options)
    protocol: TestClient = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return await protocol.opened
