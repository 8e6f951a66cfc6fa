"""The egress proxy in memory: ``EgressProxy`` on a ``StringTransport``, a ``Clock`` for its
timeouts, a scripted resolver and a recording connector (no socket is opened, nothing is
sent anywhere). ``tests/test_egress.py`` drives the same proxy over real loopback sockets;
this file pins each answer's status and message, the forwarded request head, the order of
buffered bytes, the flow control and the clean-up when either side goes away."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twistedgw.egress import proxy as proxy_module
from twistedgw.egress.policy import EgressPolicy, parse_cidrs
from twistedgw.egress.proxy import (
    CONNECT_TIMEOUT,
    HEAD_TIMEOUT,
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


class Resolver:
    """``IEgressResolver``: answers from ``answers`` (a list of addresses, an exception, or
    ``None``: a Deferred the test fires or lets time out)."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []
        self.waiting: list[Deferred[list[str]]] = []

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        self.asked.append((host, port))
        answer = self.answers.get(host, [])
        if answer is None:
            d: Deferred[list[str]] = Deferred()
            self.waiting.append(d)
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(list(answer))


class Connector:
    """Records ``connect(address, port, protocol)``; ``accept`` gives the upstream protocol a
    transport and fires its Deferred."""

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
    """Status and body of a one-line answer; checks its head."""
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
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
    """``GET http://user@host:8080/p?q`` goes to the resolved address with ``GET /p?q``, the
    proxy's hop headers dropped, the others kept in order, and ``Connection: close`` added;
    body bytes that came with the head follow it, in order, once connected; the answer
    flows back; the decision is logged with the address."""
    setup = Setup(["example.com:8080"], {"example.com": [PUBLIC]})
    proxy, client = setup.connect()
    proxy.dataReceived(
        b"POST http://user:pw@Example.COM:8080/p?q=1 HTTP/1.1\r\n"
        b"Host: example.com:8080\r\nProxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic eA==\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nX-Keep: yes\r\n\r\nbody-1"
    )
    assert client.producerState == "paused"
    proxy.dataReceived(b"body-2")
    assert setup.resolver.asked == [("example.com", 8080)]
    [(address, port, _, _)] = setup.connector.calls
    assert (address, port) == (PUBLIC, 8080)
    upstream, server = setup.connector.accept()
    assert server.value() == (
        b"POST /p?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nX-Keep: yes\r\n"
        b"Connection: close\r\n\r\nbody-1body-2"
    )
    assert client.producerState == "producing"
    assert client.value() == b""
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nhi")
    assert client.value() == b"HTTP/1.1 200 OK\r\n\r\nhi"
    assert proxy.down == len(b"HTTP/1.1 200 OK\r\n\r\nhi")
    assert proxy.up == len(server.value())
    assert list(setup.factory.decisions) == [Logged("example.com", 8080, True, "allowed", PUBLIC)]


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


def test_connect_to_an_ipv6_literal_dials_the_bare_address() -> None:
    """``CONNECT [v6]:port`` dials the address without brackets."""
    v6 = "2606:2800:220:1:248:1893:25c8:1946"
    setup = Setup([f"[{v6}]:443"])
    proxy, _ = setup.connect()
    proxy.dataReceived(f"CONNECT [{v6}]:443 HTTP/1.1\r\n\r\n".encode())
    assert setup.connector.calls[0][:2] == (v6, 443)


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


def test_an_internal_address_gets_403_naming_its_kind() -> None:
    """An allowed name resolving to a private address: 403 "egress refused: NAME resolves to
    a private address ..." and no connect."""
    setup = Setup(["example.com:80"], {"example.com": [PUBLIC, "10.0.0.1"]})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    status, body = answer_of(client)
    assert status == 403
    assert body.startswith(b"egress refused: example.com resolves to a private")
    assert b"which egress does not allow" in body
    assert setup.connector.calls == []
    [decision] = setup.factory.decisions
    assert (decision.allowed, decision.address) == (False, "10.0.0.1")


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
    """No answer within ``RESOLVE_TIMEOUT``: 502 "cannot resolve", the lookup cancelled."""
    setup = Setup(["slow.example:80"], {"slow.example": None})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://slow.example/ HTTP/1.1\r\n\r\n")
    setup.clock.advance(RESOLVE_TIMEOUT - 0.1)
    assert client.value() == b""
    setup.clock.advance(0.2)
    status, body = answer_of(client)
    assert status == 502 and body.startswith(b"cannot resolve slow.example: ")
    assert setup.connector.calls == []


def test_a_refused_connect_is_502_naming_the_destination() -> None:
    """The connect failing: 502 "cannot connect to NAME:PORT: <error>"."""
    setup = Setup(["example.com:443"], {"example.com": [PUBLIC]})
    proxy, client = setup.connect()
    proxy.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    setup.connector.calls[0][3].errback(ConnectionRefusedError("refused"))
    status, body = answer_of(client)
    assert status == 502 and body.startswith(b"cannot connect to example.com:443: ")
    assert b"refused" in body


def test_an_error_message_with_line_breaks_stays_one_line() -> None:
    """CR and LF in a reason become spaces: the answer's body is exactly one line."""
    setup = Setup(["example.com:80"], {"example.com": OSError("a\r\nInjected: 1")})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    assert answer_of(client)[1] == b"cannot resolve example.com: a  Injected: 1\n"


@pytest.mark.parametrize(
    "request_line, message",
    [
        (b"GET http://example.com/ HTTP/2.0", b"not an HTTP/1.x proxy request"),
        (b"GET  http://example.com/ HTTP/1.1", b"not an HTTP/1.x proxy request"),
        (b"GET http://ex\xc3\xa4mple.com/ HTTP/1.1", b"request target is not ASCII"),
        (b"GET ftp://example.com/ HTTP/1.1", b"only http:// URLs and CONNECT"),
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
    status, body = answer_of(client)
    assert status == 400 and body.startswith(message)
    assert setup.resolver.asked == [] and setup.connector.calls == []


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
    """More than ``MAX_HEAD`` bytes without the blank line: 431; no complete head within
    ``HEAD_TIMEOUT``: 408; a complete head in pieces in time is served (no 408 later)."""
    setup = Setup(["example.com:80"], {"example.com": [PUBLIC]})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nA: " + b"a" * proxy_module.MAX_HEAD)
    assert answer_of(client) == (431, b"request head too large\n")

    _, slow_client = setup.connect()
    setup.clock.advance(HEAD_TIMEOUT - 1)
    assert slow_client.value() == b""
    setup.clock.advance(1)
    assert answer_of(slow_client) == (408, b"no complete request head in time\n")

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
    filler = proxy_module.MAX_HEAD - len(start) - 4
    proxy, client = setup.connect()
    proxy.dataReceived(start + b"a" * (filler + 1) + b"\r\n\r\n")
    assert answer_of(client) == (431, b"request head too large\n")
    assert setup.resolver.asked == []
    proxy, client = setup.connect()
    proxy.dataReceived(start + b"a" * filler + b"\r\n\r\n")
    assert client.value() == b"" and len(setup.connector.calls) == 1


def test_connections_beyond_the_limit_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over ``MAX_CONNECTIONS`` at once: 503 at once; a closed one frees its place."""
    monkeypatch.setattr(proxy_module, "MAX_CONNECTIONS", 2)
    setup = Setup(["example.com:80"])
    first, _ = setup.connect()
    _, second_client = setup.connect()
    third, third_client = setup.connect()
    assert second_client.value() == b""
    assert answer_of(third_client) == (503, b"too many egress connections at once\n")
    third.connectionLost(None)
    first.connectionLost(None)
    _, fourth_client = setup.connect()
    assert fourth_client.value() == b""


# -- going away --------------------------------------------------------------------------------


def test_a_client_gone_while_resolving_cancels_the_lookup_and_dials_nothing() -> None:
    """The client closing during the lookup: its Deferred is cancelled, no connect, no
    answer written, the connection forgotten."""
    setup = Setup(["slow.example:80"], {"slow.example": None})
    proxy, client = setup.connect()
    proxy.dataReceived(b"GET http://slow.example/ HTTP/1.1\r\n\r\n")
    [waiting] = setup.resolver.waiting
    proxy.connectionLost(None)
    assert waiting.called  # cancelled
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
    """The client closing drops the upstream; the upstream closing drops the client (its
    producer unregistered first)."""
    setup = Setup(["example.com:443"], {"example.com": [PUBLIC]})
    proxy, client = setup.connect()
    proxy.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    _, server = setup.connector.accept()
    proxy.connectionLost(None)
    assert server.disconnecting

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


def test_the_real_connector_dials_the_address_with_the_connect_timeout() -> None:
    """``connect_tcp`` uses TCP4 for IPv4 and TCP6 for IPv6 addresses, with
    ``CONNECT_TIMEOUT`` (a MemoryReactor: nothing is dialled)."""
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    connect = proxy_module.connect_tcp(reactor)
    connect(PUBLIC, 443, Protocol())
    connect("2606:2800:220:1::1", 80, Protocol())
    [(host4, port4, _, timeout4, _), (host6, port6, _, timeout6, _)] = reactor.tcpClients
    assert (host4, port4, timeout4) == (PUBLIC, 443, CONNECT_TIMEOUT)
    assert (host6, port6, timeout6) == ("2606:2800:220:1::1", 80, CONNECT_TIMEOUT)
