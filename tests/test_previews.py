"""Port previews' pure parts (``twistedgw.proxy.ports``): ``--preview-ports`` parsing, URL
signing with an injected clock, the key file, header filtering both ways, where a request
body ends, and which paths the edge hands to the preview routes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq

from twistedgw.proxy.ports import (
    RESERVED_PORTS,
    BodyEnd,
    URLSigner,
    downstream_head,
    load_key,
    parse_ports,
    strip_token,
    upstream_head,
)
from twistedgw.testing.rest import request
from twistedgw.web.api import GatewayAPI
from twistedgw.web.previews import is_preview


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- --preview-ports ---------------------------------------------------------------------------


def test_port_list_takes_ports_and_ranges() -> None:
    """A comma list of single ports and low-high ranges, spaces allowed."""
    ports = parse_ports("3000, 8000-8999,5173")
    assert 3000 in ports and 5173 in ports and 8000 in ports and 8999 in ports
    assert 2999 not in ports and 9000 not in ports and 4000 not in ports
    assert ports.describe() == "3000,5173,8000-8999"


def test_default_port_list_is_the_unprivileged_ports_less_the_agents() -> None:
    """The default admits 1024-65535 except the agent's port and the egress port, which no
    list can admit."""
    ports = parse_ports("1024-65535")
    assert 1024 in ports and 65535 in ports and 1023 not in ports and 80 not in ports
    for port in RESERVED_PORTS:
        assert port not in ports
        assert port not in parse_ports(str(port))
    assert RESERVED_PORTS == {8765, 3128}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "no ports"),
        ("80,abc", "'abc' is not a port"),
        ("0", "1 to 65535"),
        ("70000", "1 to 65535"),
        ("9000-8000", "low to high"),
        ("1-2-3", "not a port"),
    ],
)
def test_bad_port_lists_are_refused_with_what_is_wrong(text: str, words: str) -> None:
    """Every malformed list is a ``ValueError`` naming the problem (the start-up error)."""
    with pytest.raises(ValueError, match=words):
        parse_ports(text)


def test_tap_refuses_a_bad_preview_port_list_at_start_up() -> None:
    """``twistd sandboxgw --preview-ports`` is checked with the other options."""
    from twisted.python import usage

    from twistedgw.tap import Options

    options = Options()
    with pytest.raises(usage.UsageError, match="--preview-ports"):
        options.parseOptions(["--preview-ports", "8000-7000"])
    good = Options()
    good.parseOptions(["--preview-ports", "8000"])
    assert 8000 in good["preview-port-set"] and 8001 not in good["preview-port-set"]


# -- signing -----------------------------------------------------------------------------------


def test_signed_path_is_valid_until_its_expiry() -> None:
    """The path carries id, port, expiry and an HMAC; it verifies until the clock reaches the
    expiry, and not after."""
    clock = FakeClock(1_000_000.0)
    signer = URLSigner(b"k" * 32, clock)
    path, expiry = signer.path("sbx-1", 8000, 60)
    assert expiry == 1_000_060
    _, kind, sandbox_id, port, exp, signature, tail = path.split("/")
    assert (kind, sandbox_id, port, exp, tail) == ("previews", "sbx-1", "8000", "1000060", "")
    assert signer.valid("sbx-1", 8000, expiry, signature)
    clock.now = 1_000_059.9
    assert signer.valid("sbx-1", 8000, expiry, signature)
    clock.now = 1_000_060.0
    assert not signer.valid("sbx-1", 8000, expiry, signature)


def test_a_signature_binds_id_port_expiry_and_key() -> None:
    """Changing any signed value, or the key, makes the signature worthless."""
    clock = FakeClock(0.0)
    signer = URLSigner(b"k" * 32, clock)
    sig = signer.signature("sbx-1", 8000, 100)
    assert signer.valid("sbx-1", 8000, 100, sig)
    assert not signer.valid("sbx-2", 8000, 100, sig)
    assert not signer.valid("sbx-1", 8001, 100, sig)
    assert not signer.valid("sbx-1", 8000, 101, sig)
    assert not URLSigner(b"j" * 32, clock).valid("sbx-1", 8000, 100, sig)
    assert not signer.valid("sbx-1", 8000, 100, sig[:-1] + ("A" if sig[-1] != "A" else "B"))


def test_the_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    """The key file is created with mode 0600 and 32 random bytes; a restart reads the same
    key, so URLs signed before it keep working."""
    path = tmp_path / "state" / "gw.preview-key"
    first = load_key(path)
    assert len(first) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(path) == first
    assert load_key(tmp_path / "other") != first


# -- headers -----------------------------------------------------------------------------------


def _head_lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


def test_upstream_head_drops_hop_by_hop_and_the_gateways_token() -> None:
    """Hop-by-hop headers (and those ``Connection`` names), ``Authorization`` and forged
    ``X-Forwarded-*`` never reach the sandbox; ``X-Forwarded-*`` are the gateway's own, and the
    server is asked to close."""
    headers = [
        (b"Host", b"gw.example:8003"),
        (b"Authorization", b"Bearer secret-token"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Private", b"hop"),
        (b"Proxy-Authorization", b"Basic eA=="),
        (b"TE", b"trailers"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Accept", b"text/html"),
        (b"Cookie", b"a=b"),
    ]
    lines = _head_lines(
        upstream_head(
            b"GET", b"/a?b=1", b"HTTP/1.1", headers, 8000, "127.0.0.1", b"gw.example:8003", b"/p"
        )
    )
    assert lines[0] == b"GET /a?b=1 HTTP/1.1"
    text = b"\n".join(lines).lower()
    for gone in (b"secret-token", b"keep-alive", b"x-private", b"proxy-authorization", b"te:"):
        assert gone not in text
    assert b"6.6.6.6" not in text
    assert b"Host: 127.0.0.1:8000" in lines
    assert b"Accept: text/html" in lines and b"Cookie: a=b" in lines
    assert b"Connection: close" in lines
    assert b"X-Forwarded-For: 127.0.0.1" in lines
    assert b"X-Forwarded-Host: gw.example:8003" in lines
    assert b"X-Forwarded-Proto: http" in lines
    assert b"X-Forwarded-Prefix: /p" in lines


def test_upstream_head_keeps_a_websocket_upgrade() -> None:
    """A protocol switch keeps ``Upgrade`` and says ``Connection: Upgrade``, with the
    WebSocket's own headers."""
    headers = [
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    lines = _head_lines(
        upstream_head(b"GET", b"/ws", b"HTTP/1.1", headers, 9000, "::1", None, b"/p")
    )
    assert b"Upgrade: websocket" in lines and b"Connection: Upgrade" in lines
    assert b"Connection: close" not in lines
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" in lines


def test_access_token_is_removed_from_the_query() -> None:
    """``access_token`` is the gateway's; other parameters stay."""
    assert strip_token(b"a=1&access_token=t0k&b=2") == b"a=1&b=2"
    assert strip_token(b"access_token=t0k") == b""
    assert strip_token(b"x=%2F") == b"x=%2F"


def test_downstream_head_is_filtered_sandboxed_and_closing() -> None:
    """The server's hop-by-hop headers are dropped; the page gets the sandboxing CSP (in
    place of any of its own) and ``Connection: close``; a 101 keeps its ``Upgrade``."""
    status, head = downstream_head(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Security-Policy: default-src *\r\n"
        b"Content-Length: 3"
    )
    lines = _head_lines(head)
    assert status == 200
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Type: text/html" in lines and b"Content-Length: 3" in lines
    assert not any(line.lower().startswith((b"x-hop", b"keep-alive")) for line in lines)
    assert b"Connection: close" in lines
    csp = [line for line in lines if line.lower().startswith(b"content-security-policy")]
    assert len(csp) == 1 and b"sandbox" in csp[0] and b"allow-same-origin" not in csp[0]
    status, head = downstream_head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: abc"
    )
    lines = _head_lines(head)
    assert status == 101
    assert b"Upgrade: websocket" in lines and b"Connection: Upgrade" in lines
    with pytest.raises(ValueError):
        downstream_head(b"SSH-2.0-OpenSSH")


# -- request bodies ----------------------------------------------------------------------------


def test_body_end_stops_at_content_length() -> None:
    """Bytes past ``Content-Length`` (a pipelined request) are not passed on."""
    body = BodyEnd(5, chunked=False, upgrade=False)
    assert body.take(b"abc") == b"abc"
    assert body.take(b"deGET /x HTTP/1.1\r\n") == b"de"
    assert body.done and body.take(b"more") == b""
    assert BodyEnd(None, chunked=False, upgrade=False).take(b"GET / HTTP/1.1\r\n") == b""


def test_body_end_stops_after_the_last_chunk() -> None:
    """A chunked body is passed on as sent, up to its terminating chunk and no further."""
    body = BodyEnd(None, chunked=True, upgrade=False)
    assert body.take(b"3\r\nabc\r\n") == b"3\r\nabc\r\n"
    assert body.take(b"0\r\n\r\nGET /next") == b"0\r\n\r\n"
    assert body.take(b"HTTP/1.1\r\n") == b""


def test_body_end_of_an_upgrade_is_open() -> None:
    """After a protocol switch everything goes through."""
    body = BodyEnd(None, chunked=False, upgrade=True)
    assert body.take(b"\x81\x05hello") == b"\x81\x05hello"


def test_which_requests_are_previews() -> None:
    """Port paths and signed paths are previews; the signed-URL route (``POST .../url``) and
    other routes are not."""
    assert is_preview(b"GET", b"/sandboxes/abc/ports/8000/")
    assert is_preview(b"GET", b"/sandboxes/abc/ports/8000")
    assert is_preview(b"POST", b"/sandboxes/abc/ports/8000/api/x")
    assert is_preview(b"GET", b"/sandboxes/abc/ports/8000/url")
    assert not is_preview(b"POST", b"/sandboxes/abc/ports/8000/url")
    assert is_preview(b"GET", b"/previews/abc/8000/1/sig/")
    assert not is_preview(b"GET", b"/sandboxes/abc/files")
    assert not is_preview(b"GET", b"/sandboxes/abc")


# -- POST /sandboxes/{id}/ports/{port}/url (in memory) -------------------------------------------


async def _json(treq: Any, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    if "data" in kwargs:
        kwargs.setdefault("headers", {"Content-Type": "application/json"})
    code, _headers, body = await request(treq, method, path, **kwargs)
    return code, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_the_url_route_signs_a_path_that_verifies(manager: Any, clock: Any) -> None:
    """The answer's path carries the id, port and now + ``expires_in``, and its signature is
    the gateway's for them; without a body the URL lives an hour."""
    api = GatewayAPI(manager)
    treq = StubTreq(api.resource())
    _, created = await _json(treq, "POST", "/sandboxes")
    sandbox_id = created["sandbox_id"]
    code, answer = await _json(
        treq, "POST", f"/sandboxes/{sandbox_id}/ports/8000/url", data=b'{"expires_in": 60}'
    )
    assert code == 200, answer
    expiry = int(clock.seconds()) + 60
    assert answer["expires_at"] == expiry and answer["port"] == 8000
    prefix = f"/previews/{sandbox_id}/8000/{expiry}/"
    assert answer["path"].startswith(prefix) and answer["path"].endswith("/")
    signature = answer["path"][len(prefix) : -1]
    assert api.previews.signer.valid(sandbox_id, 8000, expiry, signature)
    code, default = await _json(treq, "POST", f"/sandboxes/{sandbox_id}/ports/8000/url")
    assert code == 200 and default["expires_at"] == int(clock.seconds()) + 3600


@pytest_twisted.ensureDeferred
async def test_the_url_route_refuses_bad_lifetimes_ports_and_sandboxes(manager: Any) -> None:
    """``expires_in`` must be seconds in (0, 7 days] (400); ports outside the list and the
    agent's are 403, non-ports 404; an unknown sandbox is 404."""
    treq = StubTreq(GatewayAPI(manager).resource())
    _, created = await _json(treq, "POST", "/sandboxes")
    base = f"/sandboxes/{created['sandbox_id']}/ports"
    for body in (
        b'{"expires_in": 0}',
        b'{"expires_in": -5}',
        b'{"expires_in": "60"}',
        b'{"expires_in": true}',
        b'{"expires_in": 604801}',
        b'{"ttl": 60}',
    ):
        code, answer = await _json(treq, "POST", f"{base}/8000/url", data=body)
        assert code == 400, (body, answer)
    for port, status in ((80, 403), (8765, 403), (3128, 403), (70000, 404), (0, 404)):
        code, answer = await _json(treq, "POST", f"{base}/{port}/url")
        assert code == status, (port, answer)
    code, _ = await _json(treq, "POST", f"/sandboxes/{'0' * 32}/ports/8000/url")
    assert code == 404
