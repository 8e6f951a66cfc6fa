"""Attacks on the HTTP edge of a real gateway process (issue 11), each with a figure: the
gateway's RSS and open descriptors stay within a stated bound, and ``/healthz`` answers another
client in under 100 ms while the attack runs. Loopback only; every attack is bounded in count
and time."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.integration.conftest import GatewayProcess, remove_instance_containers
from tests.integration.helpers import rss_kib, wait_for

TOKEN = "edge-attack-token-" + "x" * 16
#: Bounds the figures are held to.
RSS_GROWTH_KIB = 40 * 1024
HEALTHZ_SECONDS = 0.1

# Each attack states a latency figure (/healthz under HEALTHZ_SECONDS for another client):
# measured alone, not beside parallel workers (tests/run.sh runs it after them).
pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def edge_gateway(docker_client: Any) -> Iterator[GatewayProcess]:
    """A gateway with short edge deadlines and a small HTTP connection cap."""
    gateway = GatewayProcess(
        f"it-{secrets.token_hex(4)}",
        "--open-handshake-timeout",
        "2",
        "--body-timeout",
        "2",
        "--max-http-connections",
        "40",
    )
    gateway.start()
    yield gateway
    gateway.stop()
    remove_instance_containers(docker_client, gateway.instance)


@pytest.fixture(scope="module")
def token_gateway(docker_client: Any) -> Iterator[GatewayProcess]:
    old = os.environ.get("TWISTEDGW_TOKENS")
    os.environ["TWISTEDGW_TOKENS"] = TOKEN
    try:
        gateway = GatewayProcess(f"it-{secrets.token_hex(4)}")
        gateway.start()
    finally:
        if old is None:
            os.environ.pop("TWISTEDGW_TOKENS", None)
        else:
            os.environ["TWISTEDGW_TOKENS"] = old
    yield gateway
    gateway.stop()
    remove_instance_containers(docker_client, gateway.instance)


def pid_of(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    return gateway.process.pid


def open_fds(pid: int) -> list[str]:
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            fds.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return fds


def healthz_seconds(gateway: GatewayProcess) -> float:
    start = time.monotonic()
    response = requests.get(gateway.url + "/healthz", timeout=5)
    assert response.status_code == 200
    return time.monotonic() - start


class HealthProbe:
    """Times ``/healthz`` from another client every 50 ms while an attack runs."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.times.append(healthz_seconds(self.gateway))
            time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def assert_fast(self) -> None:
        assert len(self.times) >= 5, f"too few /healthz probes: {self.times}"
        # The median, so scheduler hiccups on a shared, loaded 2-core machine do not decide
        # the test; and no probe may take a second (before the fix: about 4 s).
        ordered = sorted(self.times)
        assert ordered[len(ordered) // 2] < HEALTHZ_SECONDS, ordered
        assert ordered[-1] < 1.0, ordered


def raw(gateway: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=10)


def read_status(sock: socket.socket, timeout: float = 10.0) -> int:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 "), data
    return int(data.split(b" ")[1])


def push(sock: socket.socket, total: int, seconds: float) -> int:
    """Send up to ``total`` bytes for at most ``seconds``; how many went out."""
    sent, block, deadline = 0, b"x" * 65536, time.monotonic() + seconds
    sock.settimeout(0.5)
    with contextlib.suppress(OSError):
        while sent < total and time.monotonic() < deadline:
            sent += sock.send(block)
    return sent


def test_huge_bodies_are_refused_from_headers_and_never_spooled(
    edge_gateway: GatewayProcess,
) -> None:
    """Announced huge bodies (a create, a POST on /ws/{id}) get 413 from their headers, a huge
    chunk size gets 413 once the cap passes; pushing 50 MB at each, round after round for 2 s,
    leaves no temp file and RSS within 40 MiB, while /healthz stays under 100 ms."""
    pid = pid_of(edge_gateway)
    rss_before = rss_kib(pid)
    rounds = 0
    attacks = (
        (b"/sandboxes", b"Content-Type: application/json\r\nContent-Length: 1000000000000\r\n"),
        (b"/ws/" + b"0" * 32, b"Content-Length: 400000000\r\n"),
        (b"/sandboxes", b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"),
    )
    with HealthProbe(edge_gateway) as probe:
        start = time.monotonic()
        while not rounds or time.monotonic() - start < 2:
            rounds += 1
            for path, extra in attacks:
                sock = raw(edge_gateway)
                sock.sendall(
                    b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"
                )
                if b"chunked" in extra:
                    sock.sendall(b"FFFFFFFFFFFFFFFFFFFFFFFF\r\n")
                    push(sock, 200_000, 2)
                else:
                    assert read_status(sock) == 413
                push(sock, 50 * 1024 * 1024, 3)
                if b"chunked" in extra:
                    assert read_status(sock) == 413
                sock.close()
    probe.assert_fast()
    assert not [f for f in open_fds(pid) if "(deleted)" in f]
    assert rss_kib(pid) - rss_before < RSS_GROWTH_KIB


def test_token_gateway_says_401_before_reading_a_body(token_gateway: GatewayProcess) -> None:
    """Without a token, a create announcing 300 MB is answered 401 at once, and the body
    pushed after it is not stored (RSS within 40 MiB)."""
    pid = pid_of(token_gateway)
    rss_before = rss_kib(pid)
    sock = raw(token_gateway)
    sock.sendall(
        b"POST /sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 300000000\r\n\r\n"
    )
    assert read_status(sock) == 401
    push(sock, 50 * 1024 * 1024, 3)
    sock.close()
    assert rss_kib(pid) - rss_before < RSS_GROWTH_KIB
    assert not [f for f in open_fds(pid) if "(deleted)" in f]


def test_slow_bodies_are_dropped_at_the_body_deadline(edge_gateway: GatewayProcess) -> None:
    """30 clients that send headers and then a body byte every 0.5 s are all dropped within
    the 2 s body deadline (plus slack); /healthz stays under 100 ms meanwhile and the gateway's
    descriptors return to where they were (within 5)."""
    pid = pid_of(edge_gateway)
    fds_before = len(open_fds(pid))
    socks = []
    for _ in range(30):
        sock = raw(edge_gateway)
        sock.sendall(
            b"POST /sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        socks.append(sock)
    closed: set[int] = set()
    with HealthProbe(edge_gateway) as probe:
        deadline = time.monotonic() + 6
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                if i in closed:
                    continue
                try:
                    sock.send(b" ")
                    sock.settimeout(0.001)
                    if sock.recv(4096) == b"":
                        closed.add(i)
                except TimeoutError:
                    pass
                except OSError:
                    closed.add(i)
            time.sleep(0.5)
    for sock in socks:
        sock.close()
    probe.assert_fast()
    assert len(closed) == len(socks)
    wait_for(lambda: len(open_fds(pid)) <= fds_before + 5, timeout=5)


def test_http_connections_beyond_the_cap_get_503(edge_gateway: GatewayProcess) -> None:
    """With --max-http-connections 40, the 41st open connection gets a 503 at once; once the
    idle ones pass the header deadline a new request is served again, and the descriptors come
    back (within 5)."""
    pid = pid_of(edge_gateway)
    fds_before = len(open_fds(pid))
    idle = [raw(edge_gateway) for _ in range(40)]
    time.sleep(0.3)
    extra = raw(edge_gateway)
    assert read_status(extra) == 503
    extra.close()
    assert len(open_fds(pid)) <= fds_before + 45
    wait_for(lambda: _served(edge_gateway), timeout=6, interval=0.2)
    for sock in idle:
        sock.close()
    wait_for(lambda: len(open_fds(pid)) <= fds_before + 5, timeout=5)


def _served(gateway: GatewayProcess) -> bool:
    try:
        return requests.get(gateway.url + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_browsers_cannot_drive_an_open_gateway(edge_gateway: GatewayProcess) -> None:
    """On an open gateway bound to loopback: a rebinding Host gets 421, a foreign Origin
    gets 403 on the WebSocket handshake (it got 101) and on REST, and a cross-site text/plain
    POST gets 415 and creates nothing; the harness's own requests still work."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    listed = requests.get(edge_gateway.url + "/sandboxes", timeout=10).json()
    sandbox_id = edge_gateway.create()
    response = requests.get(
        edge_gateway.url + "/sandboxes", headers={"Host": "rebound.example"}, timeout=10
    )
    assert response.status_code == 421 and "error" in response.json()
    with pytest.raises(InvalidStatus) as info:
        connect(f"{edge_gateway.ws_url}/ws/{sandbox_id}", origin="http://evil.example")
    assert info.value.response.status_code == 403
    response = requests.post(
        edge_gateway.url + "/sandboxes",
        data=b'{"idle_timeout": 60}',
        headers={"Content-Type": "text/plain", "Origin": f"http://127.0.0.1:{edge_gateway.port}"},
        timeout=10,
    )
    assert response.status_code == 415
    after = requests.get(edge_gateway.url + "/sandboxes", timeout=10).json()
    assert len(after) == len(listed) + 1
    with connect(
        f"{edge_gateway.ws_url}/ws/{sandbox_id}",
        origin=f"http://127.0.0.1:{edge_gateway.port}",
    ) as ws:
        ws.send(json.dumps({"command": "echo same-origin"}))
        assert "same-origin" in ws.recv(timeout=30)
    edge_gateway.delete(sandbox_id)


def test_undecodable_headers_are_400_without_traceback(edge_gateway: GatewayProcess) -> None:
    """A non-UTF-8 Authorization or Idempotency-Key header gets 400 on every route but
    /healthz, and leaves no traceback in the log."""
    before = edge_gateway.log_path.read_text(errors="replace").count("Traceback")
    for header in (b"Authorization: Bearer \xff\xfe", b"Idempotency-Key: \xff"):
        for line in (b"GET /sandboxes", b"POST /sandboxes", b"GET /ws/" + b"0" * 32):
            sock = raw(edge_gateway)
            sock.sendall(line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\n\r\n")
            assert read_status(sock) == 400, (header, line)
            sock.close()
    time.sleep(0.5)
    assert edge_gateway.log_path.read_text(errors="replace").count("Traceback") == before
