"""Port tunnels: ``GET /tunnel/{port}`` with ``Upgrade: twistedgw-tunnel`` (see PROTOCOL.md).

The gateway's port previews (``/sandboxes/{id}/ports/{port}/...`` and signed
``/previews/...`` URLs) reach a server listening on ``127.0.0.1:{port}`` inside the sandbox
through the agent, so they work without a network: the gateway opens a connection of its
own to the agent (TCP or the agent's Unix socket, authenticated with the agent secret), asks
for a tunnel, and once the agent answers ``101 Switching Protocols`` the connection carries
raw bytes both ways between the gateway and the in-sandbox server. The agent parses nothing
after the 101.

The connect to ``127.0.0.1:{port}`` is non-blocking (the loop waits for it to complete);
nothing listening there is ``502``, a connect that takes longer than ``CONNECT_TIMEOUT`` is
``504``. The agent's own port and the egress forwarder's port are refused (``403``) whatever
the gateway asks. Each direction holds at most ``SEND_BUFFER_HIGH`` unsent bytes: past that,
the other side stops being read until the buffer drains to a quarter.
"""

from __future__ import annotations

import errno
import json
import socket
from typing import Any

from agent import log
from agent.loop import Loop, SocketTransport

#: The ``Upgrade`` token of a tunnel request.
UPGRADE = "twistedgw-tunnel"
#: Pause the other side when this much waits to be sent (resume at a quarter).
SEND_BUFFER_HIGH = 512 * 1024
#: Seconds a connect to the in-sandbox server may take.
CONNECT_TIMEOUT = 5.0
#: Tunnels open at once; more are answered 503.
MAX_TUNNELS = 256


def parse_port(path: str) -> int | None:
    """The port of a ``/tunnel/{port}`` path, or None when it names none (1-65535)."""
    text = path[len("/tunnel/") :]
    if not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def answer(status: int, reason: str, error: str) -> bytes:
    """A complete HTTP answer with a JSON ``{"error": ...}`` body."""
    body = json.dumps({"error": error}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


SWITCHING = (
    f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {UPGRADE}\r\nConnection: Upgrade\r\n\r\n"
).encode()


class _Server:
    """The in-sandbox server's side of a tunnel (a protocol for ``SocketTransport``)."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def connection_made(self, transport: Any) -> None:
        transport.set_write_buffer_limits(high=SEND_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        self.tunnel.gateway.write(data)

    def pause_writing(self) -> None:
        self.tunnel.gateway.pause_reading()

    def resume_writing(self) -> None:
        self.tunnel.gateway.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.server_lost()


class Tunnel:
    """One tunnel: the gateway's connection (already accepted, its request read) and the
    connection to ``127.0.0.1:port``, once made.

    ``AgentHTTP`` hands the gateway side's events here (``data_received``,
    ``pause_writing``, ``resume_writing``, ``connection_lost``) once it saw a tunnel request.
    """

    active = 0

    def __init__(self, loop: Loop, gateway: Any, port: int, refused: frozenset[int]) -> None:
        self.loop = loop
        self.gateway = gateway
        self.port = port
        self.server: SocketTransport | None = None
        self.pending = bytearray()
        self.closed = False
        self._sock: socket.socket | None = None
        self._timer: Any = None
        gateway.set_write_buffer_limits(high=SEND_BUFFER_HIGH)
        if port in refused:
            self._fail(403, "Forbidden", f"port {port} is the agent's own; it cannot be previewed")
            return
        if Tunnel.active >= MAX_TUNNELS:
            self._fail(503, "Service Unavailable", "too many port tunnels open")
            return
        Tunnel.active += 1
        self._counted = True
        self._connect()

    _counted = False

    # connecting ----------------------------------------------------------------------------

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", self.port))
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            self._refused(code)
            return
        self._sock = sock
        self.gateway.pause_reading()
        self.loop.add_writer(sock.fileno(), self._connected)
        self._timer = self.loop.call_later(CONNECT_TIMEOUT, self._timed_out)

    def _connected(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self.loop.remove_writer(sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code != 0:
            sock.close()
            self._refused(code)
            return
        if self.closed:
            sock.close()
            self._release()
            return
        self.gateway.write(SWITCHING)
        self.server = SocketTransport(self.loop, sock, _Server(self))
        if self.pending:
            self.server.write(bytes(self.pending))
            self.pending.clear()
        self.gateway.resume_reading()
        log.debug("tunnel to 127.0.0.1:%d open", self.port)

    def _timed_out(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self.loop.remove_writer(sock.fileno())
        sock.close()
        self._fail(504, "Gateway Timeout", f"connecting to port {self.port} timed out")

    def _refused(self, code: int) -> None:
        reason = errno.errorcode.get(code, str(code))
        self._fail(502, "Bad Gateway", f"nothing listens on port {self.port} ({reason})")

    def _fail(self, status: int, reason: str, error: str) -> None:
        self._release()
        self.closed = True
        self.gateway.write(answer(status, reason, error))
        self.gateway.close()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            Tunnel.active -= 1

    # the gateway's side --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.server is not None:
            self.server.write(data)
        elif not self.closed:
            # (Only before the 101: the gateway sends nothing until it has it.)
            self.pending += data

    def pause_writing(self) -> None:
        if self.server is not None:
            self.server.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None:
            self.server.resume_reading()

    def connection_lost(self) -> None:
        """The gateway's connection closed: close the server's after what it has buffered."""
        self.closed = True
        if self._sock is not None:
            self.loop.remove_writer(self._sock.fileno())
            self._sock.close()
            self._sock = None
            if self._timer is not None:
                self._timer.cancel()
        if self.server is not None:
            self.server.close()
        self._release()

    def server_lost(self) -> None:
        """The in-sandbox server closed: close the gateway's after what it has buffered."""
        self._release()
        self.gateway.close()
