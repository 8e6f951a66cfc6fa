"""The egress proxy's protocol in memory (``twistedgw.egress.proxy``): one request head, a
decision, then bytes both ways; every answer it writes itself, byte for byte; the names and
addresses it resolves and connects to, and the head's deadline and size limit."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twistedgw.egress import proxy as egress_proxy
from twistedgw.egress.policy import EgressPolicy
from twistedgw.egress.proxy import (
    HEAD_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_HEAD,
    EgressProxy,
    EgressProxyFactory,
    Logged,
)


class Resolver:
    def __init__(self, answers: dict[str, Deferred[list[str]] | list[str]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        self.asked.append((host, port))
        answer = self.answers.get(host, [])
        return answer if isinstance(answer, Deferred) else succeed(answer)


class Connects:
    """A connector that connects each upstream to a string transport (or fails)."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.upstreams: list[tuple[Protocol, StringTransport]] = []
        self.failure = failure

    def __call__(self, address: str, port: int, protocol: Protocol) -> Deferred[Any]:
        self.calls.append((address, port))
        if self.failure is not None:
            return fail(self.failure)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.upstreams.append((protocol, transport))
        return succeed(protocol)


def make(
    patterns: list[str],
    hosts: dict[str, Any] | None = None,
    connects: Connects | None = None,
    policy: EgressPolicy | None = None,
) -> tuple[EgressProxyFactory, Clock, Resolver, Connects]:
    clock = Clock()
    resolver = Resolver(hosts or {})
    connects = connects or Connects()
    factory = EgressProxyFactory(
        "sb1", patterns, policy or EgressPolicy(), resolver, clock, connect=connects
    )
    return factory, clock, resolver, connects


def open_connection(factory: EgressProxyFactory) -> tuple[EgressProxy, StringTransport]:
    proxy = factory.buildProtocol(None)
    transport = StringTransport()
    proxy.makeConnection(transport)
    return proxy, transport


def answer(status: int, phrase: str, line: str) -> bytes:
    body = line.encode() + b"\n"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, phrase.encode(), len(body))
        + body
    )


def test_an_allowed_http_request_is_forwarded_without_hop_headers() -> None:
    """An absolute ``http://`` request goes to the resolved address with an origin-form
    target, the proxy's own headers dropped and ``Connection: close`` added; body bytes
    that came with the head follow it; the answer comes back as is."""
    factory, _, resolver, connects = make(["a.test"], {"a.test": ["93.184.216.34"]})
    proxy, transport = open_connection(factory)
    proxy.dataReceived(
        b"POST http://user@A.test:80/p?q=1 HTTP/1.1\r\nHost: a.test\r\n"
        b"Proxy-Authorization: x\r\nKeep-Alive: 5\r\nConnection: keep-alive\r\n"
        b"Content-Length: 4\r\n\r\nbo"
    )
    proxy.dataReceived(b"dy")
    assert resolver.asked == [("a.test", 80)]
    assert connects.calls == [("93.184.216.34", 80)]
    [(upstream, upstream_transport)] = connects.upstreams
    assert upstream_transport.value() == (
        b"POST /p?q=1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n"
        b"Connection: close\r\n\r\nbody"
    )
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 200 OK\r\n\r\n"
    assert list(factory.decisions) == [Logged("a.test", 80, True, "allowed", "93.184.216.34")]
    assert proxy.up == len(upstream_transport.value()) and proxy.down == 19
    upstream.connectionLost(None)
    assert transport.disconnecting and proxy.upstream is None


def test_a_connect_tunnel_says_established_then_carries_bytes() -> None:
    """``CONNECT host:port`` is answered ``200 Connection established`` once connected, and
    then bytes go both ways untouched."""
    factory, _, _, connects = make(["a.test:443"], {"a.test": ["93.184.216.34"]})
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n\x16\x03")
    assert transport.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    [(upstream, upstream_transport)] = connects.upstreams
    assert upstream_transport.value() == b"\x16\x03"
    proxy.dataReceived(b"more")
    upstream.dataReceived(b"back")
    assert upstream_transport.value() == b"\x16\x03more"
    assert transport.value().endswith(b"back")
    assert (proxy.up, proxy.down) == (6, 4)
    proxy.connectionLost(None)
    assert upstream_transport.disconnecting and proxy not in factory.connections


def test_an_ip_literal_is_not_resolved() -> None:
    """An IP literal in the target goes straight to the address rule and the connector."""
    factory, _, resolver, connects = make(["[2606:4700::1111]:443"])
    proxy, _ = open_connection(factory)
    proxy.dataReceived(b"CONNECT [2606:4700::1111]:443 HTTP/1.1\r\n\r\n")
    assert resolver.asked == []
    assert connects.calls == [("2606:4700::1111", 443)]


def test_a_name_outside_the_list_is_403_with_its_reason() -> None:
    """A name not in the sandbox's list is refused before resolving, with a one-line reason,
    logged as a refusal."""
    factory, _, resolver, connects = make(["a.test"])
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"GET http://b.test/ HTTP/1.1\r\n\r\n")
    assert transport.value() == answer(
        403, "Forbidden", "egress refused: b.test:80 is not in this sandbox's egress list"
    )
    assert transport.disconnecting
    assert resolver.asked == [] and connects.calls == []
    assert list(factory.decisions) == [
        Logged("b.test", 80, False, "b.test:80 is not in this sandbox's egress list", "")
    ]


def test_a_name_resolving_to_an_internal_address_is_403() -> None:
    """If any address of the name is off limits, nothing is connected to."""
    factory, _, _, connects = make(["a.test"], {"a.test": ["93.184.216.34", "10.0.0.1"]})
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    reason = "a.test resolves to a private address 10.0.0.1, which egress does not allow"
    assert transport.value() == answer(403, "Forbidden", f"egress refused: {reason}")
    assert connects.calls == []
    assert list(factory.decisions) == [Logged("a.test", 80, False, reason, "10.0.0.1")]


ONLY_HTTP = "only http:// URLs and CONNECT go through this proxy"


@pytest.mark.parametrize(
    ("head", "line"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", ONLY_HTTP),
        (b"GET https://a.test/ HTTP/1.1\r\n\r\n", ONLY_HTTP),
        (b"GET http://a.test/\r\n\r\n", "not an HTTP/1.x proxy request"),
        (b"GET http://a.test/ HTTP/2\r\n\r\n", "not an HTTP/1.x proxy request"),
        (b"CONNECT a.test HTTP/1.1\r\n\r\n", "CONNECT needs host:port"),
        (b"CONNECT a.test:0 HTTP/1.1\r\n\r\n", "bad port"),
        (b"CONNECT a.test:65536 HTTP/1.1\r\n\r\n", "bad port"),
        (b"CONNECT [::1:443 HTTP/1.1\r\n\r\n", "bad IPv6 literal"),
        (b"GET http://\xc3\xa9.test/ HTTP/1.1\r\n\r\n", "request target is not ASCII"),
    ],
)
def test_malformed_requests_are_400_with_what_is_wrong(head: bytes, line: str) -> None:
    """A head the proxy cannot act on is a 400 naming the problem."""
    factory, _, _, connects = make(["a.test"])
    proxy, transport = open_connection(factory)
    proxy.dataReceived(head)
    assert transport.value() == answer(400, "Bad Request", line)
    assert connects.calls == []


def test_port_ends_of_connect_targets_are_accepted() -> None:
    """Ports 1 and 65535 are valid targets (refused here only by the list)."""
    for port in (1, 65535):
        factory, _, _, _ = make(["a.test"])
        proxy, transport = open_connection(factory)
        proxy.dataReceived(b"CONNECT a.test:%d HTTP/1.1\r\n\r\n" % port)
        assert transport.value().startswith(b"HTTP/1.1 403 ")


def test_resolution_and_connect_failures_are_502() -> None:
    """A name that does not resolve, has no address, or whose address refuses the connection
    is a 502 saying which."""
    factory, _, _, _ = make(["a.test"], {"a.test": fail(RuntimeError("no such name"))})
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert transport.value().endswith(b"\r\n\r\ncannot resolve a.test: no such name\n")

    factory, _, _, _ = make(["a.test"], {"a.test": []})
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    assert transport.value() == answer(502, "Bad Gateway", "a.test has no address")

    refused = Connects(ConnectionRefusedError("nope"))
    factory, _, _, _ = make(["a.test"], {"a.test": ["93.184.216.34"]}, refused)
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"\r\n\r\ncannot connect to a.test:80: " in transport.value()


def test_a_slow_resolver_times_out_and_a_leaving_client_cancels_it() -> None:
    """Resolving is given 10 s (then a 502 saying it timed out); a client that leaves while
    the name is resolved cancels the lookup."""
    pending: Deferred[list[str]] = Deferred()
    factory, clock, _, _ = make(["a.test"], {"a.test": pending})
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    clock.advance(9.9)
    assert transport.value() == b""
    clock.advance(0.1)
    assert transport.value() == answer(502, "Bad Gateway", "cannot resolve a.test: timed out")

    cancelled: list[object] = []
    waiting: Deferred[list[str]] = Deferred(cancelled.append)
    factory, _, _, connects = make(["a.test"], {"a.test": waiting})
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    proxy.connectionLost(None)
    assert len(cancelled) == 1 and connects.calls == []
    assert transport.value() == b""


def test_the_head_has_a_deadline_and_a_size_limit() -> None:
    """No complete head within 30 s is a 408; a head beyond 16 KiB is a 431."""
    assert (HEAD_TIMEOUT, MAX_HEAD) == (30.0, 16 * 1024)
    factory, clock, _, _ = make(["a.test"])
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"GET http://a.test/ HTTP/1.1\r\n")
    clock.advance(29.9)
    assert transport.value() == b""
    clock.advance(0.1)
    assert transport.value() == answer(408, "Request Timeout", "no complete request head in time")

    factory, clock, _, _ = make(["a.test"])
    proxy, transport = open_connection(factory)
    proxy.dataReceived(b"x" * MAX_HEAD)
    assert transport.value() == b""
    proxy.dataReceived(b"x")
    assert transport.value() == answer(
        431, "Request Header Fields Too Large", "request head too large"
    )
    clock.advance(60)
    assert transport.value().count(b"HTTP/1.1") == 1


def test_connections_beyond_the_cap_are_503_and_close_all_aborts() -> None:
    """The 513th connection at once gets a 503; ``close_all`` aborts every connection."""
    assert MAX_CONNECTIONS == 512
    factory, _, _, _ = make(["a.test"])
    opened = [open_connection(factory) for _ in range(MAX_CONNECTIONS)]
    assert all(t.value() == b"" for _, t in opened)
    _, extra = open_connection(factory)
    assert extra.value() == answer(
        503, "Service Unavailable", "too many egress connections at once"
    )
    aborted: list[EgressProxy] = []
    for proxy, _ in opened[:2]:
        proxy.abort = lambda p=proxy: aborted.append(p)  # type: ignore[method-assign]
    factory.connections = {p for p, _ in opened[:2]}
    factory.close_all()
    assert set(aborted) == {p for p, _ in opened[:2]}


def test_decisions_are_counted_by_outcome_and_kind() -> None:
    """Each decision increments the egress decisions counter for its outcome and kind."""
    counter = egress_proxy.metrics.EGRESS_DECISIONS

    def count(decision: str, reason: str) -> float:
        return counter.labels(decision=decision, reason=reason)._value.get()

    before = (count("refused", "not_listed"), count("allowed", "allowed"))
    factory, _, _, _ = make(["a.test"], {"a.test": ["93.184.216.34"]})
    open_connection(factory)[0].dataReceived(b"GET http://b.test/ HTTP/1.1\r\n\r\n")
    open_connection(factory)[0].dataReceived(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    assert (count("refused", "not_listed"), count("allowed", "allowed")) == (
        before[0] + 1,
        before[1] + 1,
    )
