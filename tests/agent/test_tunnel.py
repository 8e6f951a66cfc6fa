"""The agent's port tunnels (``agent/tunnel.py``): ``GET /tunnel/{port}`` with
``Upgrade: twistedgw-tunnel``, then raw bytes to 127.0.0.1:port; refusals as JSON answers.
A real agent process on a Unix socket (``blackbox.AgentServer``), a plain socket server here."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.agent.blackbox import AgentServer


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentServer]:
    server = AgentServer("host")
    yield server
    server.stop()


def _tunnel(
    agent: AgentServer, port: int, secret: str | None = None
) -> tuple[socket.socket, bytes]:
    """Ask for a tunnel; the connection and the agent's answer head (and what came with it)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(agent.socket)
    sock.sendall(
        f"GET /tunnel/{port} HTTP/1.1\r\nHost: agent\r\n"
        f"Authorization: Bearer {secret or agent.secret}\r\n"
        "Connection: Upgrade\r\nUpgrade: twistedgw-tunnel\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _json_body(sock: socket.socket, head: bytes) -> dict[str, object]:
    raw = head + _read_all(sock)
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def test_tunnel_carries_bytes_both_ways_after_101(agent: AgentServer) -> None:
    """After ``101`` the connection is a byte pipe to the server on 127.0.0.1:port: what the
    gateway sends arrives unchanged, what the server sends comes back, and the server's close
    closes the tunnel."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    payload = bytes(range(256)) * 8192  # 2 MiB

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            got = b""
            while len(got) < 5:
                got += conn.recv(5 - len(got))
            assert got == b"hello"
            conn.sendall(payload)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sock, head = _tunnel(agent, port)
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
        rest = head.split(b"\r\n\r\n", 1)[1]
        sock.sendall(b"hello")
        assert rest + _read_all(sock) == payload
    thread.join(10)
    listener.close()


def test_nothing_listening_is_502_with_a_json_error(agent: AgentServer) -> None:
    """A port nobody listens on is answered ``502`` with a JSON error naming the port."""
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sock, head = _tunnel(agent, port)
    with sock:
        assert head.startswith(b"HTTP/1.1 502 ")
        assert str(port) in str(_json_body(sock, head)["error"])


@pytest.mark.parametrize("port", [8765, 3128])
def test_the_agents_own_ports_are_refused(agent: AgentServer, port: int) -> None:
    """The agent's port (8765) and the egress forwarder's (3128) are never tunnelled to,
    whatever the gateway asks: ``403``."""
    sock, head = _tunnel(agent, port)
    with sock:
        assert head.startswith(b"HTTP/1.1 403 ")


def test_a_wrong_secret_gets_no_tunnel(agent: AgentServer) -> None:
    """A tunnel request without the agent secret is ``401``, like the WebSocket."""
    sock, head = _tunnel(agent, 1, secret="wrong")
    with sock:
        assert head.startswith(b"HTTP/1.1 401 ")
