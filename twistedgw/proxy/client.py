"""The client leg of the WebSocket proxy: ``/ws/{sandbox_id}``.

A client's handshake completes only once the gateway's own connection to the sandbox's agent is
up (``onConnect`` returns a Deferred), so an accepted client can send at once. Client messages
are validated (``protocol.parse_message``) and forwarded; agent results go back verbatim.
Binary frames go both ways only for PTYs: terminal input frames from a client (validated, then
forwarded as binary frames), terminal output frames from the agent to a client that asked for
them (forwarded as they come, like every agent message).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twistedgw.agents import AgentUnavailable
from twistedgw.lifecycle.errors import SandboxNotFound
from twistedgw.lifecycle.manager import AgentRecovery, SandboxManager
from twistedgw.metrics import GatewayMetrics, command_outcome
from twistedgw.protocol import (
    CLOSE_AGENT_LOST,
    CLOSE_AGENT_RESTARTED,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    DEFAULT_LIMITS,
    CloseSession,
    Command,
    Limits,
    Message,
    ProtocolError,
    TerminalInput,
    command_error,
    encode,
    parse_message,
)
from twistedgw.proxy.agent import AgentSide
from twistedgw.proxy.flow import WRITE_BUFFER, pair_flow, unpair_flow, unsent_bytes
from twistedgw.sandbox import Sandbox
from twistedgw.web.auth import QUERY_PARAMETER, Authenticator, Unauthorized

#: Frames one message may be split into; an endless run of tiny continuation frames never
#: grows the message, so the size limit (1009) alone never ends it.
MAX_FRAMES_PER_MESSAGE = 1024
#: Frames per second a client may send on average (control frames included), and the burst
#: it may send at once. Each frame costs the reactor tens of microseconds.
FRAME_RATE = 1000.0
FRAME_BURST = 1000.0
#: Bytes of the gateway's own replies (errors, pongs) a client may leave unread beyond its
#: send buffer before it is dropped: agent output is paced, these are not.
OWN_REPLY_BACKLOG = 1024 * 1024
#: Seconds a client has to answer our close frame.
CLOSE_HANDSHAKE_TIMEOUT = 5.0
#: Bytes of partial (not yet complete) client messages all clients together may hold.
MAX_BUFFERED_TOTAL = 256 * 1024 * 1024

#: With close code 4001 (protocol.CLOSE_AGENT_RESTARTED): the agent connection dropped and
#: the agent answers again (it was killed and its supervisor restarted it in place): the
#: sandbox and its files are there, commands in flight and sessions are lost (and listed in an
#: ``agent_restarted`` message before the close); reconnecting works at once.
REASON_AGENT_RESTARTED = "sandbox agent restarted: reconnect"

#: Streamed output chunks, the bulk of what agents send, as the agent encodes them.
_OUTPUT_PREFIXES = (b'{"type": "output"', b'{"type":"output"')
#: The head of a command's result or error reply as the agent encodes them (type, request_id,
#: command first): read without parsing the whole (possibly large) message.
_RESULT_HEAD = re.compile(
    rb'\{"type": ?"(?:result|error)", ?"request_id": ?("(?:[^"\\]|\\.)*"), ?"command"'
)
#: A ``yielded`` answer (``yield_after``) also ends a command on its connection.
_YIELDED_HEAD = re.compile(rb'\{"type": ?"yielded", ?"request_id": ?("(?:[^"\\]|\\.)*")')


def finished_request(payload: bytes) -> str | None:
    """The ``request_id`` of the command a message from the agent finishes (its result, or
    the error reply to it), or None for anything else (output chunks, control replies)."""
    if payload.startswith(_OUTPUT_PREFIXES):
        return None
    head = _RESULT_HEAD.match(payload, 0, 1024) or _YIELDED_HEAD.match(payload, 0, 1024)
    if head is not None:
        try:
            request_id = json.loads(head.group(1))
        except ValueError:
            return None
        return request_id if isinstance(request_id, str) else None
    try:
        message = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(message, dict) or "command" not in message:
        return None  # control replies (errors included) carry no command
    if message.get("type", "result") not in ("result", "error"):
        return None
    request_id = message.get("request_id")
    return request_id if isinstance(request_id, str) else None


def close_connection(protocol: WebSocketServerProtocol, code: int, reason: str) -> None:
    """Start a closing handshake with any valid close code (1001 and 1011 included).

    Autobahn's ``sendClose`` only admits 1000 and 3000-4999, but a server may send 1001
    (going away) and 1011 (unexpected condition) too (RFC 6455, section 7.4.1).
    """
    if protocol.state != WebSocketServerProtocol.STATE_OPEN:
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        return
    data = reason.encode("utf-8")[:123]
    # Do not cut a multi-byte character in half.
    protocol.sendCloseFrame(code=code, reasonUtf8=data.decode("utf-8", "ignore").encode("utf-8"))


class ClientSide(WebSocketServerProtocol):
    """One client WebSocket, paired with its own agent connection."""

    _log = Logger()
    factory: ProxyFactory

    def __init__(self) -> None:
        super().__init__()
        self.sandbox: Sandbox | None = None
        self.agent: AgentSide | None = None
        self._attached = False
        self._lost = False
        self._frames_in_message = 0
        self._frame_tokens = FRAME_BURST
        self._frame_stamp: float | None = None
        self._own_backlog = 0
        self._buffered = 0
        self._discarding = False
        #: Commands sent to the agent whose result has not come back: request_id -> command.
        #: If the agent is lost, each gets an error reply instead of silence.
        self.in_flight: dict[str, str | None] = {}
        #: When each command in flight went to the agent (the command latency metric).
        self._sent_at: dict[str, float] = {}

    # -- handshake -------------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._accept(request))

    async def _accept(self, request: ConnectionRequest) -> None:
        manager = self.factory.manager
        prefix = "/ws/"
        path = request.path
        sandbox_id = path[len(prefix) :] if path.startswith(prefix) else ""
        token = (request.params.get(QUERY_PARAMETER) or [None])[0]
        try:
            owner = self.factory.authenticator.owner_for(
                request.headers.get("authorization"), token
            )
        except Unauthorized:
            raise ConnectionDeny(401, "missing or invalid API token") from None
        try:
            sandbox = manager.lookup(sandbox_id, owner)
        except SandboxNotFound:
            raise ConnectionDeny(404, "sandbox not found") from None
        try:
            agent = await manager.open_agent(sandbox)
        except AgentUnavailable as e:
            self._log.warn(
                "client for sandbox {sandbox_id} refused: {error}",
                sandbox_id=sandbox.sandbox_id,
                error=str(e),
            )
            raise ConnectionDeny(503, "sandbox agent unreachable") from None
        assert isinstance(agent, AgentSide)  # the gateway's agents are WebSocketAgents
        if self._lost or sandbox.sandbox_id not in manager.registry:
            # The client left, or the sandbox was deleted, while we were connecting. Deny
            # either way: completing the handshake on a dead socket would start ping timers.
            agent.close()
            raise ConnectionDeny(404, "sandbox not found")
        self.sandbox = sandbox
        self.agent = agent
        agent.listener = self

    def onOpen(self) -> None:
        if self.sandbox is None or self._lost:
            # Gone mid-handshake; nothing to attach.
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        manager = self.factory.manager
        self.sandbox.attach(self, manager.now())
        self._attached = True
        if self.agent is not None:
            pair_flow(self.transport, self.agent.transport)
            pair_flow(self.agent.transport, self.transport)
        self.factory.clients.add(self)
        self._log.info(
            "client {peer} attached to sandbox {sandbox_id}",
            peer=self.peer,
            sandbox_id=self.sandbox.sandbox_id,
        )

    # -- traffic ---------------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            self._client_message(payload, isBinary)
        except Exception:
            self._log.failure("handling a client message failed")
            # Every message gets a reply (PROTOCOL.md), a bug's included.
            if self.state == WebSocketServerProtocol.STATE_OPEN:
                reply = command_error(None, None, "internal gateway error", "internal_error")
                self._send_own(encode(reply))

    def _client_message(self, payload: bytes, is_binary: bool) -> None:
        manager = self.factory.manager
        try:
            message = parse_message(payload, is_binary, self.factory.policy)
        except ProtocolError as e:
            self._send_own(encode(e.reply(datetime.now())))
            return
        if self.agent is None or self.agent.gone:
            failure = message.error("agent_unavailable", "the sandbox agent connection is closed")
            self._send_own(encode(failure.reply(datetime.now())))
            return
        sandbox = self.sandbox
        if sandbox is not None and sandbox.paused:
            failure = message.error(
                "paused", f"sandbox {sandbox.sandbox_id} is paused; resume it first"
            )
            self._send_own(encode(failure.reply(datetime.now())))
            return
        if sandbox is not None:
            sandbox.touch(manager.now())
            if not self._track(sandbox, message):
                return
        self.factory.metrics.bytes_to_agent.inc(len(payload))
        if isinstance(message, TerminalInput):
            self.agent.send_binary(message.to_frame())
            return
        self.agent.send_json(encode(message.to_wire()))

    def _track(self, sandbox: Sandbox, message: Message) -> bool:
        """Note commands in flight and session names; False (after an error reply) for a
        command in a session the agent lost since it was last used."""
        if isinstance(message, CloseSession):
            sandbox.sessions.discard(message.session)
            sandbox.lost_sessions.discard(message.session)
            return True
        if not isinstance(message, Command):
            return True
        session = message.session
        if session is not None:
            if session in sandbox.lost_sessions:
                # Said once: the next command of that name starts a new, empty session.
                sandbox.lost_sessions.discard(session)
                failure = message.error(
                    "session_lost",
                    f"session {session!r} was lost when the sandbox agent restarted (its shell, "
                    "variables and running commands are gone); send again to start it anew",
                )
                self._send_own(encode(failure.reply(datetime.now())))
                return False
            sandbox.sessions.add(session)
        metrics = self.factory.metrics
        metrics.commands_started.labels(
            mode="background" if message.background else "foreground"
        ).inc()
        if not message.background:  # answered by ``started``; its result is not for us
            self.in_flight[message.request_id] = message.command
            self._sent_at[message.request_id] = self.factory.reactor.seconds()
        return True

    def agent_message(self, payload: bytes, is_binary: bool) -> None:
        """A message from the agent: forward it unchanged."""
        if self.sandbox is not None:
            manager = self.factory.manager
            self.sandbox.touch(manager.now())
        metrics = self.factory.metrics
        if self.in_flight and not is_binary:  # binary frames are terminal output only
            finished = finished_request(payload)
            if finished is not None and finished in self.in_flight:
                del self.in_flight[finished]
                self._finished(finished, command_outcome(payload))
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            metrics.bytes_to_client.inc(len(payload))
            self.sendMessage(payload, isBinary=is_binary)

    def _finished(self, request_id: str, outcome: str) -> None:
        """A foreground command ended (its result or an error reply): counted and timed."""
        metrics = self.factory.metrics
        metrics.commands_finished.labels(outcome=outcome).inc()
        sent = self._sent_at.pop(request_id, None)
        if sent is not None:
            metrics.command_duration.observe(self.factory.reactor.seconds() - sent)

    def agent_closed(self, code: int | None, reason: str | None) -> None:
        """The agent connection dropped. When the gateway is removing the sandbox (which is
        why the agent went), the reason it decided on (4000 ``sandbox deleted``, say) wins over
        1011; otherwise find out whether the agent comes back (restarted by its supervisor),
        then tell the client what was lost and close it."""
        self.agent = None
        sandbox = self.sandbox
        closing = sandbox.closing if sandbox is not None else None
        if closing is not None:
            close_connection(self, *closing)
            return
        self._log.warn(
            "agent connection of sandbox {sandbox_id} closed (code={code})",
            sandbox_id=sandbox.sandbox_id if sandbox else None,
            code=code,
        )
        if sandbox is None or self.state != WebSocketServerProtocol.STATE_OPEN:
            close_connection(self, CLOSE_AGENT_LOST, "sandbox agent connection lost")
            return
        d = self.factory.manager.agent_lost(sandbox)
        d.addCallback(self._agent_recovered)
        d.addErrback(lambda f: self._log.failure("waiting for a lost agent failed", f))
        d.addErrback(lambda _: self.disconnect(CLOSE_AGENT_LOST, "sandbox agent connection lost"))

    def _agent_recovered(self, recovery: AgentRecovery) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return  # gone meanwhile (the client left, or the sandbox was removed)
        if not recovery.back:
            self.disconnect(CLOSE_AGENT_LOST, "sandbox agent connection lost")
            return
        lost_requests = sorted(self.in_flight)
        self._fail_in_flight(
            "agent_restarted",
            "the sandbox agent restarted; this command's result is lost (it may have run)",
        )
        notice = {
            "type": "agent_restarted",
            "lost_requests": lost_requests,
            "lost_sessions": list(recovery.lost_sessions),
            "timestamp": datetime.now().isoformat(),
        }
        self._send_own(encode(notice))
        close_connection(self, CLOSE_AGENT_RESTARTED, REASON_AGENT_RESTARTED)

    def _fail_in_flight(self, code: str, text: str) -> None:
        """An error reply for each command in flight, whose result will never come."""
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        in_flight, self.in_flight = self.in_flight, {}
        now = datetime.now()
        for request_id, command in in_flight.items():
            self._finished(request_id, "error")
            failure = ProtocolError(code, text, request_id, command)
            self._send_own(encode(failure.reply(now)))

    # -- limits ----------------------------------------------------------------------------

    def _send_own(self, payload: bytes) -> None:
        """Send a reply the gateway makes itself (an error), minding the client's backlog."""
        if self._own_reply_fits(len(payload)):
            self.sendMessage(payload, isBinary=False)

    def sendPong(self, payload: bytes | None = None) -> None:
        if self._own_reply_fits(len(payload or b"") + 2):
            super().sendPong(payload)

    def _own_reply_fits(self, size: int) -> bool:
        """Whether a reply of ``size`` may be queued: a client that leaves more than
        ``OWN_REPLY_BACKLOG`` of them unread beyond its send buffer is dropped."""
        if self.transport is None or self.state != WebSocketServerProtocol.STATE_OPEN:
            return False
        if unsent_bytes(self.transport) <= WRITE_BUFFER:
            self._own_backlog = 0
            return True
        self._own_backlog += size
        if self._own_backlog <= OWN_REPLY_BACKLOG:
            return True
        self._log.warn(
            "client {peer} does not read its replies ({backlog} bytes unsent); dropping it",
            peer=self.peer,
            backlog=unsent_bytes(self.transport),
        )
        self.transport.abortConnection()  # type: ignore[attr-defined]
        return False

    def onFrameBegin(self) -> None:
        super().onFrameBegin()
        if self.current_frame is None or self.state == WebSocketServerProtocol.STATE_CLOSED:
            return
        now = self.factory.reactor.seconds()
        if self._frame_stamp is not None:
            elapsed = max(0.0, now - self._frame_stamp)
            self._frame_tokens = min(FRAME_BURST, self._frame_tokens + elapsed * FRAME_RATE)
        self._frame_stamp = now
        self._frame_tokens -= 1
        if self.current_frame.opcode <= 7:
            self._frames_in_message += 1
        if self._frames_in_message > MAX_FRAMES_PER_MESSAGE:
            self._abusive("too many frames in one message")
        elif self._frame_tokens < 0:
            self._abusive("too many frames per second")

    def onMessageBegin(self, isBinary: bool) -> None:
        self._frames_in_message = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameData(self, payload: bytes) -> None:
        self._buffered += len(payload)
        self.factory.buffered += len(payload)
        super().onMessageFrameData(payload)
        if self.factory.buffered > self.factory.max_buffered:
            self._log.warn(
                "partial messages of all clients exceed {limit} bytes; closing {peer}",
                limit=self.factory.max_buffered,
                peer=self.peer,
            )
            self._shut(CLOSE_TRY_AGAIN, "gateway busy, try again later")

    def onMessageEnd(self) -> None:
        self._release_buffered()
        super().onMessageEnd()

    def _release_buffered(self) -> None:
        self.factory.buffered -= self._buffered
        self._buffered = 0

    def _abusive(self, why: str) -> None:
        self._log.warn("closing client {peer}: {why}", peer=self.peer, why=why)
        self._shut(CLOSE_POLICY, why)

    def _shut(self, code: int, reason: str) -> None:
        """Close at once, without parsing another byte from this client: the close frame
        goes out with a FIN, what the client still sends is discarded, and the socket is
        aborted two seconds later if the client has not closed it by then. (Closing a socket
        with unread input would send a reset that destroys the close frame.)"""
        self._release_buffered()
        close_connection(self, code, reason)
        self._discarding = True
        self.state = WebSocketServerProtocol.STATE_CLOSED  # stops Autobahn's parsing loop
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        self.factory.reactor.callLater(2.0, self._abort_transport)

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        super().dataReceived(data)

    def dropConnection(self, abort: bool = False) -> None:
        if abort and self.transport is not None and unsent_bytes(self.transport) > 0:
            # Autobahn aborts right after answering a close frame, which discards the answer
            # (1002 for an invalid close code, say) and sends a reset: let it go out first.
            super().dropConnection(abort=False)
            self.factory.reactor.callLater(2.0, self._abort_transport)
            return
        super().dropConnection(abort)

    def _abort_transport(self) -> None:
        if self.transport is not None and self.transport.connected:  # type: ignore[attr-defined]
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- closing ---------------------------------------------------------------------------

    def disconnect(self, code: int, reason: str) -> None:
        """Close this client (the sandbox was deleted or died, the agent is lost, or the
        gateway stops); commands in flight get an error reply first."""
        self._fail_in_flight("agent_unavailable", f"no result: {reason}")
        close_connection(self, code, reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._lost = True
        self._release_buffered()
        if self.transport is not None:
            unpair_flow(self.transport)
        if self.agent is not None:
            agent, self.agent = self.agent, None
            if agent.transport is not None:
                unpair_flow(agent.transport)
            agent.close()
        self.factory.clients.discard(self)
        if self._attached and self.sandbox is not None:
            self._attached = False
            manager = self.factory.manager
            self.sandbox.detach(self, manager.now())
            self._log.info(
                "client {peer} left sandbox {sandbox_id} (code={code})",
                peer=self.peer,
                sandbox_id=self.sandbox.sandbox_id,
                code=code,
            )


class ProxyFactory(WebSocketServerFactory):
    """Builds ``ClientSide`` protocols for one gateway; knows its open clients."""

    protocol = ClientSide  # type: ignore[assignment]

    def __init__(
        self,
        manager: SandboxManager,
        reactor: Any,
        policy: Limits = DEFAULT_LIMITS,
        authenticator: Authenticator | None = None,
        max_buffered: int = MAX_BUFFERED_TOTAL,
        metrics: GatewayMetrics | None = None,
        **options: Any,
    ) -> None:
        super().__init__(reactor=reactor)
        self.manager = manager
        #: Commands, bytes and (read at scrape time) open clients are counted here.
        self.metrics = metrics or getattr(manager, "metrics", None) or GatewayMetrics()
        self.metrics.observe(clients=lambda: len(self.clients))
        self.policy = policy
        self.authenticator = authenticator or Authenticator.from_tokens([])
        self.clients: set[ClientSide] = set()
        #: Bytes of partial client messages held now, and the most allowed.
        self.buffered = 0
        self.max_buffered = max_buffered
        # failByDrop=False: protocol violations (an oversized message, say) get a close frame
        # with the proper code (1009, 1002, ...) instead of a bare TCP drop.
        # closeHandshakeTimeout: our close frame may queue behind streamed output the client
        # is still reading; Autobahn's 1 s would abort before the client ever sees it.
        defaults = {"failByDrop": False, "closeHandshakeTimeout": CLOSE_HANDSHAKE_TIMEOUT}
        self.setProtocolOptions(**{**defaults, **options})

    def close_all(self, code: int, reason: str) -> None:
        """Close every client (used on shutdown)."""
        for client in list(self.clients):
            close_connection(client, code, reason)


def make_ws_resource(factory: ProxyFactory) -> WebSocketResource:
    """The twisted.web resource that upgrades requests to ``factory``'s protocol."""
    return WebSocketResource(factory)
