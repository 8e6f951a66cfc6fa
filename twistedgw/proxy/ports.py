"""Port previews: HTTP and WebSocket requests to a server inside a sandbox.

``/sandboxes/{id}/ports/{port}/...`` (with the API token) and signed
``/previews/{id}/{port}/{expiry}/{signature}/...`` URLs reach ``127.0.0.1:{port}`` inside
the sandbox through its agent, never through the container's network (so a sandbox without
one works too):

1. the edge (``twistedgw.web.site``) sees the request line and headers, before any body
   byte, and hands the request to ``PreviewRoutes.begin``, which authenticates it, finds the
   sandbox and checks the port;
2. a ``PreviewTunnel`` opens a connection of its own to the agent (its loopback TCP port or
   its Unix socket), asks for ``GET /tunnel/{port}`` with ``Upgrade: twistedgw-tunnel``
   (PROTOCOL.md), and on ``101`` sends the client's request head, rewritten
   (``upstream_head``), then relays bytes: the request body as the client sends it, the
   server's answer after its head is filtered (``downstream_head``). A ``101`` from the
   server (a WebSocket) turns both ways into raw bytes until one side closes.

Each direction is paired with the other's backpressure (``pair_flow``): a client that reads
slowly stops the gateway reading from the agent, so a large download holds a few hundred KiB
here, never the file. One request per client connection (the server is asked to close after
it; so is the client).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from attrs import frozen
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import _ChunkedTransferDecoder

from twistedgw.proxy.flow import pair_flow, unpair_flow
from twistedgw.runtime.hardening import AGENT_PORT, EGRESS_PORT
from twistedgw.sandbox import Sandbox
from twistedgw.web.auth import QUERY_PARAMETER

#: Ports never previewed, whatever ``--preview-ports`` says: the agent's own and the egress
#: forwarder's (the agent refuses them too).
RESERVED_PORTS = frozenset({AGENT_PORT, EGRESS_PORT})
#: ``--preview-ports`` default: every unprivileged port.
DEFAULT_PREVIEW_PORTS = "1024-65535"
#: Signed URLs: default and largest lifetime, in seconds.
DEFAULT_URL_TTL = 3600
MAX_URL_TTL = 7 * 86400
#: Largest response head accepted from a server in a sandbox.
MAX_HEAD = 64 * 1024
#: The agent's ``Upgrade`` token for tunnels.
TUNNEL_UPGRADE = b"twistedgw-tunnel"

#: ``/sandboxes/{id}/ports/{port}`` and what follows.
TOKEN_PATH = re.compile(rb"/sandboxes/([^/]+)/ports/([0-9]{1,5})(/.*)?", re.DOTALL)
#: ``/previews/{id}/{port}/{expiry}/{signature}`` and what follows.
SIGNED_PATH = re.compile(
    rb"/previews/([^/]+)/([0-9]{1,5})/([0-9]{1,12})/([A-Za-z0-9_-]{1,64})(/.*)?", re.DOTALL
)
#: The signed-URL route (an API route, not proxied).
URL_ROUTE = re.compile(rb"/sandboxes/[^/]+/ports/[0-9]{1,5}/url/?")

#: Request headers never passed to the sandbox (hop-by-hop, or the gateway's own).
_REQUEST_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
        b"authorization",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-prefix",
    }
)
#: Response headers never passed to the client (hop-by-hop; the gateway sets its own).
_RESPONSE_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"upgrade",
        b"content-security-policy",
    }
)
#: Every preview page is sandboxed (an opaque origin): it is served from the gateway's
#: origin, and must not read what other pages there keep (the console's token).
PREVIEW_CSP = (
    b"sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads "
    b"allow-popups-to-escape-sandbox"
)


# -- --preview-ports -------------------------------------------------------------------------


@frozen
class PortSet:
    """The ports previews may reach: inclusive ranges."""

    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, port: object) -> bool:
        return (
            isinstance(port, int)
            and port not in RESERVED_PORTS
            and any(low <= port <= high for low, high in self.ranges)
        )

    def describe(self) -> str:
        return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ranges)


def parse_ports(text: str) -> PortSet:
    """``--preview-ports``: a comma list of ports and ranges (``3000,8000-8999``); raises
    ``ValueError`` with what is wrong."""
    ranges: list[tuple[int, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"([0-9]{1,5})(?:\s*-\s*([0-9]{1,5}))?", item)
        if match is None:
            raise ValueError(f"{item!r} is not a port or a range of ports (like 8000-8999)")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) else low
        if not 1 <= low <= 65535 or not 1 <= high <= 65535:
            raise ValueError(f"{item!r}: ports are 1 to 65535")
        if low > high:
            raise ValueError(f"{item!r}: a range goes from low to high")
        ranges.append((low, high))
    if not ranges:
        raise ValueError("no ports given")
    return PortSet(tuple(sorted(ranges)))


# -- signed URLs -----------------------------------------------------------------------------


def load_key(path: Path) -> bytes:
    """The signing key in ``path``: 32 random bytes, created (mode 0600) the first time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"preview key {path} is shorter than 32 bytes") from None
        return key
    key = os.urandom(32)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


class URLSigner:
    """HMAC-SHA256 signatures of (sandbox id, port, expiry) with the server's key."""

    def __init__(self, key: bytes, now: Callable[[], float]) -> None:
        self._key = key
        self._now = now

    def signature(self, sandbox_id: str, port: int, expiry: int) -> str:
        message = f"twistedgw-preview\n{sandbox_id}\n{port}\n{expiry}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def path(self, sandbox_id: str, port: int, ttl: float) -> tuple[str, int]:
        """The signed path prefix (ending in ``/``) valid for ``ttl`` seconds, and its
        expiry (Unix seconds)."""
        expiry = int(self._now() + ttl)
        signature = self.signature(sandbox_id, port, expiry)
        return f"/previews/{sandbox_id}/{port}/{expiry}/{signature}/", expiry

    def valid(self, sandbox_id: str, port: int, expiry: int, signature: str) -> bool:
        """Whether ``signature`` is ours for these values (compared in constant time) and
        ``expiry`` is still ahead."""
        expected = self.signature(sandbox_id, port, expiry)
        good = hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii"))
        return good and self._now() < expiry


# -- headers ---------------------------------------------------------------------------------


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens |= {t.strip().lower() for t in value.split(b",") if t.strip()}
    return tokens


def is_upgrade(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request asks to switch protocols (a WebSocket, most likely)."""
    headers = list(headers)
    return b"upgrade" in _connection_tokens(headers) and any(
        name.lower() == b"upgrade" for name, _ in headers
    )


def strip_token(query: bytes) -> bytes:
    """A query string without the gateway's ``access_token`` parameter."""
    if QUERY_PARAMETER.encode() not in query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k != QUERY_PARAMETER.encode()]
    return urlencode(kept).encode("ascii")


def upstream_head(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    port: int,
    client_ip: str,
    host: bytes | None,
    prefix: bytes,
    proto: bytes = b"http",
) -> bytes:
    """The request head sent to the server in the sandbox: hop-by-hop headers, the gateway's
    ``Authorization`` and any ``Forwarded``/``X-Forwarded-*`` dropped; ``Host`` naming the
    server; ``X-Forwarded-For/Host/Proto/Prefix`` set; ``Connection: close``, or
    ``Connection: Upgrade`` with the client's ``Upgrade`` for a protocol switch."""
    headers = list(headers)
    named = _connection_tokens(headers)
    upgrade = is_upgrade(headers)
    lines = [b"%s %s %s" % (method, target, version), b"Host: 127.0.0.1:%d" % port]
    for name, value in headers:
        lower = name.lower()
        if lower in _REQUEST_DROPPED or lower in named:
            continue
        lines.append(name + b": " + value)
    if upgrade:
        for name, value in headers:
            if name.lower() == b"upgrade":
                lines.append(b"Upgrade: " + value)
        lines.append(b"Connection: Upgrade")
    else:
        lines.append(b"Connection: close")
    lines.append(b"X-Forwarded-For: " + client_ip.encode("ascii", "replace"))
    if host:
        lines.append(b"X-Forwarded-Host: " + host)
    lines.append(b"X-Forwarded-Proto: " + proto)
    lines.append(b"X-Forwarded-Prefix: " + prefix)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def downstream_head(head: bytes) -> tuple[int, bytes]:
    """The status and filtered form of a response head from the server (without its blank
    line): hop-by-hop headers dropped; ``Connection: close`` (or ``Upgrade`` with the
    server's ``Upgrade`` for a 101); the preview's ``Content-Security-Policy``. Raises
    ``ValueError`` for what is not an HTTP response head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("not an HTTP response")
    status = int(parts[1])
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError("malformed response header")
        headers.append((name, value.strip()))
    named = _connection_tokens(headers)
    out = [lines[0]]
    for name, value in headers:
        lower = name.lower()
        if lower in _RESPONSE_DROPPED or lower in named:
            continue
        out.append(name + b": " + value)
    if status == 101:
        for name, value in headers:
            if name.lower() == b"upgrade":
                out.append(b"Upgrade: " + value)
        out.append(b"Connection: Upgrade")
    elif status >= 200:
        out.append(b"Content-Security-Policy: " + PREVIEW_CSP)
        out.append(b"Connection: close")
    return status, b"\r\n".join(out) + b"\r\n\r\n"


# -- request bodies --------------------------------------------------------------------------


class BodyEnd:
    """Where a client's request body ends, so that nothing after it (a pipelined request,
    with its own headers) reaches the sandbox: ``take(data)`` returns the part of ``data``
    that is still body. An upgrade request has no end: everything after it is the new
    protocol's."""

    def __init__(self, length: int | None, chunked: bool, upgrade: bool) -> None:
        self.done = False
        self._open = upgrade
        self._left = 0 if length is None else length
        self._chunked: _ChunkedTransferDecoder | None = None
        self._extra: bytes | None = None
        if chunked and not upgrade:
            self._chunked = _ChunkedTransferDecoder(lambda _data: None, self._finished)
        elif not upgrade and not self._left:
            self.done = True

    def _finished(self, extra: bytes) -> None:
        self._extra = extra

    def take(self, data: bytes) -> bytes:
        if self._open:
            return data
        if self.done:
            return b""
        if self._chunked is not None:
            self._chunked.dataReceived(data)
            if self._extra is None:
                return data
            self.done = True
            return data[: len(data) - len(self._extra)]
        part = data[: self._left]
        self._left -= len(part)
        self.done = self._left == 0
        return part


# -- the tunnel ------------------------------------------------------------------------------


class PreviewTunnel:
    """One proxied request: the client's channel (whose transport this takes over) and a
    connection to the sandbox's agent."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        channel: Any,
        sandbox: Sandbox,
        port: int,
        head: bytes,
        body: BodyEnd,
        touch: Callable[[], None],
        label: str = "",
        connect_timeout: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.channel = channel
        self.client = channel.transport
        self.sandbox = sandbox
        self.port = port
        self.head = head
        self.body = body
        self.touch = touch
        #: What the log line says the request was (method and path, never a signature).
        self.label = label
        self.sent = 0
        self.received = 0
        self.status = 0
        self.pending: list[bytes] = []
        self.agent: _AgentSide | None = None
        self.client_gone = False
        self.client.pauseProducing()
        if sandbox.agent_socket:
            endpoint: Any = UNIXClientEndpoint(
                reactor, sandbox.agent_socket, timeout=int(connect_timeout)
            )
        else:
            endpoint = TCP4ClientEndpoint(
                reactor, sandbox.agent_host, sandbox.agent_port, timeout=int(connect_timeout)
            )
        d = connectProtocol(endpoint, _AgentSide(self))
        d.addErrback(self._unreachable)

    def _unreachable(self, failure: Failure) -> None:
        self._log.info(
            "preview of {id}:{port}: agent unreachable: {why}",
            id=self.sandbox.sandbox_id,
            port=self.port,
            why=failure.getErrorMessage(),
        )
        self.fail(502, "sandbox agent unreachable")

    def fail(self, status: int, message: str) -> None:
        """Answer the client with a JSON error (only before any of the server's answer)."""
        if not self.client_gone:
            self.status = self.status or status
            self.channel.refuse(status, message)

    # -- the client's side (the channel calls these) --------------------------------------

    def client_data(self, data: bytes) -> None:
        data = self.body.take(data)
        if not data:
            return
        self.touch()
        self.sent += len(data)
        if self.agent is not None and self.agent.open:
            self.agent.transport.write(data)  # type: ignore[union-attr]
        else:
            self.pending.append(data)

    def client_lost(self) -> None:
        self.client_gone = True
        if self.agent is not None and self.agent.transport is not None:
            unpair_flow(self.agent.transport)
            self.agent.transport.loseConnection()

    # -- the agent's side ------------------------------------------------------------------

    def opened(self, agent: _AgentSide) -> None:
        """The agent's ``101``: send the request and what the client sent so far."""
        assert agent.transport is not None
        if self.client_gone:
            agent.transport.loseConnection()
            return
        agent.transport.write(self.head + b"".join(self.pending))
        self.pending.clear()
        pair_flow(self.client, agent.transport)
        pair_flow(agent.transport, self.client)
        self.client.resumeProducing()

    def to_client(self, data: bytes) -> None:
        if not self.client_gone:
            self.touch()
            self.received += len(data)
            self.client.write(data)

    def agent_lost(self) -> None:
        if not self.client_gone and not self.channel.refused:
            unpair_flow(self.client)
            self.client.loseConnection()
        self.touch()
        # The access log never sees a tunnelled request (twisted.web does not finish it).
        self._log.info(
            "preview {sandbox}:{port} {label} {status}: {up} bytes up, {down} bytes down",
            sandbox=self.sandbox.sandbox_id,
            port=self.port,
            label=self.label,
            status=self.status or "-",
            up=self.sent,
            down=self.received,
        )


class _AgentSide(Protocol):
    """The connection to the agent: the tunnel request, the agent's answer, then the
    server's answer (its head filtered), then bytes."""

    def __init__(self, tunnel: PreviewTunnel) -> None:
        self.tunnel = tunnel
        self.buffer = bytearray()
        self.state = "agent"  # then "head", then "raw"
        self.open = False
        self.status = 0

    def connectionMade(self) -> None:
        tunnel = self.tunnel
        tunnel.agent = self
        assert self.transport is not None
        secret = tunnel.sandbox.agent_secret.encode()
        self.transport.write(
            b"GET /tunnel/%d HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer %s\r\n"
            b"Connection: Upgrade\r\nUpgrade: %s\r\n\r\n" % (tunnel.port, secret, TUNNEL_UPGRADE)
        )

    def dataReceived(self, data: bytes) -> None:
        if self.state == "raw":
            self.tunnel.to_client(data)
            return
        self.buffer += data
        if self.state == "agent":
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            parts = status_line.split(b" ", 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            if self.status != 101:
                self.state = "refused"  # the rest of the answer comes, then the close
                return
            del self.buffer[: end + 4]
            self.state = "head"
            self.open = True
            self.tunnel.opened(self)
        while self.state == "head":
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._bad("the server's answer head is too large")
                return
            try:
                status, head = downstream_head(bytes(self.buffer[:end]))
            except ValueError:
                self._bad("the server did not answer with HTTP")
                return
            self.tunnel.status = status
            del self.buffer[: end + 4]
            self.tunnel.to_client(head)
            if status == 101 or status >= 200:
                self.state = "raw"
        if self.state == "raw" and self.buffer:
            rest, self.buffer = bytes(self.buffer), bytearray()
            self.tunnel.to_client(rest)

    def _bad(self, message: str) -> None:
        self.state = "bad"
        self.tunnel.fail(502, message)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        tunnel = self.tunnel
        if self.state == "refused":
            tunnel.fail(self.status or 502, _agent_error(bytes(self.buffer)))
        elif self.state == "agent":
            tunnel.fail(502, "the sandbox agent closed the connection")
        elif self.state == "head":
            tunnel.fail(502, f"the server on port {tunnel.port} closed without answering")
        tunnel.agent_lost()


def _agent_error(answer: bytes) -> str:
    import json

    body = answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else "the sandbox agent refused the tunnel"
