"""The HTTP edge's own answers, byte for byte (``twistedgw.web.site``): refusals, the
preview's 308 redirect and 421 for a foreign Host, the header deadline, the connection count,
and the access log event of each request."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger

from tests.test_edge import TOKEN, Conn, request
from twistedgw.lifecycle.manager import SandboxManager
from twistedgw.web.api import GatewayAPI
from twistedgw.web.auth import Authenticator, owner_id
from twistedgw.web.site import LOOPBACK_HOSTS, EdgePolicy, GatewaySite, make_site

PREVIEW = "/previews/sb-1/3000/x"


def preview_site(manager: SandboxManager, hook: Any, **policy: Any) -> GatewaySite:
    site = make_site(
        GatewayAPI(manager),
        policy=EdgePolicy(allowed_hosts=LOOPBACK_HOSTS, on_preview=hook, **policy),
    )
    assert isinstance(site, GatewaySite)
    return site


def test_preview_redirect_is_an_exact_308_and_closes(manager: SandboxManager, clock: Clock) -> None:
    """``answer_redirect`` writes a bodiless 308 with the Location, no caching, and
    ``Connection: close``, closes the connection, frees its place, and answers only once."""
    seen: list[Any] = []

    def hook(req: Any) -> None:
        seen.append(req)
        req.channel.answer_redirect(b"/previews/sb-1/3000/x/")
        req.channel.answer_redirect(b"/elsewhere")

    site = preview_site(manager, hook)
    conn = Conn(site, clock)
    assert conn.channel in site.http_channels  # type: ignore[attr-defined]
    conn.send(request("GET", PREVIEW))
    assert len(seen) == 1
    assert conn.transport.value() == (
        b"HTTP/1.1 308 Permanent Redirect\r\n"
        b"Location: /previews/sb-1/3000/x/\r\n"
        b"Content-Length: 0\r\n"
        b"Cache-Control: no-store\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert conn.transport.disconnecting
    assert conn.channel.refused
    assert conn.channel not in site.http_channels  # type: ignore[attr-defined]
    # its header deadline is gone: nothing more is written later
    clock.advance(3600)
    assert conn.transport.value().count(b"HTTP/1.1") == 1


def test_preview_for_a_foreign_host_is_421_without_the_hook(
    manager: SandboxManager, clock: Clock
) -> None:
    """A preview request whose Host is not this gateway's is answered 421 (misdirected) in
    JSON, and the preview hook never runs."""
    called: list[Any] = []
    conn = Conn(preview_site(manager, called.append), clock)
    conn.send(b"GET " + PREVIEW.encode() + b" HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    status, headers, body = conn.response()
    assert status == 421
    assert body == {"error": "this gateway does not serve that Host (see --allowed-hosts)"}
    assert headers["content-type"] == b"application/json"
    assert called == []


def test_preview_with_a_non_utf8_host_is_400(manager: SandboxManager, clock: Clock) -> None:
    """A preview's Host that is not UTF-8 is a JSON 400 naming the header."""
    called: list[Any] = []
    conn = Conn(preview_site(manager, called.append), clock)
    conn.send(b"GET " + PREVIEW.encode() + b" HTTP/1.1\r\nHost: \xff\r\n\r\n")
    status, _, body = conn.response()
    assert (status, body) == (400, {"error": "host header is not valid UTF-8"})
    assert called == []


def test_a_failing_preview_hook_is_503(manager: SandboxManager, clock: Clock) -> None:
    """A preview hook that raises is answered 503 (with Retry-After), not a dropped line."""

    def hook(req: Any) -> None:
        raise RuntimeError("boom")

    conn = Conn(preview_site(manager, hook), clock)
    conn.send(request("GET", PREVIEW))
    status, headers, body = conn.response()
    assert (status, body) == (503, {"error": "the preview could not be started"})
    assert headers["retry-after"] == b"5"


def test_a_refusal_is_exact_json_with_close(manager: SandboxManager, clock: Clock) -> None:
    """A refusal's answer: status line with its reason, JSON content type, no caching, the
    body's length, ``Connection: close``; a 401 also names the Bearer realm."""
    auth = Authenticator.from_tokens([TOKEN])
    site = make_site(
        GatewayAPI(manager, authenticator=auth),
        policy=EdgePolicy(authenticator=auth, allowed_hosts=LOOPBACK_HOSTS),
    )
    conn = Conn(site, clock)
    conn.send(request("GET", "/sandboxes"))
    raw = conn.transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    message = json.loads(body)["error"]
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 401 Unauthorized",
        b"Content-Type: application/json",
        b"Cache-Control: no-store",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        b'WWW-Authenticate: Bearer realm="twistedgw"',
    ]
    assert message


def test_connection_is_counted_and_given_the_policy_timeouts(
    manager: SandboxManager, clock: Clock
) -> None:
    """A new connection gets the policy's idle timeout, counts towards the cap, and is
    answered 408 once ``header_timeout`` passes without a request (not a second before)."""
    site = make_site(GatewayAPI(manager), policy=EdgePolicy(header_timeout=7.0, idle_timeout=42.0))
    conn = Conn(site, clock)
    assert conn.channel.timeOut == 42.0
    assert site.http_channels == {conn.channel}  # type: ignore[attr-defined]
    clock.advance(6.9)
    assert conn.transport.value() == b""
    clock.advance(0.2)
    status, _, body = conn.response()
    assert (status, body) == (408, {"error": "request headers not received in time"})
    assert site.http_channels == set()  # type: ignore[attr-defined]


def test_connection_beyond_the_cap_is_not_counted(manager: SandboxManager, clock: Clock) -> None:
    """A connection refused at the cap gets the exact 503 text and is not counted."""
    site = make_site(GatewayAPI(manager), policy=EdgePolicy(max_connections=1))
    first = Conn(site, clock)
    extra = Conn(site, clock)
    status, _, body = extra.response()
    assert (status, body) == (503, {"error": "too many connections; try again later"})
    assert site.http_channels == {first.channel}  # type: ignore[attr-defined]
    clock.advance(3600)
    assert first.transport.value().startswith(b"HTTP/1.1 408 ")


def test_access_log_event_has_its_fields(manager: SandboxManager, clock: Clock) -> None:
    """Each request is one ``twistedgw.access`` event: the combined-format line (no query
    string) plus method, path, status, duration_ms, peer and owner fields."""
    auth = Authenticator.from_tokens([TOKEN])
    site = make_site(
        GatewayAPI(manager, authenticator=auth),
        policy=EdgePolicy(authenticator=auth, allowed_hosts=LOOPBACK_HOSTS),
    )
    events: list[dict[str, Any]] = []
    site._access = Logger(namespace="twistedgw.access", observer=events.append)  # type: ignore[attr-defined]
    conn = Conn(site, clock)
    conn.send(
        request(
            "GET",
            f"/sandboxes?access_token={TOKEN}",
            "User-Agent: probe/1",
        )
    )
    assert conn.response()[0] == 200
    [event] = events
    assert event["log_namespace"] == "twistedgw.access"
    assert event["log_format"] == "{line}"
    assert event["event"] == "access"
    assert (event["method"], event["path"], event["status"]) == ("GET", "/sandboxes", 200)
    assert event["peer"] == "127.0.0.1"
    assert event["owner"] == owner_id(TOKEN)
    assert isinstance(event["duration_ms"], float) and event["duration_ms"] >= 0
    line = event["line"]
    assert line.startswith('"127.0.0.1" - - ')
    assert '"GET /sandboxes HTTP/1.1" 200 ' in line
    assert line.endswith('"-" "probe/1"')
    assert TOKEN not in line


def test_a_second_refusal_of_a_connection_writes_nothing_more(
    manager: SandboxManager, clock: Clock
) -> None:
    """A connection is refused once: a later refusal (another deadline, say) adds no second
    answer to the first."""
    site = make_site(GatewayAPI(manager), policy=EdgePolicy(allowed_hosts=LOOPBACK_HOSTS))
    conn = Conn(site, clock)
    conn.channel.refuse(413, "request body too large")
    first = conn.transport.value()
    conn.channel.refuse(408, "request headers not received in time")
    assert conn.transport.value() == first
    assert first.startswith(b"HTTP/1.1 413 ") and first.count(b"HTTP/1.1") == 1


def test_a_kept_alive_connection_gets_the_header_deadline_again_after_each_request(
    manager: SandboxManager, clock: Clock
) -> None:
    """After an answered request on a persistent connection, the next request's headers
    must come within ``header_timeout`` too, or the connection is answered 408 JSON."""
    site = make_site(
        GatewayAPI(manager),
        policy=EdgePolicy(allowed_hosts=LOOPBACK_HOSTS, header_timeout=5.0, idle_timeout=60.0),
    )
    conn = Conn(site, clock)
    conn.send(request("GET", "/healthz"))
    assert conn.transport.value().startswith(b"HTTP/1.1 200 ")
    conn.transport.clear()
    clock.advance(4.9)
    assert conn.transport.value() == b""
    clock.advance(0.2)
    status, _, body = conn.response()
    assert (status, body) == (408, {"error": "request headers not received in time"})
