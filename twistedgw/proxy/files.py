"""The gateway's HTTP leg to an agent's ``/files`` routes (see the agent's ``files`` module).

Every file operation is one HTTP request to the agent, over the same TCP port or Unix socket
as its WebSocket, authenticated with the same agent secret, on a connection of its own
(``Connection: close``). Bodies stream both ways with backpressure and are never held whole:

- ``UploadBody``: a client's request body (``GatewayRequest.body_sink``) as the agent
  request's ``IBodyProducer``. When the agent's connection cannot take more, the client's
  connection stops being read; chunks that arrive before the agent connection is up are
  held, with the client paused.
- ``stream_response``: an agent response's body written to a client request, with the agent
  connection paused while the client is slow, and aborted when the client goes away.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from twistedgw.agents import AgentUnavailable
from twistedgw.sandbox import Sandbox

#: Bytes a file-carrying connection reads and buffers at a time.
TRANSFER_BUFFER = 512 * 1024
#: Largest error (or small JSON) body read from an agent.
SMALL_BODY = 64 * 1024


@frozen
class AgentAnswer:
    """A small, complete agent answer: status and decoded JSON body."""

    status: int
    body: Any


class _AgentHTTP(HTTP11ClientProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        set_transfer_buffer(self.transport)


class _QuietFactory(_HTTP11ClientFactory):
    """One factory per agent request: its start/stop log lines are noise; its connections
    move bulk data (bigger reads, more buffered before backpressure)."""

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _AgentHTTP(self._quiescentCallback)


def set_transfer_buffer(transport: Any) -> None:
    """Let a connection that carries a file read and buffer ``TRANSFER_BUFFER`` bytes at a
    time instead of Twisted's 64 KiB: a quarter of the reactor turns per MiB."""
    if transport is not None and hasattr(transport, "bufferSize"):
        transport.bufferSize = TRANSFER_BUFFER


@implementer(IAgentEndpointFactory)
class _SandboxEndpoint:
    def __init__(self, reactor: Any, sandbox: Sandbox, timeout: float) -> None:
        self._reactor = reactor
        self._sandbox = sandbox
        self._timeout = max(1, int(timeout))

    def endpointForURI(self, uri: URI) -> Any:
        sandbox = self._sandbox
        if sandbox.agent_socket:
            return UNIXClientEndpoint(self._reactor, sandbox.agent_socket, timeout=self._timeout)
        return TCP4ClientEndpoint(
            self._reactor, sandbox.agent_host, sandbox.agent_port, timeout=self._timeout
        )


class AgentFiles:
    """Makes ``/files`` requests to sandboxes' agents."""

    def __init__(self, reactor: Any, connect_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._pool._factory = _QuietFactory

    def request(
        self,
        sandbox: Sandbox,
        method: bytes,
        target: bytes,
        headers: dict[bytes, bytes] | None = None,
        body: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """Send one request to the sandbox's agent; fires with its response (whose body is
        not read yet), or fails with ``AgentUnavailable``."""
        agent = Agent.usingEndpointFactory(
            self._reactor, _SandboxEndpoint(self._reactor, sandbox, self._timeout), self._pool
        )
        all_headers = Headers({b"Authorization": [b"Bearer " + sandbox.agent_secret.encode()]})
        for name, value in (headers or {}).items():
            all_headers.setRawHeaders(name, [value])
        d = agent.request(method, b"http://agent" + target, all_headers, body)

        def unavailable(failure: Failure) -> Failure:
            if failure.check(AgentUnavailable):
                return failure
            raise AgentUnavailable(f"file request failed: {failure.getErrorMessage()}")

        d.addErrback(unavailable)
        return d


class _Collector(Protocol):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < self.limit:
            self.data += data[: self.limit - len(self.data)]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(bytes(self.data))


async def read_answer(response: IResponse) -> AgentAnswer:
    """Read a small agent answer (at most ``SMALL_BODY`` bytes) as JSON."""
    collector = _Collector(SMALL_BODY)
    response.deliverBody(collector)
    raw = await collector.done
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = {"error": raw.decode("utf-8", "replace")[:500]}
    return AgentAnswer(response.code, body)


def error_extra(answer: AgentAnswer) -> dict[str, Any]:
    """The fields of an agent's error answer besides ``error`` (JSON scalars only)."""
    body = answer.body
    if not isinstance(body, dict):
        return {}
    return {
        k: v
        for k, v in body.items()
        if k != "error" and isinstance(v, str | int | float | bool) and len(str(v)) < 4096
    }


def error_text(answer: AgentAnswer) -> str:
    """The error message of an agent answer."""
    body = answer.body
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return f"the sandbox agent answered {answer.status}"


@implementer(IBodyProducer)
class UploadBody:
    """A client's streamed request body as the body of the agent request.

    The edge calls ``write`` with each chunk (this object is the request's ``body_sink``);
    the route calls ``end`` once the whole body is in; ``abort`` drops the upload (the agent
    connection is closed, and the agent's worker removes its temporary file).
    """

    _log = Logger()

    def __init__(self, client_transport: Any, length: int | None) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self._client = client_transport
        self._consumer: IConsumer | None = None
        self._held: list[bytes] = []
        self._finished: Deferred[None] | None = None
        self._ended = False
        self._failure: Failure | None = None
        self._client_paused = False
        # Nothing can go anywhere until the agent connection is up.
        self._pause_client()

    @property
    def ended(self) -> bool:
        return self._ended

    # -- the client side (body_sink) --------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._failure is not None:
            return
        if self._consumer is None:
            self._held.append(data)
            self._pause_client()
            return
        self._consumer.write(data)

    def end(self) -> None:
        """The client's body is complete."""
        self._ended = True
        if self._consumer is not None and self._finished is not None:
            finished, self._finished = self._finished, None
            finished.callback(None)

    def abort(self, reason: str) -> None:
        """Give up: the agent request fails, its connection is closed."""
        if self._failure is None:
            self._failure = Failure(AgentUnavailable(reason))
        self._held.clear()
        # Whatever the client still sends is read and dropped (the edge's refusal lingers).
        self._resume_client()
        if self._finished is not None:
            finished, self._finished = self._finished, None
            finished.errback(self._failure)

    def _pause_client(self) -> None:
        if not self._client_paused and self._client is not None:
            self._client_paused = True
            self._client.pauseProducing()

    def _resume_client(self) -> None:
        if self._client_paused and self._client is not None:
            self._client_paused = False
            self._client.resumeProducing()

    # -- IBodyProducer (the agent side) -----------------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        if self._failure is not None:
            return fail(self._failure)
        self._consumer = consumer
        held, self._held = self._held, []
        for data in held:
            consumer.write(data)
        if self._ended:
            return succeed(None)
        self._finished = Deferred()
        self._resume_client()
        return self._finished

    def pauseProducing(self) -> None:
        self._pause_client()

    def resumeProducing(self) -> None:
        if self._consumer is not None:
            self._resume_client()

    def stopProducing(self) -> None:
        # The agent connection is gone (or answered early): nothing more goes there.
        self._failure = self._failure or Failure(AgentUnavailable("agent connection closed"))
        self._finished = None
        self._held.clear()
        self._resume_client()


@implementer(IPushProducer)
class _Streamer(Protocol):
    """An agent response body, written to a client request as it comes."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.done: Deferred[None] = Deferred()
        self.client_gone = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.client_gone:
            self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            self.request.unregisterProducer()
        except Exception:
            pass
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    # IPushProducer, for the client's transport
    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.client_gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


async def stream_response(request: Any, response: IResponse) -> bool:
    """Write the agent response's body to ``request``; True when it all arrived. A body cut
    short (the agent or its worker died mid-way) aborts the client's connection, so that the
    client sees a truncated transfer rather than a short file."""
    streamer = _Streamer(request)
    set_transfer_buffer(getattr(getattr(request, "channel", None), "transport", None))
    response.deliverBody(streamer)
    try:
        await streamer.done
    except Exception:
        transport = getattr(getattr(request, "channel", None), "transport", None)
        if transport is not None and not streamer.client_gone:
            transport.abortConnection()
        return False
    return True
