"""The egress proxy (``twistedgw.egress``) on loopback: an "internet" server on 127.0.0.1 that
the test starts, the proxy on a Unix socket, and an injected resolver that maps ``.test``
names. Nothing leaves this machine; the rebinding case never connects at all."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from twistedgw import metrics
from twistedgw.egress.policy import (
    EgressPolicy,
    HostPattern,
    decide_name,
    parse_cidrs,
    parse_pattern,
    parse_patterns,
    refused_address,
)
from twistedgw.egress.proxy import EgressProxyFactory, loopback_only
from twistedgw.egress.resolver import (
    TEST_HOSTS_ENV,
    TEST_HOSTS_MAGIC,
    HostsResolver,
    read_test_hosts,
    resolver_from_environ,
)
from twistedgw.egress.service import BACKLOG, EgressProxies
from twistedgw.registry import SandboxRegistry
from twistedgw.runtime.hardening import EGRESS_SOCKET_NAME
from twistedgw.sandbox import Sandbox, SandboxSettings

LOOPBACK = parse_cidrs(["127.0.0.0/8"])


class Internet(Resource):
    """The test's "internet": echoes what it got, or sends ``/big?n=BYTES``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes | None]] = []

    def render(self, request: Any) -> Any:
        self.seen.append(
            (
                request.method,
                request.uri,
                request.requestHeaders.getRawHeaders(b"connection", [None])[0],
            )
        )
        if request.path == b"/big":
            size = int(request.args[b"n"][0])
            request.setHeader(b"content-length", str(size).encode())
            _send_big(request, size)
            return NOT_DONE_YET
        body = request.content.read()
        return b"hello from " + request.getHeader(b"host") + b" " + request.uri + b" " + body


def _send_big(request: Any, size: int) -> None:
    """Write ``size`` bytes as a pull producer would: only when the transport asks."""
    chunk = b"x" * 65536
    sent = [0]

    class Producer:
        def resumeProducing(self) -> None:
            if sent[0] >= size:
                return
            n = min(len(chunk), size - sent[0])
            sent[0] += n
            request.write(chunk[:n])
            if sent[0] >= size:
                request.unregisterProducer()
                request.finish()

        def stopProducing(self) -> None:
            sent[0] = size

    request.registerProducer(Producer(), False)


class Collect(Protocol):
    """A client of the proxy: sends ``request``, collects the answer."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.data))


@pytest_twisted.async_yield_fixture
async def internet() -> AsyncIterator[tuple[int, Internet]]:
    resource = Internet()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield port.getHost().port, resource
    await port.stopListening()


class Proxy:
    """A sandbox's egress proxy on a Unix socket, with a recording connector."""

    def __init__(self, path: Path, factory: EgressProxyFactory, connects: list[Any]) -> None:
        self.path = path
        self.factory = factory
        self.connects = connects

    async def ask(self, request: bytes) -> bytes:
        client = Collect(request)
        await connectProtocol(UNIXClientEndpoint(reactor, str(self.path)), client)
        return await client.done


@pytest.fixture
def make_proxy(tmp_path: Path) -> Any:
    ports: list[Any] = []

    def make(
        patterns: list[str],
        hosts: dict[str, list[str]],
        policy: EgressPolicy | None = None,
    ) -> Proxy:
        connects: list[Any] = []
        factory = EgressProxyFactory(
            "sb1",
            patterns,
            policy or EgressPolicy(allow_cidrs=LOOPBACK),
            HostsResolver(hosts),
            reactor,
        )
        real = factory.connect

        def recording(address: str, port: int, protocol: Any) -> Deferred[Any]:
            connects.append((address, port))
            if address != "127.0.0.1":
                # Never a packet beyond loopback, even when the code under test is wrong.
                return fail(ConnectionRefusedError(f"test: no connects to {address}"))
            return real(address, port, protocol)

        factory.connect = recording
        path = tmp_path / f"egress{len(ports)}.sock"
        ports.append(reactor.listenUNIX(str(path), factory, backlog=BACKLOG))
        return Proxy(path, factory, connects)

    yield make
    for port in ports:
        port.stopListening()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1]


# -- patterns and the operator's caps ------------------------------------------------------


def test_patterns_default_to_ports_80_and_443_and_wildcards_cover_subdomains_only() -> None:
    """``host`` allows 80 and 443; ``host:port`` that port; ``*.d`` names below d, not d."""
    plain = parse_pattern("Example.COM.")
    assert plain == HostPattern("example.com", frozenset({80, 443}))
    assert plain.matches("example.com", 443) and not plain.matches("example.com", 8080)
    wild = parse_pattern("*.example.org:8443")
    assert wild.matches("a.b.example.org", 8443)
    assert not wild.matches("example.org", 8443) and not wild.matches("badexample.org", 8443)
    for bad in ["", "exa mple.com", "example.com:0", "example.com:x", "*.1.2.3.4", 7, "a..b"]:
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_creators_may_only_narrow_the_server_list_and_stay_under_the_cap() -> None:
    """With ``--egress-allow``, creator patterns must lie within it; ``--egress-max`` caps
    their number; the accepted list is stored as ``host:port`` entries."""
    policy = EgressPolicy(
        allow=parse_patterns(["*.example.org", "api.example.com:443"]), max_patterns=3
    )
    assert policy.creation_patterns(
        ["a.example.org:443", "*.b.example.org", "api.example.com:443"]
    ) == (
        "a.example.org:443",
        "*.b.example.org:80",
        "*.b.example.org:443",
        "api.example.com:443",
    )
    for wider in (["example.org"], ["*.org"], ["api.example.com"], ["a.example.org:8080"]):
        with pytest.raises(ValueError, match="not within the server's allow-list"):
            policy.creation_patterns(wider)
    with pytest.raises(ValueError, match="server maximum of 3"):
        policy.creation_patterns(["a.example.org"] * 4)
    with pytest.raises(ValueError):
        policy.creation_patterns("example.org")


def test_address_rule_refuses_internal_ranges_unless_allowed() -> None:
    """Loopback, link-local (cloud metadata), private, multicast and IPv4-mapped forms of
    them are refused; ``--egress-allow-cidr`` opens one range; global addresses pass."""
    policy = EgressPolicy()
    for address, kind in [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.1.2.3", "private"),
        ("192.168.1.1", "private"),
        ("224.0.0.1", "multicast"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
    ]:
        reason = refused_address(address, policy)
        assert reason is not None and kind in reason, (address, reason)
    assert refused_address("93.184.216.34", policy) is None
    opened = EgressPolicy(allow_cidrs=parse_cidrs(["10.1.0.0/16"]))
    assert refused_address("10.1.2.3", opened) is None
    assert refused_address("10.2.0.1", opened) is not None


def test_server_list_is_enforced_again_at_request_time() -> None:
    """A name in the sandbox's list but outside the server's list (narrowed after creation)
    is refused."""
    patterns = parse_patterns(["a.example.org"])
    narrowed = EgressPolicy(allow=parse_patterns(["b.example.org"]))
    assert not decide_name(patterns, narrowed, "a.example.org", 443).allowed
    assert decide_name(patterns, EgressPolicy(), "A.Example.Org.", 443).allowed


def test_test_hosts_file_maps_only_dot_test_names(tmp_path: Path) -> None:
    """The gateway's test resolver needs its magic first line and maps only ``.test`` names
    (no real name can be redirected by it); without the variable the system resolver is
    used."""
    good = tmp_path / "hosts"
    good.write_text(f"{TEST_HOSTS_MAGIC}\n127.0.0.1 allowed.test denied.test\n")
    assert read_test_hosts(good) == {"allowed.test": ["127.0.0.1"], "denied.test": ["127.0.0.1"]}
    real = tmp_path / "real"
    real.write_text(f"{TEST_HOSTS_MAGIC}\n127.0.0.1 pypi.org\n")
    with pytest.raises(ValueError, match=r"not a \.test name"):
        read_test_hosts(real)
    unmarked = tmp_path / "unmarked"
    unmarked.write_text("127.0.0.1 allowed.test\n")
    with pytest.raises(ValueError):
        read_test_hosts(unmarked)
    assert not isinstance(resolver_from_environ(reactor, {}), HostsResolver)
    assert isinstance(resolver_from_environ(reactor, {TEST_HOSTS_ENV: str(good)}), HostsResolver)


# -- the proxy on loopback -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_allowed_name_over_http_reaches_the_server(internet: Any, make_proxy: Any) -> None:
    """An absolute-URI request for an allowed name reaches the server in origin form with
    ``Connection: close``, body included, and the decision is recorded as allowed."""
    port, server = internet
    proxy = make_proxy([f"allowed.test:{port}"], {"allowed.test": ["127.0.0.1"]})
    answer = await proxy.ask(
        f"POST http://allowed.test:{port}/path?q=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
        "Proxy-Connection: keep-alive\r\nContent-Length: 4\r\n\r\nbody".encode()
    )
    assert status_of(answer) == 200
    assert body_of(answer) == f"hello from allowed.test:{port} /path?q=1 body".encode()
    assert server.seen == [(b"POST", b"/path?q=1", b"close")]
    assert proxy.connects == [("127.0.0.1", port)]
    (decision,) = proxy.factory.decisions
    assert decision.allowed and decision.host == "allowed.test" and decision.address == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_allowed_name_over_connect_tunnels_bytes(internet: Any, make_proxy: Any) -> None:
    """CONNECT to an allowed name answers 200 and then carries bytes both ways unchanged
    (bytes sent right behind the CONNECT head included)."""
    port, _ = internet
    proxy = make_proxy([f"allowed.test:{port}"], {"allowed.test": ["127.0.0.1"]})
    answer = await proxy.ask(
        f"CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
        f"GET /inside HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
    assert answer.endswith(b"hello from allowed.test /inside ")


@pytest_twisted.ensureDeferred
async def test_denied_name_gets_403_with_a_one_line_reason(internet: Any, make_proxy: Any) -> None:
    """A name (or port) outside the list gets 403 and one line saying why; it is neither
    resolved nor connected to, and the refusal is counted."""
    port, server = internet
    hosts = {"allowed.test": ["127.0.0.1"], "denied.test": ["127.0.0.1"]}
    proxy = make_proxy([f"allowed.test:{port}"], hosts)
    refused = metrics.EGRESS_DECISIONS.labels(decision="refused", reason="not_listed")
    before = refused._value.get()
    for request in (
        f"GET http://denied.test:{port}/ HTTP/1.1\r\nHost: denied.test\r\n\r\n",
        f"CONNECT denied.test:{port} HTTP/1.1\r\n\r\n",
        "CONNECT allowed.test:1 HTTP/1.1\r\n\r\n",
    ):
        answer = await proxy.ask(request.encode())
        assert status_of(answer) == 403
        body = body_of(answer)
        assert body.startswith(b"egress refused: ") and body.count(b"\n") == 1
        assert b"not in this sandbox's egress list" in body
    assert proxy.connects == [] and server.seen == []
    assert proxy.factory.resolver.asked == []
    assert refused._value.get() == before + 3


@pytest_twisted.ensureDeferred
async def test_rebinding_to_metadata_address_is_refused_without_connecting(
    make_proxy: Any,
) -> None:
    """An allowed name that resolves to 169.254.169.254 (DNS rebinding onto the cloud
    metadata service) gets 403: the proxy decides on the address it resolved and never
    connects. So does a loopback answer without ``--egress-allow-cidr``."""
    proxy = make_proxy(
        ["allowed.test:80", "loop.test:80", "mixed.test:80"],
        {
            "allowed.test": ["169.254.169.254"],
            "loop.test": ["127.0.0.1"],
            "mixed.test": ["93.184.216.34", "169.254.169.254"],
        },
        policy=EgressPolicy(),
    )
    for name, kind in [
        ("allowed.test", b"link-local"),
        ("loop.test", b"loopback"),
        ("mixed.test", b"link-local"),
    ]:
        answer = await proxy.ask(f"GET http://{name}/latest/meta-data/ HTTP/1.1\r\n\r\n".encode())
        assert status_of(answer) == 403, answer
        assert kind in body_of(answer)
    assert proxy.connects == []
    assert [d.allowed for d in proxy.factory.decisions] == [False, False, False]
    assert proxy.factory.decisions[0].address == "169.254.169.254"


@pytest_twisted.ensureDeferred
async def test_ip_literals_obey_the_list_and_the_address_rule(make_proxy: Any) -> None:
    """An IP literal must be listed itself, and still passes the address rule."""
    proxy = make_proxy(["169.254.169.254:80"], {}, policy=EgressPolicy())
    answer = await proxy.ask(b"GET http://169.254.169.254/ HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 403 and b"link-local" in body_of(answer)
    assert proxy.connects == []


@pytest_twisted.ensureDeferred
async def test_malformed_and_https_absolute_requests_get_400(make_proxy: Any) -> None:
    """Garbage, ``https://`` absolute URIs (use CONNECT) and CONNECT without a port: 400."""
    proxy = make_proxy(["allowed.test"], {"allowed.test": ["127.0.0.1"]})
    for request in (
        b"hello\r\n\r\n",
        b"GET https://allowed.test/ HTTP/1.1\r\n\r\n",
        b"CONNECT allowed.test HTTP/1.1\r\n\r\n",
        b"GET /relative HTTP/1.1\r\n\r\n",
    ):
        assert status_of(await proxy.ask(request)) == 400
    assert status_of(await proxy.ask(b"GET http://x/ HTTP/1.1\r\nA: " + b"a" * 20000)) == 431
    assert proxy.connects == []


@pytest_twisted.ensureDeferred
async def test_a_hundred_parallel_requests_all_complete(internet: Any, make_proxy: Any) -> None:
    """100 requests at once through one sandbox's proxy all get their own answer."""
    port, server = internet
    proxy = make_proxy([f"allowed.test:{port}"], {"allowed.test": ["127.0.0.1"]})
    answers = await gatherResults(
        [
            Deferred.fromCoroutine(
                proxy.ask(
                    f"GET http://allowed.test:{port}/{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
                ),
            )
            for i in range(100)
        ]
    )
    assert [body_of(a).split(b" ")[3] for a in answers] == [f"/{i}".encode() for i in range(100)]
    assert len(server.seen) == 100
    assert proxy.factory.connections == set()


class Stalling(Protocol):
    """Sends a request, reads a little of the answer, then stops reading."""

    def __init__(self, request: bytes, stop_after: int) -> None:
        self.request = request
        self.stop_after = stop_after
        self.received = 0
        self.stalled: Deferred[None] = Deferred()
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.stop_after and not self.stalled.called:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.stalled.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


def _buffered(transport: Any) -> int:
    """Bytes a Twisted transport holds unsent."""
    return len(transport.dataBuffer) + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_a_client_that_stalls_mid_body_does_not_fill_the_proxy(
    internet: Any, make_proxy: Any
) -> None:
    """A client that stops reading a 64 MiB answer after 1 MiB: the proxy stops reading from
    the server (its buffers stay under 1 MiB while the server holds the rest), and when the
    client reads again the whole body arrives."""
    port, _ = internet
    size = 64 * 1024 * 1024
    proxy = make_proxy([f"allowed.test:{port}"], {"allowed.test": ["127.0.0.1"]})
    client = Stalling(
        f"GET http://allowed.test:{port}/big?n={size} HTTP/1.1\r\n\r\n".encode(), 1024 * 1024
    )
    await connectProtocol(UNIXClientEndpoint(reactor, str(proxy.path)), client)
    await client.stalled
    await deferLater(reactor, 1.0, lambda: None)
    (connection,) = proxy.factory.connections
    held = _buffered(connection.transport) + _buffered(connection.upstream.transport)
    assert held < 1024 * 1024
    assert connection.down < 8 * 1024 * 1024  # the server's socket holds the rest
    down_then = connection.down
    await deferLater(reactor, 0.5, lambda: None)
    assert connection.down == down_then  # still paused, not creeping
    client.transport.resumeProducing()  # type: ignore[union-attr]
    await client.done
    assert client.received > size
    gc.collect()


def test_a_gateway_under_test_connects_to_loopback_only() -> None:
    """The guard a gateway with a test name table runs with: any address but loopback fails
    at once, without calling the real connector (so no test packet can leave this machine
    even if the address rule were broken)."""
    calls: list[str] = []

    def connector(address: str, port: int, protocol: Any) -> Deferred[Any]:
        calls.append(address)
        return succeed(None)

    guarded = loopback_only(connector)
    failures: list[Any] = []
    for address in ("169.254.169.254", "93.184.216.34", "10.0.0.1", "::ffff:169.254.169.254"):
        guarded(address, 80, Protocol()).addErrback(failures.append)
    assert [f.check(ConnectionRefusedError) for f in failures] == [ConnectionRefusedError] * 4
    guarded("127.0.0.1", 80, Protocol())
    guarded("::1", 80, Protocol())
    assert calls == ["127.0.0.1", "::1"]


@pytest_twisted.ensureDeferred
async def test_proxies_follow_the_registry(tmp_path: Path) -> None:
    """An egress sandbox added to the registry (created or recovered) gets a proxy socket
    beside its agent socket, which serves its allow-list; forgetting it stops the listener.
    Sandboxes without ``egress`` get none."""
    registry = SandboxRegistry()
    proxies = EgressProxies(reactor, EgressPolicy(), HostsResolver({}))
    registry.watch(proxies.sandbox_added, proxies.sandbox_removed)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    settings = SandboxSettings(idle_timeout=10.0, network="none", egress=("allowed.test:80",))
    egress_sandbox = Sandbox(
        "a" * 32,
        "c1",
        0.0,
        "",
        "",
        0,
        "s",
        0.0,
        settings,
        agent_socket=str(tmp_path / "a/agent.sock"),
    )
    plain = Sandbox(
        "b" * 32, "c2", 0.0, "", "", 0, "s", 0.0,
        SandboxSettings(idle_timeout=10.0, network="none"),
        agent_socket=str(tmp_path / "b/agent.sock"),
    )  # fmt: skip
    registry.add(egress_sandbox)
    registry.add(plain)
    socket_path = tmp_path / "a" / EGRESS_SOCKET_NAME
    assert socket_path.is_socket() and not (tmp_path / "b" / EGRESS_SOCKET_NAME).exists()
    assert set(proxies.listeners) == {"a" * 32}
    answer = await Proxy(socket_path, proxies.listeners["a" * 32][1], []).ask(
        b"GET http://denied.test/ HTTP/1.1\r\n\r\n"
    )
    assert status_of(answer) == 403
    registry.remove("a" * 32)
    await deferLater(reactor, 0.05, lambda: None)
    assert proxies.listeners == {} and not socket_path.exists()


def test_a_pattern_port_runs_from_1_to_65535() -> None:
    """Both ends of the port range are allowed in a pattern; 0 and 65536 are refused, saying
    which pattern."""
    assert parse_pattern("a.test:1").ports == frozenset({1})
    assert parse_pattern("a.test:65535").ports == frozenset({65535})
    for bad in ("a.test:0", "a.test:65536"):
        with pytest.raises(ValueError) as refused:
            parse_pattern(bad)
        assert str(refused.value) == f"egress pattern {bad!r} has no valid port"
