"""The HTTP site: what a request must get past before any route runs, and ``make_site``.

twisted.web reads a whole request body (to memory or a temp file) before the resource sees
the request, and keeps an idle connection for hours. This module decides from the request
line and headers alone (``Request.gotLength``, which ``HTTPChannel.allHeadersReceived`` calls
before the first body byte) whether the request may go on:

- ``Host`` must name this gateway (DNS rebinding), and an ``Origin``, when a browser sends
  one, must be the gateway's own or an allowed one (cross-site pages);
- ``Authorization`` and ``Idempotency-Key`` must be UTF-8, and on a token gateway the token
  must be valid, before any body byte is read (401);
- a body may be at most its route's cap (413 as soon as ``Content-Length`` says more, or as
  soon as a chunked body passes the cap), JSON bodies must say ``application/json`` (415),
  and it must arrive within ``body_timeout`` seconds (408);
- at most ``max_connections`` HTTP connections are open at once (503 beyond; upgraded
  WebSockets count against the proxy's own cap instead), and idle ones are dropped.

A refused request gets a JSON answer and the connection is closed; nothing after the headers
is buffered or parsed.

Streamed bodies (the hook): every route's body has a ``BodyRule``. A rule with
``limit=None`` marks a streamed upload: the edge then checks only the headers (host, origin,
token) and leaves the body to Twisted's spooling ``content`` file, without a cap. A route that
streams (``PUT /sandboxes/{id}/files``, say) adds a rule to ``BODY_RULES`` and, to avoid the
spool, sets ``GatewayRequest.body_sink`` in ``EdgePolicy.on_streamed`` to an object with
``write(bytes)``; each chunk then goes there as it arrives.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable, Iterable
from io import BytesIO
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote_to_bytes

from attrs import evolve, field, frozen
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from twistedgw.metrics import CONTENT_TYPE, GatewayMetrics
from twistedgw.web.auth import QUERY_PARAMETER, Authenticator, Unauthorized
from twistedgw.web.previews import is_preview
from twistedgw.web.requests import MAX_BODY_BYTES

if TYPE_CHECKING:
    from twistedgw.web.api import GatewayAPI

#: Paths served without a token (the edge checks no token for them).
PUBLIC_PATHS = frozenset({b"/healthz", b"/openapi.json"})
#: Host names a gateway bound to loopback answers to (any port).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: Bytes a refused client may still send (and we discard) before we stop waiting for it to
#: read our answer; and the seconds we wait.
LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 2.0

_STATUS_TEXT = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    421: b"Misdirected Request",
    409: b"Conflict",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@frozen
class BodyRule:
    """How much body a route takes: ``limit`` bytes (``None``: streamed, no cap), and whether
    it is JSON (then ``Content-Type: application/json`` is required for a non-empty body)."""

    method: bytes
    path: re.Pattern[bytes]
    limit: int | None
    json: bool = True


#: Routes that take a body; every other request may carry none (413 otherwise).
BODY_RULES: tuple[BodyRule, ...] = (
    BodyRule(b"POST", re.compile(rb"/sandboxes/?"), MAX_BODY_BYTES),
    BodyRule(b"POST", re.compile(rb"/sandboxes/[^/]+/keepalive/?"), MAX_BODY_BYTES),
    BodyRule(b"POST", re.compile(rb"/sandboxes/[^/]+/ports/[0-9]+/url/?"), MAX_BODY_BYTES),
    # File uploads stream to the sandbox's agent (twistedgw.web.files), capped there by
    # --max-upload.
    BodyRule(b"PUT", re.compile(rb"/sandboxes/[^/]+/files(/archive)?/?"), None, json=False),
)
_NO_BODY = BodyRule(b"", re.compile(rb""), 0, json=False)


def body_rule(method: bytes, path: bytes, rules: Iterable[BodyRule] = BODY_RULES) -> BodyRule:
    """The body rule for a request line's method and path (without the query)."""
    for rule in rules:
        if rule.method == method and rule.path.fullmatch(path):
            return rule
    return _NO_BODY


def host_name(value: str) -> str:
    """The host part of a ``Host`` value or an origin's authority, lower case, without port,
    brackets or a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _public(path: bytes) -> bool:
    """Paths served without a token: the health check, the API document and the browser
    console's static files (whose data calls carry the token; see twistedgw.web.console)."""
    return path in PUBLIC_PATHS or path == b"/ui" or path.startswith(b"/ui/")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@frozen
class EdgePolicy:
    """The edge's limits and who it serves (see the module docstring)."""

    authenticator: Authenticator = field(factory=lambda: Authenticator.from_tokens([]))
    #: Host names accepted in ``Host``; ``None`` accepts any.
    allowed_hosts: frozenset[str] | None = None
    #: Accept any IP literal in ``Host`` (a gateway bound to all interfaces: an address cannot
    #: be rebound, only a DNS name can).
    any_ip_host: bool = False
    #: Origins (``scheme://host[:port]``) accepted besides the gateway's own.
    allowed_origins: frozenset[str] = frozenset()
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_connections: int = 1000
    rules: tuple[BodyRule, ...] = BODY_RULES
    #: Called for a streamed body's request (``BodyRule.limit is None``) once its headers
    #: passed; may set ``request.body_sink``.
    on_streamed: Callable[[GatewayRequest], None] | None = None
    #: Called for a port preview's request (``twistedgw.web.previews.is_preview``) once its
    #: headers are in: refuses it, answers it, or sets ``channel.tunnel`` to take the
    #: connection over (no token check here: the hook checks a token or a signature).
    on_preview: Callable[[GatewayRequest], None] | None = None

    def host_allowed(self, host: str) -> bool:
        if self.allowed_hosts is None:
            return True
        name = host_name(host)
        return name in self.allowed_hosts or (self.any_ip_host and _is_ip(name))

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Same-origin (the origin's authority is the request's ``Host``), or listed."""
        origin = origin.strip().lower().rstrip("/")
        if origin in self.allowed_origins:
            return True
        scheme, sep, authority = origin.partition("://")
        if not sep or scheme not in ("http", "https") or host is None:
            return False
        return authority == host.strip().lower() and self.host_allowed(authority)


def default_hosts(interface: str | None, extra: Iterable[str] = ()) -> tuple[frozenset[str], bool]:
    """The ``Host`` names a gateway bound to ``interface`` answers to, and whether any IP
    literal is accepted too: loopback names when bound to loopback; otherwise the bound
    address, loopback names, this machine's names and any IP literal."""
    import socket

    names = {host_name(h) for h in extra if h.strip()}
    names |= LOOPBACK_HOSTS
    if interface is not None and host_name(interface) in LOOPBACK_HOSTS | {"127.0.0.1"}:
        return frozenset(names), False
    if interface and interface not in ("0.0.0.0", "::"):
        names.add(host_name(interface))
        return frozenset(names), False
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    return frozenset(names), True


def fit_descriptors(http: int, websockets: int, reserve: int = 100) -> int:
    """The HTTP connection cap that fits this process's descriptor limit.

    Every HTTP connection holds a descriptor, every WebSocket client two (its own and its
    agent's), and the gateway needs some for Docker, state saving and logs (``reserve``). The
    soft limit is raised towards the hard one when that is short; if it stays short, the HTTP
    cap shrinks (with a warning), so an attacker meets 503s, not ``EMFILE`` everywhere.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = http + 2 * websockets + reserve
    infinite = resource.RLIM_INFINITY
    if soft != infinite and soft < needed:
        target = needed if hard == infinite else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == infinite or soft >= needed:
        return http
    fitted = max(8, min(http, (soft - reserve) // 3))
    _edge_log.warn(
        "open file limit {soft} is short of {needed} (--max-http-connections {http} + 2 x "
        "--max-connections {ws} + {reserve}): HTTP connections capped at {fitted}",
        soft=soft,
        needed=needed,
        http=http,
        ws=websockets,
        reserve=reserve,
        fitted=fitted,
    )
    return fitted


_edge_log = Logger()


class Refused(Exception):
    """The edge refuses a request: status and message for the JSON answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _header(request: Request, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


def _utf8(request: Request, name: bytes, status: int) -> str | None:
    raw = _header(request, name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(status, f"{name.decode()} header is not valid UTF-8") from None


class GatewayRequest(Request):
    """A ``Request`` that checks its headers before any body arrives, caps the body it
    stores, and keeps it in memory."""

    _log = Logger()
    channel: GatewayChannel
    #: Where a streamed body goes, chunk by chunk (set by ``EdgePolicy.on_streamed``).
    body_sink: Any = None
    #: A streamed body (``BodyRule.limit is None``): no body deadline, only the idle timeout.
    streamed = False
    _limit: int | None = 0
    _received = 0

    def cap_body(self, limit: int) -> None:
        """Cap a streamed body at ``limit`` bytes (413 as soon as it passes them)."""
        self._limit = limit

    def gotLength(self, length: int | None) -> None:
        self.started_at = time.monotonic()  # for the access log's duration_ms
        channel = self.channel
        policy = channel.policy
        raw_path = getattr(channel, "_path", b"")
        path, _, query = raw_path.partition(b"?")
        method = getattr(channel, "_command", b"")
        if policy.on_preview is not None and is_preview(method, path):
            self._preview(policy, policy.on_preview)
            return
        try:
            rule = self._check_headers(policy, method, path, query, length)
        except Refused as e:
            self.content = BytesIO()
            channel.refuse(e.status, e.message)
            return
        self._limit = rule.limit
        if rule.limit is None:
            # Streamed: the route's sink takes the chunks; without one, Twisted's own
            # spooling file does.
            self.streamed = True
            self.content = BytesIO()
            if policy.on_streamed is not None:
                policy.on_streamed(self)
            if self.body_sink is None and not channel.refused:
                super().gotLength(length)
        else:
            self.content = BytesIO()

    def _preview(self, policy: EdgePolicy, hook: Callable[[GatewayRequest], None]) -> None:
        """A port preview: ``Host`` is checked here, the rest by the hook; its body (and
        anything after it) is the tunnel's, never parsed here."""
        channel = self.channel
        self.content = BytesIO()
        try:
            host = _utf8(self, b"host", 400)
            if host is not None and not policy.host_allowed(host):
                raise Refused(421, "this gateway does not serve that Host (see --allowed-hosts)")
        except Refused as e:
            channel.refuse(e.status, e.message)
            return
        try:
            hook(self)
        except Exception:
            self._log.failure("port preview failed")
            channel.refuse(503, "the preview could not be started")
            return
        if channel.tunnel is not None:
            channel.setRawMode()
            channel.setTimeout(None)

    def _check_headers(
        self, policy: EdgePolicy, method: bytes, path: bytes, query: bytes, length: int | None
    ) -> BodyRule:
        try:
            unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(400, "the path is not valid UTF-8 once unquoted") from None
        host = _utf8(self, b"host", 400)
        if host is not None and not policy.host_allowed(host):
            raise Refused(421, "this gateway does not serve that Host (see --allowed-hosts)")
        origin = _utf8(self, b"origin", 403)
        if origin is not None and not policy.origin_allowed(origin, host):
            raise Refused(403, "cross-origin requests are not allowed (see --allowed-origins)")
        authorization = _utf8(self, b"authorization", 401 if policy.authenticator.enabled else 400)
        _utf8(self, b"idempotency-key", 400)
        if policy.authenticator.enabled and not _public(path):
            try:
                params = parse_qs(query.decode("utf-8", "replace"))
            except ValueError:
                params = {}
            tokens = params.get(QUERY_PARAMETER)
            token = tokens[0] if tokens else None
            try:
                policy.authenticator.owner_for(authorization, token)
            except Unauthorized as e:
                raise Refused(401, str(e)) from None
        rule = body_rule(method, path, policy.rules)
        chunked = self.requestHeaders.hasHeader(b"transfer-encoding")
        if rule.limit is not None and length is not None and length > rule.limit:
            raise Refused(413, f"request body larger than {rule.limit} bytes")
        if rule.json and (chunked or (length or 0) > 0):
            content_type = (_header(self, b"content-type") or b"").split(b";")[0].strip()
            if content_type.lower() != b"application/json":
                raise Refused(415, "request bodies must be application/json")
        return rule

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.refused:
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self.channel.refuse(413, f"request body larger than {self._limit} bytes")
            return
        if self.body_sink is not None:
            self.body_sink.write(data)
        elif self.content is not None:
            self.content.write(data)

    def process(self) -> None:
        if self.path == b"*":
            # ``OPTIONS *`` and the like: nothing here answers for the whole server.
            self.channel.refuse(400, "'*' is not a resource here")
            return
        super().process()


class GatewayChannel(HTTPChannel):
    """An ``HTTPChannel`` enforcing ``EdgePolicy``'s connection limits: a header deadline
    (from connecting, or from the previous request's end), a body deadline, a cap on open
    connections, JSON answers to what twisted.web would answer with a bare 400 or a silent
    close, and refusal without reading on."""

    _log = Logger()
    policy = EdgePolicy()
    site: Any
    _deadline: Any = None
    _linger: Any = None
    refused = False
    _counted = False
    _discarded = 0
    #: A port preview's tunnel (``twistedgw.proxy.ports.PreviewTunnel``), which owns the
    #: connection from the end of the request's headers on.
    tunnel: Any = None

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(self.policy.idle_timeout)
        channels: set[GatewayChannel] = self.site.http_channels
        if len(channels) >= self.policy.max_connections:
            self._log.warn(
                "HTTP connection cap ({cap}) reached; refusing {peer}",
                cap=self.policy.max_connections,
                peer=self.transport.getPeer() if self.transport else None,
            )
            self.refuse(503, "too many connections; try again later")
            return
        channels.add(self)
        self._counted = True
        self._arm(self.policy.header_timeout, 408, "request headers not received in time")

    def handed_over(self) -> None:
        """The connection became a WebSocket: it no longer counts as an HTTP connection."""
        self._disarm()
        self.setTimeout(None)
        self._uncount()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.site.http_channels.discard(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.tunnel is not None:
            self.tunnel.client_lost()
        self._disarm()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._uncount()
        super().connectionLost(reason)

    # -- deadlines -------------------------------------------------------------------------

    def _arm(self, seconds: float, status: int, message: str) -> None:
        self._disarm()
        self._deadline = self.callLater(  # type: ignore[call-arg]
            seconds, self._expired, status, message
        )

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self, status: int, message: str) -> None:
        self._deadline = None
        self._log.info("dropping slow HTTP client {peer}: {why}", peer=self._peer(), why=message)
        self.refuse(status, message)

    def allHeadersReceived(self) -> None:
        self._disarm()
        super().allHeadersReceived()
        streamed = bool(self.requests) and getattr(self.requests[-1], "streamed", False)
        if not self.refused and self.tunnel is None and self.length != 0 and not streamed:
            # (A streamed upload may take as long as it takes while data keeps coming; the
            # idle timeout still drops a client that stops sending.)
            self._arm(self.policy.body_timeout, 408, "request body not received in time")

    def allContentReceived(self) -> None:
        if self.refused or self.tunnel is not None:
            return
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.persistent and self.transport is not None and not self.requests:
            self._arm(self.policy.header_timeout, 408, "request headers not received in time")

    # -- parsing ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            self._discard(data)
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            self._discard(data)
            return
        if self.tunnel is not None:
            self.tunnel.client_data(data)
            return
        super().rawDataReceived(data)

    def _send100Continue(self) -> None:
        if not self.refused and self.tunnel is None:
            super()._send100Continue()

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request line or header beyond 16 KiB (LineReceiver.MAX_LENGTH).
        if self._receivedHeaderSize == 0 and not self.requests:
            self.refuse(414, "request line too long")
        else:
            self.refuse(431, "request header too large")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.refuse(431, "request headers too large")
        else:
            self.refuse(400, "malformed HTTP request")

    # -- refusing --------------------------------------------------------------------------

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error, stop parsing, and close the connection once
        the answer is out (discarding, for a little while, what the client still sends)."""
        if self.refused or self.transport is None:
            return
        self.refused = True
        self._disarm()
        self.setTimeout(None)
        self._log.info(
            "refused HTTP request from {peer}: {status} {message}",
            peer=self._peer(),
            status=status,
            message=message,
        )
        body = json.dumps({"error": message}).encode("utf-8")
        head = [
            b"HTTP/1.1 %d %s" % (status, _STATUS_TEXT.get(status, b"Error")),
            b"Content-Type: application/json",
            b"Cache-Control: no-store",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        if status == 401:
            head.append(b'WWW-Authenticate: Bearer realm="twistedgw"')
        if status == 503:
            head.append(b"Retry-After: 5")
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._uncount()
        # Half-close: the answer goes out, then FIN; what the client keeps sending is read
        # and dropped for a moment, so that our close does not turn into a reset that
        # destroys the answer before the client read it.
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
            self._linger = self.callLater(LINGER_SECONDS, self._abort)
        else:
            self.transport.loseConnection()

    def answer_redirect(self, location: bytes) -> None:
        """Answer ``308`` to ``location`` and close (the preview routes' added slash)."""
        if self.refused or self.transport is None:
            return
        self.refused = True
        self._disarm()
        self.setTimeout(None)
        self.transport.write(
            b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n\r\n" % location
        )
        self._uncount()
        self.transport.loseConnection()

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > LINGER_BYTES:
            self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return str(getattr(peer, "host", "-"))


def access_log_line(timestamp: str, request: Any) -> str:
    """An access log line in combined format, without the query string (which may carry an
    access token) and without any header but the user agent."""
    path = request.uri.split(b"?", 1)[0].decode("ascii", "replace")
    agent = (request.getHeader(b"user-agent") or b"-").decode("ascii", "replace")
    peer = getattr(request.getClientAddress(), "host", "-")
    method = request.method.decode("ascii", "replace")
    proto = request.clientproto.decode("ascii", "replace")
    agent = agent.replace('"', "'")
    length = request.sentLength or "-"
    return (
        f'"{peer}" - - {timestamp} "{method} {path} {proto}" {request.code} {length} "-" "{agent}"'
    )


class GatewaySite(Site):
    """A ``Site`` whose access log lines are log events (the combined-format line, plus
    ``method``, ``path``, ``status``, ``duration_ms``, ``peer`` and ``owner`` fields for
    ``--log-format json``), not lines written beside the log."""

    _access = Logger(namespace="twistedgw.access")

    def log(self, request: Any) -> None:
        line = self._logFormatter(self._logDateTime, request)
        started = getattr(request, "started_at", None)
        duration = None if started is None else round((time.monotonic() - started) * 1000, 3)
        self._access.info(
            "{line}",
            line=line,
            event="access",
            method=request.method.decode("ascii", "replace"),
            path=request.uri.split(b"?", 1)[0].decode("ascii", "replace"),
            status=request.code,
            duration_ms=duration,
            peer=getattr(request.getClientAddress(), "host", "-"),
            owner=getattr(request, "owner", None),
        )


class MetricsPage(Resource):
    """``GET /metrics``: the registry's text exposition, rendered on the reactor thread
    (prometheus_client's own resource is WSGI on the reactor's thread pool)."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self.metrics.exposition()


def metrics_site(metrics: GatewayMetrics) -> Site:
    """The ``--metrics-port`` site: ``GET /metrics`` only, without a token (it listens on
    loopback only)."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(metrics))
    site = Site(root)
    site.displayTracebacks = False
    return site


def make_site(
    api: GatewayAPI, header_timeout: float = 10.0, policy: EdgePolicy | None = None
) -> Site:
    """A twisted.web ``Site`` serving ``api`` behind the edge checks of ``policy``
    (above): tracebacks hidden, tokens kept out of the access log, slow or
    oversized requests refused before they cost anything."""
    if policy is None:
        policy = EdgePolicy(authenticator=api.authenticator, header_timeout=header_timeout)
    if policy.on_streamed is None:
        policy = evolve(policy, on_streamed=api.files.begin_upload)
    if policy.on_preview is None and api.previews is not None:
        policy = evolve(policy, on_preview=api.previews.begin)
    site = GatewaySite(api.resource(), logFormatter=access_log_line, timeout=policy.idle_timeout)
    site.displayTracebacks = False
    site.requestFactory = GatewayRequest
    site.http_channels = set()  # type: ignore[attr-defined]

    class Channel(GatewayChannel):
        pass

    Channel.policy = policy
    site.protocol = Channel  # type: ignore[method-assign,assignment]
    return site
