"""The agent's egress forwarder (``agent/egress.py``): 127.0.0.1:PORT in the sandbox to the
gateway's proxy socket, byte for byte, with backpressure; and the proxy variables commands get."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent import egress
from agent.config import AgentConfig
from agent.loop import Loop


@pytest.fixture
def running_loop() -> Iterator[Loop]:
    loop = Loop()
    done = threading.Event()

    def spin() -> None:
        while not done.is_set():
            loop.run_once(0.02)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    yield loop
    done.set()
    thread.join(5)


def test_commands_get_the_proxy_variables_only_with_an_egress_socket() -> None:
    """``AGENT_EGRESS_SOCKET`` gives every command HTTP(S)_PROXY (both cases) naming the
    forwarder's port, and NO_PROXY for loopback; without it, none of them."""
    config = AgentConfig.from_environ(
        {
            "SANDBOX_AGENT_SECRET": "s",
            "AGENT_EGRESS_SOCKET": "/run/x/proxy.sock",
            "AGENT_EGRESS_PORT": "3999",
        }
    )
    assert config.egress_socket == "/run/x/proxy.sock"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert config.child_env[name] == "http://127.0.0.1:3999"
    assert config.child_env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    plain = AgentConfig.from_environ({"SANDBOX_AGENT_SECRET": "s"})
    assert plain.egress_socket is None
    assert not any("proxy" in name.lower() for name in plain.child_env)


def test_forwarder_carries_bytes_both_ways(running_loop: Loop, tmp_path: Path) -> None:
    """A connection to the forwarder's port is joined to a new connection on the gateway's
    socket; bytes go both ways unchanged, and closing one side closes the other."""
    path = str(tmp_path / "proxy.sock")
    gateway = socket.socket(socket.AF_UNIX)
    gateway.bind(path)
    gateway.listen(8)
    listening = egress.EgressForwarder(running_loop, path).listen(0)
    port = listening.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        upstream, _ = gateway.accept()
        upstream.settimeout(5)
        client.sendall(b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
        assert _read(upstream, 31) == b"CONNECT a.test:443 HTTP/1.1\r\n\r\n"
        payload = bytes(range(256)) * 4096  # 1 MiB
        upstream.sendall(payload)
        assert _read(client, len(payload)) == payload
        upstream.close()
        assert client.recv(10) == b""
    gateway.close()
    listening.close()


def test_forwarder_stops_reading_while_the_user_does_not(
    running_loop: Loop, tmp_path: Path
) -> None:
    """A user process that stops reading: the forwarder stops reading the gateway's side
    once its buffer is full, so the gateway's writes block instead of piling up here."""
    path = str(tmp_path / "proxy.sock")
    gateway = socket.socket(socket.AF_UNIX)
    gateway.bind(path)
    gateway.listen(8)
    listening = egress.EgressForwarder(running_loop, path).listen(0)
    port = listening.getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.connect(("127.0.0.1", port))
    upstream, _ = gateway.accept()
    upstream.setblocking(False)
    sent = 0
    chunk = b"x" * 65536
    stuck = 0
    while sent < 256 * 1024 * 1024 and stuck < 50:
        try:
            sent += upstream.send(chunk)
            stuck = 0
        except BlockingIOError:
            stuck += 1
            threading.Event().wait(0.02)
    # Kernel buffers on both sockets plus the forwarder's own (256 KiB and one read) hold it.
    assert sent < 32 * 1024 * 1024
    client.close()
    upstream.close()
    gateway.close()
    listening.close()


def _read(sock: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data
