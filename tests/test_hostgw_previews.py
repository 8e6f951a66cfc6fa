"""Port previews (``/sandboxes/{id}/ports/{port}/...`` and signed ``/previews/...``:
``twistedgw.web.previews`` and ``twistedgw.proxy.ports``) end to end against an in-process
gateway whose sandboxes are real agent processes on the host (``tests.hostgw``): the fast
counterpart of ``tests/integration/test_previews.py``.

In each sandbox a small HTTP server (``SERVER``, uploaded through the file routes, started as
a background command of the client library) listens on a free port of 127.0.0.1: it serves a
directory, echoes the request head it received at ``/echo...``, and answers a body's length
and SHA-256 at ``/upload``. The agent reaches it over the host's loopback, as it would inside
a container.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
import requests

from tests.hostgw import HostGateway, host_gateway, in_thread
from tests.scenarios import follow_listing, forgeries_are_refused, until, websocket_echoes
from twistedgw.client import Sandbox

#: The integration suite's stdlib WebSocket echo server (echoes text and binary messages).
WS_ECHO = (Path(__file__).parent / "integration" / "wsecho.py").read_bytes()

SERVER = b"""
import hashlib, http.server, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/echo"):
            self._answer((self.requestline + "\\r\\n" + str(self.headers)).encode())
        else:
            super().do_GET()

    def do_POST(self):
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        how = "chunked" if self.headers.get("Transfer-Encoding") else "sized"
        self._answer(f"{how} {len(body)} {hashlib.sha256(body).hexdigest()}".encode())

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def _free_port() -> int:
    """A port of 127.0.0.1 nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Waits for a server in the sandbox to answer through its preview.
_until = functools.partial(until, timeout=15.0, interval=0.05)


def _serve(gw: HostGateway, sb: Sandbox) -> int:
    """Upload the server and a small site into the sandbox's home, start the server in the
    background on a free port and wait until its preview answers; the port."""
    sb.files.write("server.py", SERVER)
    sb.files.write("site/sub/f.txt", "hello-preview\n")
    home = gw.runtime.agent_for(sb.sandbox_id).home
    port = _free_port()
    sb.run(f"exec {sys.executable} ../server.py {port}", cwd=f"{home}/site", background=True)
    base = f"/sandboxes/{sb.sandbox_id}/ports/{port}/"
    _until(lambda: gw.request("GET", base).status_code == 200)
    return port


async def _with_server(scenario: Callable[[HostGateway, Sandbox, int], None]) -> None:
    """Run ``scenario(gw, sandbox, port)`` in a thread, with the server up in a fresh
    sandbox of a fresh gateway."""
    async with host_gateway() as gw:

        def body() -> None:
            with Sandbox.create(url=gw.url, token=gw.token) as sb:
                scenario(gw, sb, _serve(gw, sb))

        await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_the_server_is_reached_with_the_token_and_its_relative_links_work() -> None:
    """``/sandboxes/{id}/ports/{port}/`` serves the server's listing; its relative links
    resolve under the same prefix down to the file's bytes; answers are sandboxed (CSP) and
    the prefix without its slash is a 308 to it."""

    def scenario(gw: HostGateway, sb: Sandbox, port: int) -> None:
        base = f"{gw.url}/sandboxes/{sb.sandbox_id}/ports/{port}/"
        follow_listing(base, gw.headers(), not_listed=("server.py",))
        page = requests.get(base, headers=gw.headers(), timeout=10)
        assert "sandbox" in page.headers["Content-Security-Policy"]
        without_slash = requests.get(
            base[:-1], headers=gw.headers(), timeout=10, allow_redirects=False
        )
        assert without_slash.status_code == 308
        assert without_slash.headers["Location"] == f"/sandboxes/{sb.sandbox_id}/ports/{port}/"

    await _with_server(scenario)


@pytest_twisted.ensureDeferred
async def test_the_server_never_sees_the_gateway_token_and_gets_forwarded_headers() -> None:
    """The request the server gets has neither the ``Authorization`` header nor the
    ``access_token`` parameter (the rest of the query is kept), no hop-by-hop or
    client-sent forwarding headers, and the gateway's ``X-Forwarded-*`` and ``Host``."""

    def scenario(gw: HostGateway, sb: Sandbox, port: int) -> None:
        prefix = f"/sandboxes/{sb.sandbox_id}/ports/{port}"
        seen = requests.get(
            f"{gw.url}{prefix}/echo/head?x=1",
            headers={**gw.headers(), "Keep-Alive": "timeout=5", "X-Forwarded-For": "6.6.6.6"},
            timeout=10,
        )
        assert seen.status_code == 200
        assert seen.text.startswith("GET /echo/head?x=1 HTTP/1.1\r\n")
        assert gw.token not in seen.text and "Authorization" not in seen.text
        assert "Keep-Alive" not in seen.text and "6.6.6.6" not in seen.text
        assert "X-Forwarded-For: 127.0.0.1" in seen.text
        assert f"X-Forwarded-Prefix: {prefix}" in seen.text
        assert f"Host: 127.0.0.1:{port}" in seen.text
        by_query = requests.get(f"{gw.url}{prefix}/echo?access_token={gw.token}&y=2", timeout=10)
        assert by_query.status_code == 200
        assert by_query.text.startswith("GET /echo?y=2 HTTP/1.1\r\n")
        assert gw.token not in by_query.text

    await _with_server(scenario)


@pytest_twisted.ensureDeferred
async def test_request_bodies_reach_the_server_whole_sized_and_chunked() -> None:
    """A 3 MiB body with ``Content-Length`` and one sent chunked both reach the server whole
    (it answers their length and SHA-256)."""

    def scenario(gw: HostGateway, sb: Sandbox, port: int) -> None:
        body = os.urandom(3 * 1024 * 1024)
        want = f"{len(body)} {hashlib.sha256(body).hexdigest()}"
        path = f"/sandboxes/{sb.sandbox_id}/ports/{port}/upload"
        sized = gw.request("POST", path, data=body)
        assert sized.status_code == 200 and sized.text == f"sized {want}"

        def pieces() -> Iterator[bytes]:
            for start in range(0, len(body), 500_000):
                yield body[start : start + 500_000]

        chunked = gw.request("POST", path, data=pieces())
        assert chunked.status_code == 200 and chunked.text == f"chunked {want}"

    await _with_server(scenario)


@pytest_twisted.ensureDeferred
async def test_a_closed_port_is_502_json_and_refusals_are_401_403_404() -> None:
    """A port nothing listens on is 502 with a JSON error naming it; no token is 401, a port
    outside ``--preview-ports`` (below 1024) 403, an unknown sandbox 404."""

    def scenario(gw: HostGateway, sb: Sandbox, port: int) -> None:
        closed = _free_port()
        answer = gw.request("GET", f"/sandboxes/{sb.sandbox_id}/ports/{closed}/")
        assert answer.status_code == 502
        assert answer.headers["Content-Type"].startswith("application/json")
        assert str(closed) in answer.json()["error"]
        base = f"{gw.url}/sandboxes/{sb.sandbox_id}/ports"
        assert requests.get(f"{base}/{port}/", timeout=10).status_code == 401
        assert gw.request("GET", f"/sandboxes/{sb.sandbox_id}/ports/80/").status_code == 403
        unknown = gw.request("GET", f"/sandboxes/{'0' * 32}/ports/{port}/")
        assert unknown.status_code == 404

    await _with_server(scenario)


@pytest_twisted.ensureDeferred
async def test_a_signed_url_works_without_the_token_and_a_forged_one_is_403() -> None:
    """``POST .../ports/{port}/url`` gives a ``/previews/`` URL that serves without the token
    (relative links too); another port, a later expiry or a changed signature under it is
    403."""

    def scenario(gw: HostGateway, sb: Sandbox, port: int) -> None:
        signing = gw.request(
            "POST", f"/sandboxes/{sb.sandbox_id}/ports/{port}/url", json={"expires_in": 120}
        )
        assert signing.status_code == 200, signing.text
        answer = signing.json()
        assert answer["port"] == port
        url = gw.url + answer["path"]
        assert answer["path"].startswith(f"/previews/{sb.sandbox_id}/{port}/")
        assert gw.token not in url
        follow_listing(url, not_listed=("server.py",))
        forgeries_are_refused(url, other_port=_free_port())

    await _with_server(scenario)


@pytest_twisted.ensureDeferred
async def test_a_websocket_upgrade_is_relayed_both_ways_with_the_token_and_signed() -> None:
    """A WebSocket server in the sandbox is reached through the preview (``access_token`` in
    the query, and a signed URL): text and a binary message larger than a TCP read come back
    unchanged."""

    def scenario(gw: HostGateway, sb: Sandbox, port: int) -> None:
        sb.files.write("wsecho.py", WS_ECHO)
        home = gw.runtime.agent_for(sb.sandbox_id).home
        ws_port = _free_port()
        sb.run(f"exec {sys.executable} {home}/wsecho.py {ws_port}", background=True)
        prefix = f"/sandboxes/{sb.sandbox_id}/ports/{ws_port}"
        _until(lambda: gw.request("GET", f"{prefix}/up").status_code == 200)
        signing = gw.request("POST", f"{prefix}/url")
        assert signing.status_code == 200, signing.text
        ws_base = gw.url.replace("http://", "ws://", 1)
        urls = (
            f"{ws_base}{prefix}/ws?access_token={gw.token}",
            f"{ws_base}{signing.json()['path']}ws",
        )
        websocket_echoes(urls, big=bytes(range(256)) * 2048, big_timeout=20)

    await _with_server(scenario)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``requests`` talks to 127.0.0.1 directly, whatever proxy the environment names."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
