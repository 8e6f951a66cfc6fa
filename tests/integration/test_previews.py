"""Port previews on the real gateway, engine and image (issue 16, "Ports").

In a sandbox, ``python3 -m http.server 8000`` and a stdlib WebSocket echo server
(``wsecho.py``, uploaded by the test) run as background processes; they are reached through
``/sandboxes/{id}/ports/{port}/`` with the API token and through signed ``/previews/`` URLs
without it, relative links included. Refusals: 502 for a closed port, 403 for an expired or
forged signature and for a port outside ``--preview-ports``, 404 for another token's sandbox.
A sandbox without a network is previewed too (the agent's Unix socket carries it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.sync.client import connect

from tests.integration.conftest import REPO, GatewayProcess, remove_instance_containers
from tests.integration.helpers import agent_pid, recv, rss_kib, send, wait_for
from tests.scenarios import follow_listing, forgeries_are_refused, websocket_echoes

pytestmark = pytest.mark.integration

ECHO_SCRIPT = Path(__file__).with_name("wsecho.py").read_bytes()
ALPHA = secrets.token_urlsafe(24)
BRAVO = secrets.token_urlsafe(24)
A = {"Authorization": f"Bearer {ALPHA}"}
B = {"Authorization": f"Bearer {BRAVO}"}


@pytest.fixture(scope="module")
def gateway(docker_client: Any, tmp_path_factory: Any) -> Iterator[GatewayProcess]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{ALPHA}\n{BRAVO}\n")
    gw = GatewayProcess(
        f"it-{secrets.token_hex(4)}",
        "--tokens-file",
        str(tokens),
        "--preview-ports",
        "8000-8002,9000",
    )
    gw.start()
    yield gw
    gw.stop()
    remove_instance_containers(docker_client, gw.instance)


def _start_servers(gateway: GatewayProcess, sandbox_id: str) -> None:
    """Upload the echo server and a small site, start both servers in the background, and
    wait until the preview of each answers."""
    put = requests.put(
        f"{gateway.url}/sandboxes/{sandbox_id}/files",
        params={"path": "/home/sandbox/wsecho.py"},
        data=ECHO_SCRIPT,
        headers=A,
        timeout=30,
    )
    assert put.status_code in (200, 201), put.text
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}", additional_headers=A) as ws:
        send(ws, {"command": "mkdir -p /tmp/site/sub && echo hello-preview > /tmp/site/sub/f.txt"})
        while recv(ws).get("type") == "output":
            pass
        for request_id, command in (
            ("http", "cd /tmp/site && exec python3 -m http.server 8000"),
            ("ws", "exec python3 /home/sandbox/wsecho.py 8001"),
        ):
            send(ws, {"command": command, "request_id": request_id, "background": True})
            assert recv(ws)["type"] == "started"
    for port in (8000, 8001):
        url = f"{gateway.url}/sandboxes/{sandbox_id}/ports/{port}/"
        wait_for(lambda url=url: requests.get(url, headers=A, timeout=10).status_code == 200, 30)


@pytest.fixture(scope="module")
def served(gateway: GatewayProcess) -> str:
    """A sandbox of token A serving a directory on 8000 and WebSocket echo on 8001."""
    sandbox_id = gateway.create(headers=A)
    _start_servers(gateway, sandbox_id)
    return sandbox_id


def _signed(gateway: GatewayProcess, sandbox_id: str, port: int, **body: Any) -> str:
    response = requests.post(
        f"{gateway.url}/sandboxes/{sandbox_id}/ports/{port}/url",
        json=body or None,
        headers=A,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["url"] == gateway.url + answer["path"]
    return str(answer["url"])


def test_http_server_is_reached_with_the_token_and_its_relative_links_work(
    gateway: GatewayProcess, served: str
) -> None:
    """``/sandboxes/{id}/ports/8000/`` serves http.server's listing; its relative links
    resolve under the same prefix; the page is sandboxed (CSP) and the connection closes."""
    base = f"{gateway.url}/sandboxes/{served}/ports/8000/"
    follow_listing(base, A)
    page = requests.get(base, headers=A, timeout=10)
    assert "sandbox" in page.headers["Content-Security-Policy"]
    without_slash = requests.get(base[:-1], headers=A, timeout=10, allow_redirects=False)
    assert without_slash.status_code == 308
    assert without_slash.headers["Location"] == f"/sandboxes/{served}/ports/8000/"


def test_the_server_never_sees_the_gateway_token(gateway: GatewayProcess, served: str) -> None:
    """The request the server gets has neither the ``Authorization`` header nor the
    ``access_token`` parameter, and has the ``X-Forwarded-*`` headers."""
    seen = requests.get(
        f"{gateway.url}/sandboxes/{served}/ports/8001/echo/head?x=1",
        headers={**A, "Keep-Alive": "timeout=5", "X-Forwarded-For": "6.6.6.6"},
        timeout=10,
    )
    assert seen.status_code == 200
    assert seen.text.startswith("GET /echo/head?x=1 HTTP/1.1\r\n")
    assert ALPHA not in seen.text and "Authorization" not in seen.text
    assert "Keep-Alive" not in seen.text and "6.6.6.6" not in seen.text
    assert "X-Forwarded-For: 127.0.0.1" in seen.text
    assert f"X-Forwarded-Prefix: /sandboxes/{served}/ports/8001" in seen.text
    by_query = requests.get(
        f"{gateway.url}/sandboxes/{served}/ports/8001/q?access_token={ALPHA}&y=2", timeout=10
    )
    assert by_query.status_code == 200
    assert by_query.text.startswith("GET /q?y=2 HTTP/1.1\r\n") and ALPHA not in by_query.text


def test_request_bodies_stream_through_as_sent(gateway: GatewayProcess, served: str) -> None:
    """A 16 MiB body with ``Content-Length`` and one sent chunked both reach the server whole
    (it answers with their length and SHA-256)."""
    body = os.urandom(16 * 1024 * 1024)
    want = f"body {len(body)} {hashlib.sha256(body).hexdigest()}"
    url = f"{gateway.url}/sandboxes/{served}/ports/8001/upload"
    sized = requests.post(url, data=body, headers=A, timeout=120)
    assert sized.status_code == 200 and sized.text.endswith(want)
    assert "Content-Length: 16777216" in sized.text

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 1_000_000):
            yield body[start : start + 1_000_000]

    chunked = requests.put(url, data=pieces(), headers=A, timeout=120)
    assert chunked.status_code == 200 and chunked.text.endswith(want)
    assert "Transfer-Encoding: chunked" in chunked.text


def test_a_signed_url_works_without_the_token_and_its_relative_links_too(
    gateway: GatewayProcess, served: str
) -> None:
    """``POST .../ports/8000/url`` gives a URL a browser opens without the token; links in
    the listing resolve under its signed prefix."""
    url = _signed(gateway, served, 8000, expires_in=120)
    assert "/previews/" in url and ALPHA not in url
    follow_listing(url)
    signature = url.rstrip("/").rsplit("/", 1)[1]
    log = gateway.tail(400)
    assert f"preview {served}:8000 GET /sub/f.txt 200" in log
    assert signature not in log and ALPHA not in log


def test_websocket_echo_through_the_token_route_and_a_signed_url(
    gateway: GatewayProcess, served: str
) -> None:
    """A WebSocket upgrade is passed to the server in the sandbox; text and binary messages
    (one larger than a TCP read) come back unchanged, both ways of reaching it."""
    token_url = f"{gateway.ws_url}/sandboxes/{served}/ports/8001/ws?access_token={ALPHA}"
    signed = _signed(gateway, served, 8001).replace("http://", "ws://", 1) + "ws"
    websocket_echoes((token_url, signed), big=bytes(range(256)) * 4096, big_timeout=30)


def test_a_signed_url_stops_working_after_its_expiry(gateway: GatewayProcess, served: str) -> None:
    """A URL signed for 2 seconds opens at once and is 403 once they passed."""
    url = _signed(gateway, served, 8000, expires_in=2)
    assert requests.get(url, timeout=10).status_code == 200
    time.sleep(3.2)
    expired = requests.get(url, timeout=10)
    assert expired.status_code == 403
    assert "expired" in expired.json()["error"]


def test_forged_signatures_are_403(gateway: GatewayProcess, served: str) -> None:
    """Another port, a later expiry or a changed signature under a valid URL: 403."""
    url = _signed(gateway, served, 8000, expires_in=60)
    forgeries_are_refused(url, other_port=8001)


def test_a_closed_port_is_502_json(gateway: GatewayProcess, served: str) -> None:
    """Nothing listens on 8002: 502 with a JSON error naming the port."""
    answer = requests.get(f"{gateway.url}/sandboxes/{served}/ports/8002/", headers=A, timeout=10)
    assert answer.status_code == 502
    assert "8002" in answer.json()["error"]


def test_another_tokens_sandbox_is_404(gateway: GatewayProcess, served: str) -> None:
    """Token B neither reaches A's ports nor signs URLs for them: 404, like other routes;
    no token at all is 401."""
    assert (
        requests.get(
            f"{gateway.url}/sandboxes/{served}/ports/8000/", headers=B, timeout=10
        ).status_code
        == 404
    )
    assert (
        requests.post(
            f"{gateway.url}/sandboxes/{served}/ports/8000/url", headers=B, timeout=10
        ).status_code
        == 404
    )
    assert (
        requests.get(f"{gateway.url}/sandboxes/{served}/ports/8000/", timeout=10).status_code == 401
    )


def test_ports_outside_the_list_and_the_agents_port_are_403(
    gateway: GatewayProcess, served: str
) -> None:
    """``--preview-ports 8000-8002,9000``: 9001 is refused, and so is the agent's own port
    8765 and the egress port 3128 (never previewed); signing a URL for them is refused too."""
    for port in (9001, 8765, 3128):
        answer = requests.get(
            f"{gateway.url}/sandboxes/{served}/ports/{port}/", headers=A, timeout=10
        )
        assert answer.status_code == 403, port
        signing = requests.post(
            f"{gateway.url}/sandboxes/{served}/ports/{port}/url", headers=A, timeout=10
        )
        assert signing.status_code == 403, port


def test_a_preview_counts_as_activity(gateway: GatewayProcess, served: str) -> None:
    """A preview request moves the sandbox's ``last_activity`` (the idle reaper's clock)."""

    def last_activity() -> float:
        details = requests.get(
            f"{gateway.url}/sandboxes/{served}?details=true", headers=A, timeout=10
        ).json()
        return float(details["last_activity"])

    before = last_activity()
    time.sleep(0.3)
    assert (
        requests.get(
            f"{gateway.url}/sandboxes/{served}/ports/8000/", headers=A, timeout=10
        ).status_code
        == 200
    )
    assert last_activity() > before


def test_a_sandbox_without_network_is_previewed(gateway: GatewayProcess) -> None:
    """``network: none``: no container address at all, the agent's Unix socket carries the
    preview (HTTP and WebSocket)."""
    sandbox_id = gateway.create(headers=A, json={"network": "none"})
    _start_servers(gateway, sandbox_id)
    follow_listing(f"{gateway.url}/sandboxes/{sandbox_id}/ports/8000/", A)
    with connect(f"{gateway.ws_url}/sandboxes/{sandbox_id}/ports/8001/?access_token={ALPHA}") as ws:
        ws.send(b"\x00binary\xff")
        assert ws.recv(timeout=10) == b"\x00binary\xff"


def test_a_client_that_stops_reading_does_not_grow_the_gateway_or_the_agent(
    gateway: GatewayProcess, served: str, docker_client: Any
) -> None:
    """A 200 MiB answer to a client that reads 1 MiB and stops: the gateway and the agent
    each stop reading once their bounded buffers are full, so neither process grows by more
    than a few MiB (the rest waits in the server and the kernel's socket buffers)."""
    with connect(f"{gateway.ws_url}/ws/{served}", additional_headers=A) as ws:
        send(
            ws,
            {
                "command": "mkdir -p /home/sandbox/big && cd /home/sandbox/big && "
                "head -c 200M /dev/zero > zero.bin && exec python3 -m http.server 9000",
                "request_id": "big",
                "background": True,
            },
        )
        assert recv(ws)["type"] == "started"
    url = f"{gateway.url}/sandboxes/{served}/ports/9000/"
    wait_for(lambda: requests.get(url, headers=A, timeout=10).status_code == 200, 60)
    container = docker_client.containers.get(f"twistedgw-{served}")
    agent = agent_pid(container)
    gateway_before, agent_before = rss_kib(gateway.pid), rss_kib(agent)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sendall(
            f"GET /sandboxes/{served}/ports/9000/zero.bin HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{gateway.port}\r\nAuthorization: Bearer {ALPHA}\r\n\r\n".encode()
        )
        got = 0
        while got < 1024 * 1024:
            got += len(client.recv(65536))
        time.sleep(4)  # the client stalls; everyone upstream fills up and pauses
        gateway_growth = (rss_kib(gateway.pid) - gateway_before) / 1024
        agent_growth = (rss_kib(agent) - agent_before) / 1024
    assert gateway_growth < 16, f"gateway grew by {gateway_growth:.1f} MiB"
    assert agent_growth < 8, f"agent grew by {agent_growth:.1f} MiB"


def test_the_preview_benchmark_runs(docker_client: Any, tmp_path: Path) -> None:
    """``bench/preview.py`` with a small file exits 0 and writes its figures (they are not
    judged here), so it cannot rot."""
    out = tmp_path / "preview.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "preview.py"),
            "--size-mib",
            "4",
            "--repeat",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["preview_mib_s"] > 0 and figures["docker_exec_cat_mib_s"] > 0
    assert figures["gateway_rss_peak_growth_mib"] < 64
