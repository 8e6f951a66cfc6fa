"""The per-sandbox egress proxy: HTTP forward proxy and CONNECT tunnels, by allow-list.

One ``EgressProxyFactory`` per sandbox listens on a Unix socket in that sandbox's socket
directory; the agent forwards the sandbox's proxy port to it (``sandbox-image/agent/egress.py``).
Each connection carries one request:

* ``CONNECT host:port`` opens a tunnel (HTTPS; the proxy never sees inside it);
* ``GET http://host[:port]/path`` (any method, absolute URI) is sent on in origin form with
  ``Connection: close``, and the rest of the connection is carried as it is.

Decisions, in order: the name and port must match the sandbox's patterns (and the server's
list, if any); the proxy resolves the name itself (``IEgressResolver``); every address must
pass the address rule (no loopback, link-local, private, multicast or reserved address unless
``--egress-allow-cidr`` allows its range); then it connects to the checked address, never to
the name. Anything refused gets ``403`` and a one-line reason, and nothing is connected.

Both directions are paired as producer and consumer: a slow reader on either side pauses
reading on the other, so a stalled client holds at most a transport buffer here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedgw import metrics
from twistedgw.egress.policy import (
    Decision,
    EgressPolicy,
    HostPattern,
    decide_name,
    normalize_host,
    parse_patterns,
    refused_address,
)
from twistedgw.egress.resolver import IEgressResolver

#: Largest request head (request line and headers) accepted.
MAX_HEAD = 16 * 1024
#: Seconds a client has to send its request head.
HEAD_TIMEOUT = 30.0
#: Seconds for resolving a name and for connecting to its address.
RESOLVE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
#: Connections at once through one sandbox's proxy; beyond it: 503.
MAX_CONNECTIONS = 512
#: Read size and write buffer (before the other side is paused) of each side of a transfer.
TRANSFER_BUFFER = 256 * 1024
#: Kernel send buffer of the Unix socket to the agent.
SOCKET_BUFFER = 1024 * 1024
#: Request headers that are the proxy's, not the destination's.
_HOP_HEADERS = frozenset(
    {b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive", b"te"}
)

#: ``connect(address, port, protocol)`` opens a TCP connection for ``protocol``.
Connector = Callable[[str, int, Protocol], Deferred[Any]]


@frozen
class Logged:
    """One decision as the proxy logged it (kept in ``EgressProxyFactory.decisions``)."""

    host: str
    port: int
    allowed: bool
    reason: str
    address: str = ""


class EgressProxyFactory(Factory):
    """The egress proxy of one sandbox.

    :param sandbox_id: for the decision log.
    :param patterns: the sandbox's allow-list (normal form, ``host:port``).
    :param policy: the operator's egress settings.
    :param resolver: names to addresses.
    :param reactor: for timeouts and (by default) connecting.
    :param connect: opens TCP connections (tests record or fake them).
    """

    _log = Logger()
    #: One line per decision is logged instead of Twisted's per-factory start/stop lines.
    noisy = False

    def __init__(
        self,
        sandbox_id: str,
        patterns: tuple[str, ...] | list[str],
        policy: EgressPolicy,
        resolver: IEgressResolver,
        reactor: Any,
        connect: Connector | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.patterns: tuple[HostPattern, ...] = parse_patterns(patterns)
        self.policy = policy
        self.resolver = resolver
        self.reactor = reactor
        self.connect = connect or connect_tcp(reactor)
        self.connections: set[EgressProxy] = set()
        #: The latest decisions (tests and debugging; the log has them all).
        self.decisions: deque[Logged] = deque(maxlen=256)

    def buildProtocol(self, addr: Any) -> EgressProxy:
        return EgressProxy(self)

    def record(self, decision: Logged, kind: str) -> None:
        self.decisions.append(decision)
        metrics.EGRESS_DECISIONS.labels(
            decision="allowed" if decision.allowed else "refused", reason=kind
        ).inc()
        if not decision.allowed:
            self._log.info(
                "egress {sandbox_id}: refused {host}:{port}: {reason}",
                sandbox_id=self.sandbox_id,
                host=decision.host,
                port=decision.port,
                reason=decision.reason,
            )

    def close_all(self) -> None:
        """Drop every connection (the sandbox is going away)."""
        for connection in list(self.connections):
            connection.abort()


def connect_tcp(reactor: Any) -> Connector:
    """The real connector: TCP to ``address`` (an IP address, never a name)."""

    def connect(address: str, port: int, protocol: Protocol) -> Deferred[Any]:
        endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint = endpoint_type(reactor, address, port, timeout=CONNECT_TIMEOUT)
        return endpoint.connect(_OneUpstream(protocol))

    return connect


def loopback_only(connect: Connector) -> Connector:
    """``connect``, refusing (without a packet) any address but loopback: the guard a gateway
    under test runs with (``TWISTEDGW_EGRESS_TEST_HOSTS``), so that even a broken address
    rule cannot send test traffic off this machine."""

    def guarded(address: str, port: int, protocol: Protocol) -> Deferred[Any]:
        if not ipaddress.ip_address(address).is_loopback:
            return fail(ConnectionRefusedError(f"test gateway: no connects to {address}"))
        return connect(address, port, protocol)

    return guarded


class _OneUpstream(Factory):
    """Builds the one upstream protocol of a connection (quietly, unlike connectProtocol)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


class _Upstream(Protocol):
    """The destination's side of an allowed connection."""

    transport: Any

    def __init__(self, proxy: EgressProxy) -> None:
        self.proxy = proxy

    def dataReceived(self, data: bytes) -> None:
        self.proxy.down += len(data)
        metrics.EGRESS_BYTES.labels(direction="down").inc(len(data))
        self.proxy.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.proxy.upstream_lost()


class EgressProxy(Protocol):
    """One connection from a sandbox: one request head, a decision, then bytes both ways."""

    transport: Any

    def __init__(self, factory: EgressProxyFactory) -> None:
        self.factory = factory
        self.head = bytearray()
        self.pending: list[bytes] = []
        self.decided = False
        self.upstream: _Upstream | None = None
        self.closed = False
        self.host = ""
        self.port = 0
        self.address = ""
        self.method = b""
        self.forward_head = b""
        self.up = 0
        self.down = 0
        self._timer: Any = None
        self._waiting: Deferred[Any] | None = None

    # -- connection ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        if len(self.factory.connections) > MAX_CONNECTIONS:
            self._answer(503, "Service Unavailable", "too many egress connections at once")
            return
        self._timer = self.factory.reactor.callLater(HEAD_TIMEOUT, self._head_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        if self.upstream is not None:
            self.up += len(data)
            metrics.EGRESS_BYTES.labels(direction="up").inc(len(data))
            transport = self.upstream.transport
            assert transport is not None
            transport.write(data)
            return
        if self.decided:
            self.pending.append(data)  # reading is paused; at most one read's worth
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        # The head so far, or the whole head when it is complete (even in one read).
        if (len(self.head) if end < 0 else end + 4) > MAX_HEAD:
            self._answer(431, "Request Header Fields Too Large", "request head too large")
            return
        if end < 0:
            return
        head, rest = bytes(self.head[: end + 4]), bytes(self.head[end + 4 :])
        self.head = bytearray()
        if rest:
            self.pending.append(rest)
        self.decided = True
        self._cancel_timer()
        self.transport.pauseProducing()
        try:
            self._request(head)
        except _BadRequest as e:
            self._answer(400, "Bad Request", str(e))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.factory.connections.discard(self)
        self._cancel_timer()
        if self._waiting is not None:
            self._waiting.cancel()
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.loseConnection()
            self._log_done()

    def abort(self) -> None:
        self.transport.abortConnection()

    def upstream_lost(self) -> None:
        if self.upstream is None:
            return
        self.upstream = None
        self._log_done()
        if not self.closed:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    # -- the request ---------------------------------------------------------------------

    def _request(self, head: bytes) -> None:
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _BadRequest("not an HTTP/1.x proxy request")
        method, target, version = parts
        self.method = method
        try:
            target_text = target.decode("ascii")
        except UnicodeDecodeError:
            raise _BadRequest("request target is not ASCII") from None
        if method == b"CONNECT":
            self.host, self.port = _authority(target_text, default_port=None)
            self.forward_head = b""
        else:
            url = urlsplit(target_text)
            if url.scheme != "http" or not url.netloc:
                raise _BadRequest("only http:// URLs and CONNECT go through this proxy")
            self.host, self.port = _authority(url.netloc.rpartition("@")[2], default_port=80)
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            headers = [
                line
                for line in lines[1:]
                if line.split(b":", 1)[0].strip().lower() not in _HOP_HEADERS
            ]
            self.forward_head = (
                b"\r\n".join([b" ".join([method, path.encode("ascii"), version]), *headers])
                + b"\r\nConnection: close\r\n\r\n"
            )
        decision = decide_name(self.factory.patterns, self.factory.policy, self.host, self.port)
        self.host = normalize_host(self.host)
        if not decision.allowed:
            self._refuse(decision)
            return
        if _is_ip(self.host):
            self._resolved([self.host])
            return
        d = self.factory.resolver.resolve(self.host, self.port)
        d.addTimeout(RESOLVE_TIMEOUT, self.factory.reactor)
        self._waiting = d
        d.addCallbacks(self._resolved, self._resolve_failed)

    def _resolve_failed(self, failure: Failure) -> None:
        self._waiting = None
        if not self.closed:
            # addTimeout's TimeoutError prints as "(10.0, 'Deferred')": say what happened.
            why = "timed out" if failure.check(DeferredTimeout) else failure.getErrorMessage()
            reason = f"cannot resolve {self.host}: {why or 'timed out'}"
            self._answer(502, "Bad Gateway", reason)

    def _resolved(self, addresses: list[str]) -> None:
        self._waiting = None
        if self.closed:
            return
        if not addresses:
            self._answer(502, "Bad Gateway", f"{self.host} has no address")
            return
        for address in addresses:
            refused = refused_address(address, self.factory.policy)
            if refused is not None:
                reason = f"{self.host} resolves to a {refused}, which egress does not allow"
                self._refuse(Decision(False, reason, "address"), address)
                return
        self.address = addresses[0]
        self.factory.record(Logged(self.host, self.port, True, "allowed", self.address), "allowed")
        upstream = _Upstream(self)
        d = self.factory.connect(self.address, self.port, upstream)
        self._waiting = d
        d.addCallbacks(lambda _: self._connected(upstream), self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self._waiting = None
        if not self.closed:
            reason = f"cannot connect to {self.host}:{self.port}: {failure.getErrorMessage()}"
            self._answer(502, "Bad Gateway", reason)

    def _connected(self, upstream: _Upstream) -> None:
        self._waiting = None
        if self.closed:
            if upstream.transport is not None:
                upstream.transport.loseConnection()
            return
        self.upstream = upstream
        upstream_transport = upstream.transport
        assert upstream_transport is not None
        if self.method == b"CONNECT":
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            self.up += len(self.forward_head)
            metrics.EGRESS_BYTES.labels(direction="up").inc(len(self.forward_head))
            upstream_transport.write(self.forward_head)
        pending, self.pending = self.pending, []
        for chunk in pending:
            self.dataReceived(chunk)
        # Twisted reads and buffers in bufferSize units (64 KiB): larger ones cut the
        # pause/resume churn of a bulk transfer to a quarter (BENCHMARKS.md, egress).
        self.transport.bufferSize = upstream_transport.bufferSize = TRANSFER_BUFFER
        # Fewer wake-ups per MiB on the hop to the agent: a bigger kernel buffer on it.
        with contextlib.suppress(AttributeError, OSError):
            self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        # Backpressure both ways: each side pauses the other while its buffer is full.
        upstream_transport.registerProducer(self.transport, True)
        self.transport.registerProducer(upstream_transport, True)
        self.transport.resumeProducing()

    # -- answers -------------------------------------------------------------------------

    def _refuse(self, decision: Decision, address: str = "") -> None:
        self.factory.record(
            Logged(self.host, self.port, False, decision.reason, address), decision.kind
        )
        self._answer(403, "Forbidden", f"egress refused: {decision.reason}")

    def _answer(self, status: int, phrase: str, line: str) -> None:
        """Answer with ``status`` and a one-line body, and close."""
        if self.closed:
            return
        self._cancel_timer()
        body = line.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + b"\n"
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
        )
        self.transport.write(head % (status, phrase.encode(), len(body)) + body)
        self.transport.loseConnection()
        self.closed = True

    def _head_timed_out(self) -> None:
        self._timer = None
        self._answer(408, "Request Timeout", "no complete request head in time")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _log_done(self) -> None:
        self.factory._log.info(
            "egress {sandbox_id}: allowed {method} {host}:{port} via {address}: "
            "{up} bytes up, {down} bytes down",
            sandbox_id=self.factory.sandbox_id,
            method=self.method.decode("ascii", "replace"),
            host=self.host,
            port=self.port,
            address=self.address,
            up=self.up,
            down=self.down,
        )


class _BadRequest(Exception):
    pass


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _authority(text: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of a request target."""
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _BadRequest("bad IPv6 literal")
        host, port_text = text[1:close], text[close + 1 :].removeprefix(":")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not port_text:
        if default_port is None:
            raise _BadRequest("CONNECT needs host:port")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise _BadRequest("bad port")
    return host, int(port_text)
