"""The egress proxy in memory (``twistedgw.egress.proxy``): ``EgressProxy`` on a
``StringTransport``, a ``Clock`` for its timeouts, a scripted resolver and a recording connector
(no socket is opened, nothing is sent anywhere). ``tests/test_egress.py`` drives the same proxy
over real loopback sockets; this file pins each answer it writes itself, byte for byte, the
forwarded request head, the names and addresses it resolves and connects to, the order of
buffered bytes, the flow control, the head's deadline and size limit, the connection limit and
the clean-up when either side goes away."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport

from twistedgw.egress import proxy as proxy_module
from twistedgw.egress.policy import EgressPolicy, parse_cidrs
from twistedgw.egress.proxy import (
    CONNECT_TIMEOUT,
    HEAD_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_HEAD,
    RESOLVE_TIMEOUT,
    TRANSFER_BUFFER,
    EgressProxy,
    EgressProxyFactory,
    Logged,
    _authority,
    _BadRequest,
)

#: Public addresses (documentation ranges are "reserved": use real-looking public ones; the
#: connector is a recorder, so nothing is ever sent to them).
PUBLIC = "93.184.216.34"
PUBLIC_2 = "93.184.216.35"

#: The reason phrase the proxy writes with each status it answers itself.
PHRASES = {
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}


class Resolver:
    """``IEgressResolver`` from a table: per name a list of addresses, an exception (the lookup
    fails), or ``None`` (a Deferred the test fires, cancels or lets time out). Records the
    names asked for and the lookups cancelled."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []
        self.waiting: list[Deferred[list[str]]] = []
        self.cancelled: list[str] = []

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        self.asked.append((host, port))
        answer = self.answers.get(host, [])
        if answer is None:
            d: Deferred[list[str]] = Deferred(lambda _: self.cancelled.append(host))
            self.waiting.append(d)
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(list(answer))


class Connector:
    """Records ``connect(address, port, protocol)``; ``accept`` gives the upstream protocol a
    transport and fires its Deferred (a test errbacks it to make the connect fail)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Protocol, Deferred[Any]]] = []

    def __call__(self, address: str, port: int, protocol: Protocol) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((address, port, protocol, d))
        return d

    def accept(self, index: int = -1) -> tuple[Protocol, StringTransport]:
        _, _, protocol, d = self.calls[index]
        transport = StringTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport


class Setup:
    """One sandbox's proxy factory with a clock, a ``Resolver`` and a ``Connector``."""

    def __init__(
        self,
        patterns: list[str],
        answers: dict[str, Any] | None = None,
        policy: EgressPolicy | None = None,
    ) -> None:
        self.clock = Clock()
        self.resolver = Resolver(answers or {})
        self.connector = Connector()
        self.factory = EgressProxyFactory(
            "sb1",
            patterns,
            policy or EgressPolicy(),
            self.resolver,
            self.clock,
            self.connector,
        )

    def connect(self) -> tuple[EgressProxy, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


def answer_of(transport: StringTransport) -> tuple[int, bytes]:
    """Status and body of a one-line answer the proxy wrote itself; checks the rest of it:
    the status line with its reason phrase, the three headers, one line of body, and the
    connection being closed."""
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    assert lines[0] == b"HTTP/1.1 %d %s" % (status, PHRASES[status])
    assert lines[1:] == [
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    assert transport.disconnecting
    return status, body


# -- an allowed request ------------------------------------------------------------------------


def test_http_request_is_forwarded_in_origin_form_without_hop_headers() -> None:
    """``POST http://user:pw@host:8080/p?q`` goes to the resolved address with ``POST /p?q``,
    the proxy's hop headers dropped (a ``:`` in their value or not), the others kept in order,
    and ``Connection: close`` added;
    body bytes that came with the head or before the connection follow it, in order, once
    connected, later ones go straight on; the answer flows back; both directions are counted;
    the decision is logged with the address; the upstream closing closes the client."""
    setup = Setup(["example.com:8080"], {"example.com": [PUBLIC]})
    proxy, client = setup.connect()
    proxy.dataReceived(
        b"POST http://user:pw@Example.COM:8080/p?q=1 HTTP/1.1\r\n"
        b"Host: example.com:8080\r\nProxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Bearer u:p\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nX-Keep: a:b\r\nContent-Length: 18\r\n\r\nbody-1"
    )
    assert client.producerState == "paused"
    proxy.dataReceived(b"body-2")
    assert setup.resolver.asked == [("example.com", 8080)]
    [(address, port, _, _)] = setup.connector.calls
    assert (address, port) == (PUBLIC, 8080)
    upstream, server = setup.connector.accept()
    assert server.value() == (
        b"POST /p?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nX-Keep: a:b\r\n"
        b"Content-Length: 18\r\nConnection: close\r\n\r\nbody-1body-2"
    )
    assert client.producerState == "producing"
    assert client.value() == b""
    proxy.dataReceived(b"body-3")
    assert server.value().endswith(b"\r\n\r\nbody-1body-2body-3")
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nhi")
    assert client.value() == b"HTTP/1.1 200 OK\r\n\r\nhi"
    assert proxy.down == len(b"HTTP/1.1 200 OK\r\n\r\nhi")
    assert proxy.up == len(server.value())
    assert list(setup.factory.decisions) == [Logged("example.com", 8080, True, "allowed", PUBLIC)]
    upstream.connectionLost(None)
    assert client.disconnecting and proxy.upstream is None


def test_http_without_path_or_port_asks_for_slash_on_port_80() -> None:
    """``http://host`` means ``/`` on port 80."""
    setup = Setup(["example.com"], {"example.com": [PUBLIC]})
    proxy, _ = setup.connect()
    proxy.dataReceived(b"GET http://example.com HTTP/1.0\r\n\r\n")
    assert setup.connector.calls[0][:2] == (PUBLIC, 80)
    _, server = setup.connector.accept()
    assert server.value() == b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n"


def test_connect_tunnel_answers_200_then_carries_bytes_both_ways_with_backpressure() -> None:
    """CONNECT: ``200 Connection established`` to the client, nothing to the server until the
    client sends; both transports registered as each other's producer (streaming), with the
    large transfer buffer; an IP literal is not resolved."""
    setup = Setup([f"{PUBLIC}:443"])
    proxy, client = setup.connect()
    proxy.dataReceived(f"CONNECT {PUBLIC}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert setup.resolver.asked == []
    upstream, server = setup.connector.accept()
    assert client.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert server.value() == b""
    proxy.dataReceived(b"\x16\x03\x01hello")
    upstream.dataReceived(b"\x16\x03\x03world")
    assert server.value() == b"\x16\x03\x01hello"
    assert client.value().endswith(b"\x16\x03\x03world")
    assert server.producer is client and server.streaming
    assert client.producer is server and client.streaming
    assert getattr(client, "bufferSize", None) == TRANSFER_BUFFER
    assert getattr(server, "bufferSize", None) == TRANSFER_BUFFER


def test_bytes_sent_with_the_connect_head_follow_the_200() -> None:
    """A CONNECT to a name: the name is resolved; bytes that came in the same read as the
    head are held until connected, then sent on after the ``200 Connection established``;
    the tunnel then carries bytes both ways untouched, counted up and down."""
    setup = Setup(["example.com:443"], {"example.com": [PUBLIC]})
    proxy, client = setup.connect()
    proxy.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03")
    assert setup.resolver.asked == [("example.com", 443)]
    assert client.value() == b""
    upstream, server = setup.connector.accept()
    assert client.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert server.value() == b"\x16\x03"
    proxy.dataReceived(b"more")
    upstream.dataReceived(b"back")
    assert server.value() == b"\x16\x03more"
    assert client.value().endswith(b"back")
    assert (proxy.up, proxy.down) == (6, 4)


def test_connect_to_an_ipv6_literal_dials_the_bare_address() -> None:
    """``CONNECT [v6]:port`` dials the address without brackets, without resolving it."""
    v6 = "2606:2800:220:1:248:1893:25c8:1946"
    setup = Setup([f"[{v6}]:443"])
    proxy, _ = setup.connect()
    proxy.dataReceived(f"CONNECT [{v6}]:443 HTTP/1.1\r\n\r\n".encode())
    assert setup.resolver.asked == []
    assert [call[:2] for call in setup.connector.calls] == [(v6, 443)]


def test_the_first_safe_address_is_dialled_after_all_are_checked() -> None:
    """Several addresses, all allowed: the first one is dialled, once."""
    setup = Setup(["example.com:443"], {"example.com": [PUBLIC, PUBLIC_2]})
    proxy, _ = setup.connect()
    proxy.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    assert [call[:2] for call in setup.connector.calls] == [(PUBLIC, 443)]


def test_an_allowed_cidr_lets_an_internal_address_through() -> None:
    """``--egress-allow-cidr`` ranges pass the address rule."""
    policy = EgressPolicy(allow_cidrs=parse_cidrs(["10.1.0.0/16"]))
    setup = Setup(["internal.example:80"], {"internal.example": ["10.1.2.3"]}, policy)
    proxy, _ = setup.connect()
    proxy.dataReceived(b"GET http://internal.example/ HTTP/1.1\r\n\r\n")
    assert setup.connector.calls[0][:2] == ("10.1.2.3", 80)


# -- refusals and failures ---------------------------------------------------------------------


def test_a_name_outside_the_list_is_403_with_its_reason() -> None:
    """A name not in the sandbox's list is refused before resolving, with a one-line reason,
    logged as a refusal."""
    setup = Setup(["example.com"])
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://other.example/ HTTP/1.1\r\n\r\n")
    reason = "other.example:80 is not in this sandbox's egress list"
    assert answer_of(client) == (403, f"egress refused: {reason}\n".encode())
    assert setup.resolver.asked == [] and setup.connector.calls == []
    assert list(setup.factory.decisions) == [Logged("other.example", 80, False, reason, "")]


def test_an_internal_address_gets_403_naming_its_kind() -> None:
    """An allowed name with any address off limits (here a private one among public ones):
    403 "egress refused: NAME resolves to a private address ..." and no connect; the refusal
    is logged with that address."""
    setup = Setup(["example.com:80"], {"example.com": [PUBLIC, "10.0.0.1"]})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    reason = "example.com resolves to a private address 10.0.0.1, which egress does not allow"
    assert answer_of(client) == (403, f"egress refused: {reason}\n".encode())
    assert setup.connector.calls == []
    assert list(setup.factory.decisions) == [Logged("example.com", 80, False, reason, "10.0.0.1")]


def test_resolver_failure_is_502_with_its_message() -> None:
    """A failed lookup: 502 "cannot resolve NAME: <error>", nothing dialled."""
    setup = Setup(["example.com:80"], {"example.com": OSError("SERVFAIL")})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    assert answer_of(client) == (502, b"cannot resolve example.com: SERVFAIL\n")
    assert setup.connector.calls == []


def test_a_name_without_addresses_is_502() -> None:
    """No address at all: 502 "NAME has no address"."""
    setup = Setup(["example.com:80"], {})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    assert answer_of(client) == (502, b"example.com has no address\n")


def test_a_lookup_that_never_answers_times_out_with_502() -> None:
    """No answer within ``RESOLVE_TIMEOUT`` (10 s): 502 "cannot resolve NAME: timed out", the
    lookup cancelled, nothing dialled."""
    assert RESOLVE_TIMEOUT == 10.0
    setup = Setup(["slow.example:80"], {"slow.example": None})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://slow.example/ HTTP/1.1\r\n\r\n")
    setup.clock.advance(RESOLVE_TIMEOUT - 0.1)
    assert client.value() == b""
    setup.clock.advance(0.1)
    assert answer_of(client) == (502, b"cannot resolve slow.example: timed out\n")
    assert setup.resolver.cancelled == ["slow.example"]
    assert setup.connector.calls == []


@pytest.mark.parametrize(
    "head, port",
    [
        (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", 443),
        (b"GET http://example.com/ HTTP/1.1\r\n\r\n", 80),
    ],
)
def test_a_refused_connect_is_502_naming_the_destination(head: bytes, port: int) -> None:
    """The connect failing (a tunnel or a forwarded request): 502 "cannot connect to
    NAME:PORT: <error>"."""
    setup = Setup([f"example.com:{port}"], {"example.com": [PUBLIC]})
    proxy, client = setup.connect()
    proxy.dataReceived(head)
    setup.connector.calls[0][3].errback(ConnectionRefusedError("refused"))
    status, body = answer_of(client)
    assert status == 502 and body.startswith(b"cannot connect to example.com:%d: " % port)
    assert b"refused" in body


def test_an_error_message_with_line_breaks_stays_one_line() -> None:
    """CR and LF in a reason become spaces: the answer's body is exactly one line."""
    setup = Setup(["example.com:80"], {"example.com": OSError("a\r\nInjected: 1")})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    assert answer_of(client)[1] == b"cannot resolve example.com: a  Injected: 1\n"


ONLY_HTTP = b"only http:// URLs and CONNECT go through this proxy"
NOT_HTTP_1 = b"not an HTTP/1.x proxy request"


@pytest.mark.parametrize(
    "request_line, message",
    [
        (b"GET http://example.com/ HTTP/2.0", NOT_HTTP_1),
        (b"GET http://example.com/ HTTP/2", NOT_HTTP_1),
        (b"GET http://example.com/", NOT_HTTP_1),
        (b"GET  http://example.com/ HTTP/1.1", NOT_HTTP_1),
        (b"GET http://ex\xc3\xa4mple.com/ HTTP/1.1", b"request target is not ASCII"),
        (b"GET / HTTP/1.1", ONLY_HTTP),
        (b"GET https://example.com/ HTTP/1.1", ONLY_HTTP),
        (b"GET ftp://example.com/ HTTP/1.1", ONLY_HTTP),
        (b"CONNECT example.com HTTP/1.1", b"CONNECT needs host:port"),
        (b"CONNECT example.com:0 HTTP/1.1", b"bad port"),
        (b"CONNECT example.com:65536 HTTP/1.1", b"bad port"),
        (b"CONNECT example.com:+443 HTTP/1.1", b"bad port"),
        (b"CONNECT [::1:443 HTTP/1.1", b"bad IPv6 literal"),
    ],
)
def test_malformed_requests_get_400_with_the_reason(request_line: bytes, message: bytes) -> None:
    """Each malformed request line: 400 and its own reason; nothing resolved or dialled."""
    setup = Setup(["example.com:443", "example.com:80"])
    proxy, client = setup.connect()
    proxy.dataReceived(request_line + b"\r\n\r\n")
    assert answer_of(client) == (400, message + b"\n")
    assert setup.resolver.asked == [] and setup.connector.calls == []


def test_port_ends_of_connect_targets_are_accepted() -> None:
    """Ports 1 and 65535 are valid targets (refused here only by the list)."""
    for port in (1, 65535):
        setup = Setup(["example.com"])
        proxy, client = setup.connect()
        proxy.dataReceived(b"CONNECT example.com:%d HTTP/1.1\r\n\r\n" % port)
        assert answer_of(client)[0] == 403


def test_authority_parsing() -> None:
    """``host:port``, ``[v6]:port``, ``[v6]`` and a bare host with a default port."""
    assert _authority("example.com:8443", None) == ("example.com", 8443)
    assert _authority("[::1]:80", None) == ("::1", 80)
    assert _authority("[::1]", 80) == ("::1", 80)
    assert _authority("example.com", 80) == ("example.com", 80)
    assert _authority("example.com:65535", None) == ("example.com", 65535)
    with pytest.raises(_BadRequest):
        _authority("example.com:", None)


def test_an_oversized_head_is_431_and_a_slow_one_408() -> None:
    """``MAX_HEAD`` (16 KiB) bytes without the blank line wait; one more byte, or more in one
    read, is a 431 (and no 408 later); no complete head within ``HEAD_TIMEOUT`` (30 s), whether
    part of it came or none: 408; a complete head in pieces in time is served (no 408 later)."""
    assert (HEAD_TIMEOUT, MAX_HEAD) == (30.0, 16 * 1024)
    setup = Setup(["example.com:80"], {"example.com": [PUBLIC]})
    start = b"GET http://example.com/ HTTP/1.1\r\nA: "
    proxy, client = setup.connect()
    proxy.dataReceived(start + b"a" * MAX_HEAD)
    assert answer_of(client) == (431, b"request head too large\n")

    proxy, client = setup.connect()
    proxy.dataReceived(start + b"a" * (MAX_HEAD - len(start)))
    assert client.value() == b""
    proxy.dataReceived(b"a")
    assert answer_of(client) == (431, b"request head too large\n")
    setup.clock.advance(HEAD_TIMEOUT * 2)
    assert client.value().count(b"HTTP/1.1") == 1

    slow = Setup(["example.com:80"])
    _, idle_client = slow.connect()
    partial, partial_client = slow.connect()
    partial.dataReceived(b"GET http://example.com/ HTTP/1.1\r\n")
    slow.clock.advance(HEAD_TIMEOUT - 0.1)
    assert idle_client.value() == b"" and partial_client.value() == b""
    slow.clock.advance(0.1)
    assert answer_of(idle_client) == (408, b"no complete request head in time\n")
    assert answer_of(partial_client) == (408, b"no complete request head in time\n")

    pieces, pieces_client = setup.connect()
    for piece in (b"GET http://exam", b"ple.com/ HTTP/1.1\r\n", b"\r", b"\n"):
        pieces.dataReceived(piece)
    setup.clock.advance(HEAD_TIMEOUT * 2)
    assert len(setup.connector.calls) == 1 and pieces_client.value() == b""


def test_a_head_over_the_limit_is_431_even_when_complete_in_one_read() -> None:
    """A complete head longer than ``MAX_HEAD`` arriving in one read is refused like one
    that is still incomplete; a head of exactly ``MAX_HEAD`` bytes is served."""
    setup = Setup(["example.com:80"], {"example.com": [PUBLIC]})
    start = b"GET http://example.com/ HTTP/1.1\r\nA: "
    filler = MAX_HEAD - len(start) - 4
    proxy, client = setup.connect()
    proxy.dataReceived(start + b"a" * (filler + 1) + b"\r\n\r\n")
    assert answer_of(client) == (431, b"request head too large\n")
    assert setup.resolver.asked == []
    proxy, client = setup.connect()
    proxy.dataReceived(start + b"a" * filler + b"\r\n\r\n")
    assert client.value() == b"" and len(setup.connector.calls) == 1


def test_connections_beyond_the_limit_get_503() -> None:
    """``MAX_CONNECTIONS`` (512) at once are served; the next one gets a 503 at once; a closed
    one frees its place."""
    assert MAX_CONNECTIONS == 512
    setup = Setup(["example.com:80"])
    opened = [setup.connect() for _ in range(MAX_CONNECTIONS)]
    assert all(client.value() == b"" for _, client in opened)
    extra, extra_client = setup.connect()
    assert answer_of(extra_client) == (503, b"too many egress connections at once\n")
    extra.connectionLost(None)
    opened[0][0].connectionLost(None)
    _, next_client = setup.connect()
    assert next_client.value() == b""


# -- going away --------------------------------------------------------------------------------


def test_a_client_gone_while_resolving_cancels_the_lookup_and_dials_nothing() -> None:
    """The client closing during the lookup: its Deferred is cancelled (once), no connect, no
    answer written, the connection forgotten."""
    setup = Setup(["slow.example:80"], {"slow.example": None})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://slow.example/ HTTP/1.1\r\n\r\n")
    [waiting] = setup.resolver.waiting
    proxy.connectionLost(None)
    assert waiting.called and setup.resolver.cancelled == ["slow.example"]
    setup.clock.advance(RESOLVE_TIMEOUT * 2)
    assert setup.connector.calls == [] and client.value() == b""
    assert setup.factory.connections == set()


def test_a_connect_completing_after_the_client_left_is_closed() -> None:
    """The client gone before the upstream connection completes: the upstream is closed at
    once and nothing is written to either side."""
    setup = Setup(["example.com:443"], {"example.com": [PUBLIC]})
    proxy, client = setup.connect()
    proxy.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    _, _, upstream, d = setup.connector.calls[0]
    proxy.closed = True  # as connectionLost would leave it, with the connect not cancellable
    server = StringTransport()
    upstream.makeConnection(server)
    d.callback(upstream)
    assert server.disconnecting and server.value() == b""
    assert proxy.upstream is None and client.value() == b""


def test_either_side_closing_closes_the_other() -> None:
    """The client closing drops the upstream and the connection is forgotten; the upstream
    closing drops the client (its producer unregistered first)."""
    setup = Setup(["example.com:443"], {"example.com": [PUBLIC]})
    proxy, client = setup.connect()
    proxy.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    _, server = setup.connector.accept()
    proxy.connectionLost(None)
    assert server.disconnecting and proxy not in setup.factory.connections

    proxy, client = setup.connect()
    proxy.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    upstream, server = setup.connector.accept()
    upstream.connectionLost(None)
    assert client.disconnecting and client.producer is None
    assert proxy.upstream is None
    proxy.dataReceived(b"late")  # after the upstream went: dropped, not an error
    assert server.value() == b""


def test_close_all_aborts_every_connection() -> None:
    """``close_all`` (the sandbox is going): every connection's transport is aborted."""
    setup = Setup(["example.com:80"])
    clients = [setup.connect()[1] for _ in range(3)]
    setup.factory.close_all()
    assert all(c.disconnected and c.disconnecting for c in clients)


def test_data_after_an_answer_is_ignored() -> None:
    """Once refused and closed, further client bytes write nothing more."""
    setup = Setup(["example.com:80"])
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://other.example/ HTTP/1.1\r\n\r\n")
    answered = client.value()
    assert answer_of(client)[0] == 403
    proxy.dataReceived(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    assert client.value() == answered
    assert setup.resolver.asked == []


# -- counting and connecting -------------------------------------------------------------------


def test_decisions_are_counted_by_outcome_and_kind() -> None:
    """Each decision increments the egress decisions counter for its outcome and kind."""
    counter = proxy_module.metrics.EGRESS_DECISIONS

    def count(decision: str, reason: str) -> float:
        return counter.labels(decision=decision, reason=reason)._value.get()

    before = (count("refused", "not_listed"), count("allowed", "allowed"))
    setup = Setup(["example.com"], {"example.com": [PUBLIC]})
    setup.connect()[0].dataReceived(b"GET http://other.example/ HTTP/1.1\r\n\r\n")
    setup.connect()[0].dataReceived(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    assert (count("refused", "not_listed"), count("allowed", "allowed")) == (
        before[0] + 1,
        before[1] + 1,
    )


def test_the_real_connector_dials_the_address_with_the_connect_timeout() -> None:
    """``connect_tcp`` uses TCP4 for IPv4 and TCP6 for IPv6 addresses, with
    ``CONNECT_TIMEOUT`` (a MemoryReactor: nothing is dialled)."""
    reactor = MemoryReactor()
    connect = proxy_module.connect_tcp(reactor)
    connect(PUBLIC, 443, Protocol())
    connect("2606:2800:220:1::1", 80, Protocol())
    [(host4, port4, _, timeout4, _), (host6, port6, _, timeout6, _)] = reactor.tcpClients
    assert (host4, port4, timeout4) == (PUBLIC, 443, CONNECT_TIMEOUT)
    assert (host6, port6, timeout6) == ("2606:2800:220:1::1", 80, CONNECT_TIMEOUT)
