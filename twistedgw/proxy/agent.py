"""The gateway's leg to an agent: an Autobahn client protocol and how to connect it.

Each client WebSocket gets its own agent connection. The gateway presents the sandbox's agent
secret as a bearer token on the handshake; the agent refuses anyone else.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Protocol

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from twistedgw.agents import AgentUnavailable, IAgents
from twistedgw.proxy.flow import unpair_flow


class AgentListener(Protocol):
    """Who receives what an ``AgentSide`` hears (the client side of the proxy)."""

    def agent_message(self, payload: bytes, is_binary: bool) -> None: ...

    def agent_closed(self, code: int | None, reason: str | None) -> None: ...


class AgentSide(WebSocketClientProtocol):
    """One WebSocket connection from the gateway to a sandbox's agent."""

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[AgentSide] = Deferred()
        self.listener: AgentListener | None = None
        self.gone = False

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.listener is not None:
            try:
                self.listener.agent_message(payload, isBinary)
            except Exception:
                self._log.failure("forwarding an agent message failed")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.gone = True
        if not self.opened.called:
            self.opened.errback(
                AgentUnavailable(f"agent handshake failed (code={code}, reason={reason!r})")
            )
            return
        if self.transport is not None:
            unpair_flow(self.transport)
        if self.listener is not None:
            listener, self.listener = self.listener, None
            try:
                listener.agent_closed(code, reason)
            except Exception:
                self._log.failure("handling an agent close failed")

    def send_json(self, payload: bytes) -> None:
        """Send one JSON text message to the agent."""
        self.sendMessage(payload, isBinary=False)

    def send_binary(self, payload: bytes) -> None:
        """Send one binary frame to the agent (terminal input, ``protocol.BINARY_STDIN``)."""
        self.sendMessage(payload, isBinary=True)

    def close(self) -> None:
        """Close this agent connection (normal closure)."""
        self.listener = None
        if not self.gone:
            self.sendClose(code=1000)


def connect_agent(
    reactor: Any,
    host: str,
    port: int,
    secret: str,
    timeout: float = 10.0,
    max_message_size: int = 0,
    unix_socket: str | None = None,
) -> Deferred[AgentSide]:
    """Connect to an agent (over TCP, or over ``unix_socket`` when given) and complete the
    WebSocket handshake; fires with the ``AgentSide``."""
    endpoint: Any
    if unix_socket:
        endpoint = UNIXClientEndpoint(reactor, unix_socket, timeout=max(1, int(timeout)))
        url = "ws://localhost/agent"
    else:
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=max(1, int(timeout)))
        url = f"ws://{host}:{port}/agent"
    factory = WebSocketClientFactory(
        url=url,
        headers={"Authorization": f"Bearer {secret}"},
        reactor=reactor,
    )
    factory.protocol = AgentSide
    factory.noisy = False  # one factory per connection: its start/stop lines are noise
    factory.setProtocolOptions(
        maxMessagePayloadSize=max_message_size,
        maxFramePayloadSize=max_message_size,
        openHandshakeTimeout=timeout,
        closeHandshakeTimeout=2,
        # Commands and results are small, latency matters: no Nagle.
        tcpNoDelay=True,
        # The agent's text is forwarded verbatim, never decoded here; the client's own
        # WebSocket stack checks UTF-8. Skipping the check halves the gateway's CPU per
        # streamed byte.
        utf8validateIncoming=False,
    )

    async def run() -> AgentSide:
        protocol = await endpoint.connect(factory)
        assert isinstance(protocol, AgentSide)
        try:
            return await protocol.opened
        except CancelledError:
            # Timed out after TCP connected, mid-handshake: nobody will use this connection.
            if not protocol.gone and protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
            raise

    d = Deferred.fromCoroutine(run())
    d.addTimeout(timeout, reactor)

    def translate(failure: Any) -> Any:
        if failure.check(TimeoutError):
            raise AgentUnavailable(f"agent did not answer within {timeout:.0f} s")
        if not failure.check(AgentUnavailable):
            raise AgentUnavailable(f"agent unreachable: {failure.getErrorMessage()}")
        return failure

    d.addErrback(translate)
    return d


async def wait_for_agent(
    reactor: Any,
    host: str,
    port: int,
    secret: str,
    timeout: float,
    interval: float = 0.02,
    unix_socket: str | None = None,
) -> None:
    """Retry a full agent handshake until one succeeds or ``timeout`` seconds pass.

    The published port accepts TCP before the agent listens (Docker's proxy answers), so only
    a completed, authenticated handshake proves the agent is ready.
    """
    deadline = reactor.seconds() + timeout
    last: Exception | None = None
    while reactor.seconds() < deadline:
        remaining = max(0.1, deadline - reactor.seconds())
        try:
            agent = await connect_agent(
                reactor, host, port, secret, timeout=min(5.0, remaining), unix_socket=unix_socket
            )
        except AgentUnavailable as e:
            last = e
            await deferLater(reactor, interval, lambda: None)
            continue
        agent.close()
        return
    raise AgentUnavailable(f"agent not ready after {timeout:.0f} s: {last}")


class _Listing:
    """An ``AgentListener`` waiting for the reply to one listing request: the first message of
    type ``reply`` with our ``request_id`` and a list in ``field``."""

    def __init__(self, request_id: str, reply: str, field: str) -> None:
        self.request_id = request_id
        self.reply = reply
        self.field = field
        self.done: Deferred[list[Any]] = Deferred()

    def agent_message(self, payload: bytes, is_binary: bool) -> None:
        if self.done.called:
            return
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if (
            isinstance(message, dict)
            and message.get("type") == self.reply
            and message.get("request_id") == self.request_id
            and isinstance(message.get(self.field), list)
        ):
            self.done.callback(message[self.field])

    def agent_closed(self, code: int | None, reason: str | None) -> None:
        if not self.done.called:
            self.done.errback(AgentUnavailable(f"agent closed while listing {self.field} ({code})"))


async def _list(
    reactor: Any, agent: AgentSide, request: str, reply: str, field: str, timeout: float
) -> list[Any]:
    """One listing round trip: send ``{"type": request}``, wait at most ``timeout`` for the
    ``reply`` message and return its ``field`` (the agent's own listener is restored)."""
    listing = _Listing(f"gateway-{secrets.token_hex(8)}", reply, field)
    agent.listener = listing
    agent.send_json(json.dumps({"type": request, "request_id": listing.request_id}).encode())
    listing.done.addTimeout(timeout, reactor)
    try:
        return await listing.done
    except TimeoutError:
        raise AgentUnavailable(f"agent did not list its {field} within {timeout:g} s") from None
    finally:
        agent.listener = None


async def list_sessions(reactor: Any, agent: AgentSide, timeout: float = 2.0) -> set[str]:
    """The names of the sessions an agent has now (a ``list_sessions`` round trip)."""
    entries = await _list(reactor, agent, "list_sessions", "sessions", "sessions", timeout)
    return {
        entry["session"]
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("session"), str)
    }


async def list_processes(
    reactor: Any, agent: AgentSide, timeout: float = 2.0
) -> list[dict[str, Any]]:
    """The agent's process table now (a ``processes`` round trip)."""
    entries = await _list(reactor, agent, "processes", "processes", "processes", timeout)
    return [entry for entry in entries if isinstance(entry, dict)]


@implementer(IAgents)
class WebSocketAgents:
    """``IAgents`` over the agent's WebSocket: what the lifecycle uses to reach agents."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def wait_ready(
        self, host: str, port: int, secret: str, timeout: float, unix_socket: str | None = None
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(
            wait_for_agent(self._reactor, host, port, secret, timeout, unix_socket=unix_socket)
        )

    def connect(
        self,
        host: str,
        port: int,
        secret: str,
        timeout: float,
        max_message_size: int = 0,
        unix_socket: str | None = None,
    ) -> Deferred[AgentSide]:
        return connect_agent(
            self._reactor,
            host,
            port,
            secret,
            timeout=timeout,
            max_message_size=max_message_size,
            unix_socket=unix_socket,
        )

    def list_sessions(self, link: AgentSide, timeout: float) -> Deferred[set[str]]:
        return Deferred.fromCoroutine(list_sessions(self._reactor, link, timeout=timeout))

    def list_processes(self, link: AgentSide, timeout: float) -> Deferred[list[dict[str, Any]]]:
        return Deferred.fromCoroutine(list_processes(self._reactor, link, timeout=timeout))
