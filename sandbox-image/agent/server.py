"""The agent's listening side: ``GET /healthz`` and the WebSocket at ``/agent``.

One ``AgentHTTP`` per accepted connection reads a bounded HTTP request head, answers
``/healthz`` (no auth), or checks ``Authorization: Bearer <secret>`` and switches ``/agent``
to a WebSocket (``wsproto``), whose messages go to a ``dispatch.Connection``.  Backpressure:
when the transport's send buffer passes ``SEND_BUFFER_HIGH`` it calls ``pause_writing``,
and the connection stops reading its streamed commands' pipes until ``resume_writing``.
"""

from __future__ import annotations

import hmac
from typing import Any

from agent import log, wsproto
from agent.dispatch import Agent, Connection
from agent.files import FileRequest

#: Pause streamed commands when this much is unsent (resume at a quarter of it).
SEND_BUFFER_HIGH = 512 * 1024


class AgentHTTP:
    """One accepted connection: HTTP first, then (maybe) a WebSocket."""

    def __init__(self, agent: Agent, max_message: int) -> None:
        self.agent = agent
        self.max_message = max_message
        self.transport: Any = None
        self.head = bytearray()
        self.parser: wsproto.FrameParser | None = None
        self.conn: Connection | None = None
        self.files: FileRequest | None = None
        self.closing = False
        self.peer = "?"

    # transport protocol --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"
        transport.set_write_buffer_limits(high=SEND_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.files is not None:
            self.files.feed(data)
            return
        try:
            if self.parser is None:
                self._http(data)
            else:
                self._websocket(data)
        except wsproto.WebSocketError as e:
            log.info("closing WebSocket from %s: %s", self.peer, e.reason)
            self._close(e.code, e.reason)
        except Exception:
            log.exception("error on the connection from %s", self.peer)
            if self.parser is None:
                self._respond(500, "Internal Server Error", b"internal error\n")
            else:
                self._close(wsproto.CLOSE_INTERNAL_ERROR, "internal error")

    def pause_writing(self) -> None:
        if self.files is not None:
            self.files.pause_writing()
        if self.conn is not None:
            self.conn.set_output_paused(True)

    def resume_writing(self) -> None:
        if self.files is not None:
            self.files.resume_writing()
        if self.conn is not None:
            self.conn.set_output_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.conn is not None:
            self.conn.lost()
        if self.files is not None:
            self.files.lost()

    # HTTP -----------------------------------------------------------------------------------

    def _http(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > wsproto.MAX_REQUEST_HEAD:
                self._respond(431, "Request Header Fields Too Large", b"request too large\n")
            return
        rest = bytes(self.head[end + 4 :])
        try:
            request = wsproto.parse_request(bytes(self.head[:end]))
        except ValueError:
            self._respond(400, "Bad Request", b"bad request\n")
            return
        self.head.clear()
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            if request.method in ("GET", "HEAD"):
                self._respond(200, "OK", b"ok" if request.method == "GET" else b"")
            else:
                self._respond(405, "Method Not Allowed", b"", "Allow: GET, HEAD\r\n")
            return
        if path == "/files" or path.startswith("/files/"):
            self._file_request(request, rest)
            return
        if path != "/agent":
            self._respond(404, "Not Found", b"not found\n")
            return
        if not self._authorized(request):
            log.info("refused WebSocket from %s: bad agent secret", self.peer)
            self._respond(401, "Unauthorized", b"bad agent secret\n")
            return
        problem = wsproto.handshake_problem(request)
        if problem is not None:
            self._respond(400, "Bad Request", problem.encode() + b"\n")
            return
        self.transport.write(wsproto.switching_protocols(request.header("sec-websocket-key")))
        self.parser = wsproto.FrameParser(self.max_message)
        self.conn = self.agent.connect(self._send_text, self.peer, self._send_binary)
        log.info("connection open from %s", self.peer)
        if rest:
            self._websocket(rest)

    def _file_request(self, request: wsproto.Request, rest: bytes) -> None:
        """A file operation (``agent.files``): authenticated like the WebSocket, then served
        by a worker process running as the sandbox user."""
        if not self._authorized(request):
            log.info("refused file request from %s: bad agent secret", self.peer)
            self._respond(401, "Unauthorized", b"bad agent secret\n")
            return
        try:
            self.files = FileRequest(self, request.method, request.path, request.headers)
        except OSError as e:
            log.warn("could not start a file worker: %s", e)
            self._respond(503, "Service Unavailable", b"could not start a file worker\n")
            return
        if rest:
            self.files.feed(rest)

    def _authorized(self, request: wsproto.Request) -> bool:
        presented = request.header("authorization").strip().encode("latin-1")
        expected = b"Bearer " + self.agent.config.secret
        return hmac.compare_digest(presented, expected)

    def _respond(self, status: int, reason: str, body: bytes, extra: str = "") -> None:
        self.closing = True
        self.transport.write(wsproto.http_response(status, reason, body, extra))
        self.transport.close()

    # WebSocket ------------------------------------------------------------------------------

    def _websocket(self, data: bytes) -> None:
        assert self.parser is not None and self.conn is not None
        for event in self.parser.feed(data):
            if self.closing:
                return
            if event.opcode == wsproto.OP_TEXT:
                self.conn.handle(event.payload, False)
            elif event.opcode == wsproto.OP_BINARY:
                self.conn.handle(event.payload, True)
            elif event.opcode == wsproto.OP_PING:
                self.transport.write(wsproto.frame(wsproto.OP_PONG, event.payload))
            elif event.opcode == wsproto.OP_CLOSE:
                code, _reason = wsproto.parse_close(event.payload)
                self._close(wsproto.CLOSE_NORMAL if code == 1005 else code, "")

    def _send_text(self, payload: bytes) -> None:
        if not self.closing:
            self.transport.write(wsproto.frame(wsproto.OP_TEXT, payload))

    def _send_binary(self, payload: bytes) -> None:
        if not self.closing:
            self.transport.write(wsproto.frame(wsproto.OP_BINARY, payload))

    def _close(self, code: int, reason: str) -> None:
        """Send a close frame and close the TCP connection (the server closes first)."""
        if self.closing:
            return
        self.closing = True
        if self.conn is not None:
            self.conn.lost()
        self.transport.write(wsproto.close_frame(code, reason))
        self.transport.close()
