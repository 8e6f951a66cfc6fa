"""The HTTP edge (``twistedgw.web.site``) in memory: raw bytes into the real ``Site`` and channel
over a string transport, so what twisted.web does before a route runs is what is tested."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.testing.fakes import FakeRuntime
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator
from twistedgw.web.site import LOOPBACK_HOSTS, EdgePolicy, default_hosts, fit_descriptors, make_site

TOKEN = "t" * 32


class Conn:
    """One client connection to the site, over a string transport."""

    def __init__(self, site: Site, clock: Clock) -> None:
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8003),
        )
        self.channel: Any = site.buildProtocol(None)
        self.channel.callLater = clock.callLater
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def response(self) -> tuple[int, dict[str, bytes], Any]:
        raw = self.transport.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1]) if lines[0] else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip()
        if headers.get("transfer-encoding") == b"chunked":
            chunks, rest = [], body
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                if int(size, 16) == 0:
                    break
                chunks.append(rest[: int(size, 16)])
                rest = rest[int(size, 16) + 2 :]
            body = b"".join(chunks)
        return status, headers, json.loads(body) if body else None


@pytest.fixture
def site(manager: SandboxManager) -> Site:
    return make_site(GatewayAPI(manager), policy=EdgePolicy(allowed_hosts=LOOPBACK_HOSTS))


@pytest.fixture
def token_site(manager: SandboxManager) -> Site:
    auth = Authenticator.from_tokens([TOKEN])
    return make_site(
        GatewayAPI(manager, authenticator=auth),
        policy=EdgePolicy(authenticator=auth, allowed_hosts=LOOPBACK_HOSTS),
    )


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1:8003", *headers]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


# -- defect 1: bodies ----------------------------------------------------------------------


def test_announced_oversized_body_is_413_before_any_byte(site: Site, clock: Clock) -> None:
    """A Content-Length beyond the cap is answered 413 from the headers alone, the connection
    is closed, and body bytes that follow are neither stored nor parsed."""
    conn = Conn(site, clock)
    conn.send(
        request(
            "POST", "/sandboxes", "Content-Type: application/json", "Content-Length: 1000000000000"
        )
    )
    status, headers, body = conn.response()
    assert status == 413 and "larger" in body["error"]
    assert headers["connection"] == b"close"
    request_obj = conn.channel.requests[-1]
    conn.send(b"x" * 100_000)
    assert request_obj.content.getvalue() == b""


def test_chunked_body_is_capped_while_it_streams(site: Site, clock: Clock) -> None:
    """A chunked body gets 413 as soon as it passes the cap, and no more than the cap is
    kept, even when a chunk header announces a huge chunk."""
    conn = Conn(site, clock)
    conn.send(
        request(
            "POST", "/sandboxes", "Content-Type: application/json", "Transfer-Encoding: chunked"
        )
    )
    request_obj = conn.channel.requests[-1]
    conn.send(b"FFFFFFFFFFFFFFFFFFFFFFFF\r\n")
    assert conn.transport.value() == b""
    for _ in range(20):
        conn.send(b"y" * 8192)
    status, _, _ = conn.response()
    assert status == 413
    assert len(request_obj.content.getvalue()) <= 64 * 1024


def test_token_gateway_answers_401_before_the_body(token_site: Site, clock: Clock) -> None:
    """Without a valid token, a create is refused 401 from its headers, before 413 or any
    body byte, on a token gateway."""
    conn = Conn(token_site, clock)
    conn.send(
        request("POST", "/sandboxes", "Content-Type: application/json", "Content-Length: 300000000")
    )
    status, headers, _ = conn.response()
    assert status == 401
    assert headers["www-authenticate"].startswith(b"Bearer")


def test_valid_token_and_small_json_body_create(
    token_site: Site, clock: Clock, runtime: FakeRuntime
) -> None:
    """The edge lets a proper request through: token, JSON type, small body."""
    conn = Conn(token_site, clock)
    body = b'{"idle_timeout": 60}'
    conn.send(
        request(
            "POST",
            "/sandboxes",
            f"Authorization: Bearer {TOKEN}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            body=body,
        )
    )
    status, _, created = conn.response()
    assert status == 200, created
    assert len(runtime.containers) == 1


def test_bodyless_post_still_creates(site: Site, clock: Clock, runtime: FakeRuntime) -> None:
    """The seed's plain ``curl -X POST`` (no body, no Content-Type) still creates."""
    conn = Conn(site, clock)
    conn.send(request("POST", "/sandboxes"))
    status, _, created = conn.response()
    assert status == 200 and created["status"] == "created"


# -- defect 2 and 11: the WebSocket route --------------------------------------------------


def test_ws_route_refuses_bodies_and_other_methods_in_json(
    site: Site, clock: Clock, manager: SandboxManager
) -> None:
    """A POST with a body on /ws/{id} is refused 413 from its headers (never read into
    memory); without a body it is a JSON 405."""
    conn = Conn(site, clock)
    conn.send(request("POST", "/ws/abc", "Content-Length: 400000000"))
    status, _, _ = conn.response()
    assert status == 413
    conn = Conn(site, clock)
    conn.send(request("POST", "/ws/abc"))
    status, headers, body = conn.response()
    assert status == 405 and headers["content-type"] == b"application/json"
    assert "error" in body


def test_ws_route_without_upgrade_is_json_426_and_never_redirects(
    site: Site, clock: Clock, runtime: FakeRuntime
) -> None:
    """GET /ws/{id} without Upgrade gets a JSON 426, not Autobahn's status page or a
    redirect."""
    conn = Conn(site, clock)
    conn.send(request("POST", "/sandboxes"))
    sandbox_id = conn.response()[2]["sandbox_id"]
    conn = Conn(site, clock)
    conn.send(request("GET", f"/ws/{sandbox_id}?redirect=http://evil.example/"))
    status, headers, _ = conn.response()
    assert status == 426
    assert headers["content-type"] == b"application/json"
    assert "location" not in headers
    assert b"autobahn" not in conn.transport.value().lower()


# -- defect 3: slow clients, connection cap ------------------------------------------------


def test_slow_body_is_dropped_at_the_body_deadline(manager: SandboxManager, clock: Clock) -> None:
    """A client trickling its body is answered 408 and dropped once the body deadline
    passes, however often it sends a byte."""
    site = make_site(GatewayAPI(manager), policy=EdgePolicy(body_timeout=5.0))
    conn = Conn(site, clock)
    conn.send(request("POST", "/sandboxes", "Content-Type: application/json", "Content-Length: 10"))
    for _ in range(4):
        clock.advance(1)
        conn.send(b" ")
    assert conn.transport.value() == b""
    clock.advance(1.5)
    assert conn.response()[0] == 408


def test_http_connections_are_capped_with_503(manager: SandboxManager, clock: Clock) -> None:
    """Beyond the cap a new connection gets a JSON 503 at once; closing one frees a place."""
    site = make_site(GatewayAPI(manager), policy=EdgePolicy(max_connections=3))
    conns = [Conn(site, clock) for _ in range(3)]
    extra = Conn(site, clock)
    status, headers, _ = extra.response()
    assert status == 503 and headers["retry-after"] == b"5"
    conns[0].channel.connectionLost(None)
    again = Conn(site, clock)
    assert again.transport.value() == b""
    assert len(site.http_channels) == 3  # type: ignore[attr-defined]


def test_idle_timeout_is_seconds_not_hours(site: Site) -> None:
    """The idle timeout is a minute (a guard: the installed Twisted's default is 60 s too; it
    is an idle timer, which trickled bytes reset, hence the body deadline above)."""
    assert site.timeOut is not None and site.timeOut <= 60


# -- defect 6: undecodable headers ---------------------------------------------------------


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe", b"Idempotency-Key: \xff"])
@pytest.mark.parametrize("tokens", [False, True])
def test_non_utf8_headers_are_400_or_401(
    site: Site, token_site: Site, clock: Clock, header: bytes, tokens: bool
) -> None:
    """A header that is not UTF-8 gives 400 (401 for a token gateway's Authorization), never
    a 500, on every route."""
    for method, path in (("GET", "/sandboxes"), ("POST", "/sandboxes"), ("GET", "/ws/x")):
        conn = Conn(token_site if tokens else site, clock)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        conn.send(head + header + b"\r\n\r\n")
        status = conn.response()[0]
        if tokens and header.startswith(b"Authorization"):
            assert status == 401, (method, path)
        elif tokens:
            assert status in (400, 401), (method, path)
        else:
            assert status == 400, (method, path)


# -- defect 10: browsers -------------------------------------------------------------------


def test_foreign_host_is_refused(site: Site, clock: Clock) -> None:
    """DNS rebinding: a Host this gateway does not serve gets 421, before any route."""
    conn = Conn(site, clock)
    conn.send(b"GET /sandboxes HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert conn.response()[0] == 421
    conn = Conn(site, clock)
    conn.send(b"GET /sandboxes HTTP/1.1\r\nHost: localhost:8003\r\n\r\n")
    assert conn.response()[0] == 200


def test_cross_origin_requests_are_refused(site: Site, clock: Clock) -> None:
    """A browser's foreign Origin is refused 403 (WebSocket handshakes and REST alike);
    the gateway's own origin passes."""
    for path in ("/ws/x", "/sandboxes"):
        conn = Conn(site, clock)
        conn.send(request("GET", path, "Origin: http://evil.example"))
        assert conn.response()[0] == 403, path
    conn = Conn(site, clock)
    conn.send(request("GET", "/sandboxes", "Origin: http://127.0.0.1:8003"))
    assert conn.response()[0] == 200


def test_allowed_origins_pass(manager: SandboxManager, clock: Clock) -> None:
    """An origin listed in --allowed-origins is accepted."""
    policy = EdgePolicy(
        allowed_hosts=LOOPBACK_HOSTS, allowed_origins=frozenset({"https://ui.example"})
    )
    site = make_site(GatewayAPI(manager), policy=policy)
    conn = Conn(site, clock)
    conn.send(request("GET", "/sandboxes", "Origin: https://ui.example"))
    assert conn.response()[0] == 200


def test_cross_site_text_plain_post_is_415(site: Site, clock: Clock, runtime: FakeRuntime) -> None:
    """A body that does not say application/json (a form or text/plain POST) is refused 415
    and creates nothing."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        conn = Conn(site, clock)
        headers = ["Content-Length: 2"] + (
            [f"Content-Type: {content_type}"] if content_type else []
        )
        conn.send(request("POST", "/sandboxes", *headers, body=b"{}"))
        assert conn.response()[0] == 415, content_type
    assert runtime.containers == {}


def test_default_hosts_follow_the_bound_interface() -> None:
    """Loopback binding accepts loopback names only; all interfaces accept IP literals and
    this machine's names too."""
    names, any_ip = default_hosts("127.0.0.1")
    assert names == LOOPBACK_HOSTS and not any_ip
    names, any_ip = default_hosts(None, ["gw.example"])
    assert "gw.example" in names and any_ip
    policy = EdgePolicy(allowed_hosts=names, any_ip_host=any_ip)
    assert policy.host_allowed("10.1.2.3:8003") and policy.host_allowed("[::1]:8003")
    assert not policy.host_allowed("evil.example")


# -- defect 12: small ones -----------------------------------------------------------------


def test_bad_percent_escape_is_json_400(site: Site, clock: Clock) -> None:
    """``%ff`` in a path gives a JSON error, not twisted.web's HTML."""
    conn = Conn(site, clock)
    conn.send(request("GET", "/sandboxes/%ff"))
    status, headers, _ = conn.response()
    assert status in (400, 404)
    assert headers["content-type"] == b"application/json"


def test_long_url_is_414_and_long_header_431(site: Site, clock: Clock) -> None:
    """A request line or header beyond 16 KiB is answered, not just cut off."""
    conn = Conn(site, clock)
    conn.send(request("GET", "/" + "a" * 20_000))
    assert conn.response()[0] == 414
    conn = Conn(site, clock)
    conn.send(request("GET", "/sandboxes", "X-Big: " + "b" * 20_000))
    assert conn.response()[0] == 431


def test_options_star_is_refused(site: Site, clock: Clock) -> None:
    """``OPTIONS *`` is not an empty 200."""
    conn = Conn(site, clock)
    conn.send(b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert conn.response()[0] == 400


def test_no_token_post_is_401_before_400_or_413(token_site: Site, clock: Clock) -> None:
    """Without a token, a bad or big body still gets 401 first."""
    for body in (b"{broken", b" " * 70_000):
        conn = Conn(token_site, clock)
        conn.send(
            request(
                "POST",
                "/sandboxes",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                body=body,
            )
        )
        assert conn.response()[0] == 401


def test_connection_cap_fits_the_descriptor_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``ulimit -n 256`` and no room to raise it, the HTTP cap shrinks to fit (so
    attackers meet 503s, not EMFILE); with room, the soft limit is raised instead."""
    import resource

    limits = {"soft": 256, "hard": 256}

    def getrlimit(which: int) -> tuple[int, int]:
        return limits["soft"], limits["hard"]

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        if value[0] > limits["hard"]:
            raise ValueError("over the hard limit")
        limits["soft"] = value[0]

    monkeypatch.setattr(resource, "getrlimit", getrlimit)
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    cap = fit_descriptors(1000, 20)
    assert 8 <= cap and cap + 2 * 20 + 100 <= 256
    limits.update(soft=256, hard=100_000)
    assert fit_descriptors(1000, 1000) == 1000
    assert limits["soft"] == 1000 + 2000 + 100


def test_streamed_route_hook_takes_chunks_without_a_cap(
    manager: SandboxManager, clock: Clock
) -> None:
    """The hook for streamed uploads: a ``BodyRule`` with ``limit=None`` lets a body of any
    size through, chunk by chunk, to the ``body_sink`` that ``on_streamed`` sets (nothing
    kept in ``content``), while the header checks (the token) still come first."""
    import re

    from twistedgw.web.site import BODY_RULES, BodyRule

    received: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> None:
            received.append(data)

    def on_streamed(request: Any) -> None:
        request.body_sink = Sink()

    auth = Authenticator.from_tokens([TOKEN])
    rule = BodyRule(b"PUT", re.compile(rb"/sandboxes/[^/]+/files"), None, json=False)
    policy = EdgePolicy(
        authenticator=auth,
        allowed_hosts=LOOPBACK_HOSTS,
        rules=(*BODY_RULES, rule),
        on_streamed=on_streamed,
    )
    site = make_site(GatewayAPI(manager, authenticator=auth), policy=policy)
    size = 1_000_000
    conn = Conn(site, clock)
    conn.send(request("PUT", "/sandboxes/x/files", f"Content-Length: {size}"))
    assert conn.response()[0] == 401
    conn = Conn(site, clock)
    headers = (f"Authorization: Bearer {TOKEN}", f"Content-Length: {size}")
    conn.send(request("PUT", "/sandboxes/x/files", *headers))
    for _ in range(size // 10_000):
        conn.send(b"z" * 10_000)
    assert sum(map(len, received)) == size
    assert conn.response()[0] == 404  # no such route yet: the files issue adds it
