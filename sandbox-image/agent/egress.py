"""The egress forwarder of sandboxes created with an ``egress`` allow-list.

Such a sandbox has no network but loopback. User commands get ``HTTP_PROXY`` and
``HTTPS_PROXY`` naming ``127.0.0.1:PORT`` inside the sandbox; the agent listens there and
forwards every accepted connection, byte for byte, to the Unix socket ``AGENT_EGRESS_SOCKET``
in the directory the gateway bind-mounts into the container, where the gateway's per-sandbox
HTTP/CONNECT proxy decides what may leave (``twistedgw/egress``). The directory is the agent's
(uid 999, mode 0700): user code reaches the proxy only through this forwarder.

The forwarder does not parse anything: it pairs two ``SocketTransport`` objects and pauses
reading one side while the other's send buffer is full, so a slow reader on either end holds
at most a few hundred KiB here.
"""

from __future__ import annotations

import socket
from typing import Any

from agent import log
from agent.loop import Loop, SocketTransport

#: Port of the forwarder inside the sandbox (on 127.0.0.1 only).
DEFAULT_EGRESS_PORT = 3128
#: Connections forwarded at once; more are closed at once.
MAX_FORWARDS = 512
#: Pause the other side when this much waits to be sent (resume at a quarter).
SEND_BUFFER_HIGH = 256 * 1024
#: Kernel buffers of the Unix socket to the gateway (fewer wake-ups per MiB).
SOCKET_BUFFER = 1024 * 1024
#: Seconds a connect to the gateway's socket may take (only a full backlog makes it wait).
CONNECT_TIMEOUT = 2.0


def proxy_env(port: int) -> dict[str, str]:
    """The variables that send user commands' HTTP(S) through the forwarder."""
    url = f"http://127.0.0.1:{port}"
    no_proxy = "localhost,127.0.0.1,::1"
    return {
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


class _Leg:
    """One side of a forwarded connection (a protocol for ``SocketTransport``)."""

    def __init__(self, forwarder: EgressForwarder) -> None:
        self.forwarder = forwarder
        self.transport: Any = None
        self.other: _Leg | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=SEND_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        other, self.other = self.other, None
        if other is not None:
            other.other = None
            if other.transport is not None:
                other.transport.close()  # after what is buffered for it
            self.forwarder.active -= 1


class _Client(_Leg):
    """The user's side: on accept, opens the gateway's side or closes."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        forwarder = self.forwarder
        if forwarder.active >= MAX_FORWARDS:
            log.warn("egress: %d connections already forwarded; refusing one", MAX_FORWARDS)
            transport.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.settimeout(CONNECT_TIMEOUT)
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            upstream.connect(forwarder.socket_path)
        except OSError as e:
            upstream.close()
            log.warn("egress: cannot reach the gateway's proxy: %s", e)
            transport.close()
            return
        gateway = _Leg(forwarder)
        gateway.other, self.other = self, gateway
        forwarder.active += 1
        SocketTransport(forwarder.loop, upstream, gateway)


class EgressForwarder:
    """Accepts on 127.0.0.1:``port`` and forwards each connection to ``socket_path``."""

    def __init__(self, loop: Loop, socket_path: str) -> None:
        self.loop = loop
        self.socket_path = socket_path
        self.active = 0

    def listen(self, port: int) -> socket.socket:
        """Bind 127.0.0.1:``port`` and serve it on the loop; returns the listening socket."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self.loop.serve(sock, lambda: _Client(self))
        return sock


def start(loop: Loop, socket_path: str | None, port: int) -> socket.socket | None:
    """Start the forwarder when the gateway gave this sandbox an egress socket."""
    if not socket_path:
        return None
    try:
        sock = EgressForwarder(loop, socket_path).listen(port)
    except OSError as e:
        log.error("egress: cannot listen on 127.0.0.1:%d: %s", port, e)
        return None
    log.info("egress: forwarding 127.0.0.1:%d to %s", port, socket_path)
    return sock
