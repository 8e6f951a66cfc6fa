"""Egress proxy throughput (issue 17): a 100 MiB download through the allow-list, beside a
direct loopback download, in the same run.

Everything stays on this machine: the "internet" is an HTTP server on 127.0.0.1 started here;
the gateway maps ``download.test`` to it through its test hosts file and may connect to
127.0.0.1 only because of ``--egress-allow-cidr 127.0.0.1/32``. Three paths, the same client
code (Python, reading 1 MiB at a time and discarding):

* ``direct``: host client -> server (loopback TCP), the baseline;
* ``gateway proxy``: host client -> the sandbox's egress socket -> gateway proxy -> server
  (the gateway's part alone);
* ``sandbox``: client in the sandbox -> agent forwarder (127.0.0.1:3128) -> egress socket ->
  gateway proxy -> server (what sandbox code gets);
* ``sandbox loopback``: client in the sandbox -> a server thread in the same sandbox on its
  loopback (what the sandbox itself manages, CPU limit included: the ceiling for ``sandbox``);
* ``forwarder alone``: host client -> the agent's forwarder (``agent/egress.py``, run here on
  the host's Python) -> a Unix socket server sending the bytes (the agent's part alone).

Run: ``PYTHONPATH=$PWD .venv/bin/python bench/egressbench.py [--mib 100] [--runs 5]``
(``SANDBOX_IMAGE`` names the image, as for the tests).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import requests
from websockets.sync.client import connect

from twistedgw.egress.resolver import TEST_HOSTS_ENV, TEST_HOSTS_MAGIC
from twistedgw.runtime.hardening import EGRESS_SOCKET_NAME
from twistedgw.runtime.labels import LABEL_INSTANCE
from twistedgw.testing.process import GatewayProcess, gateway_env

CHUNK = b"x" * (1024 * 1024)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        size = int(self.path.rsplit("/", 1)[1])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        sent = 0
        while sent < size:
            n = min(len(CHUNK), size - sent)
            self.wfile.write(CHUNK[:n])
            sent += n

    def log_message(self, *args: Any) -> None:
        pass


def read_answer(sock: socket.socket, request: bytes) -> int:
    """Send ``request`` and read the whole answer; returns the body's size."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    got = len(body)
    while got < length:
        chunk = sock.recv(1024 * 1024)
        if not chunk:
            break
        got += len(chunk)
    return got


SANDBOX_CLIENT = """
import socket, time
request = {request!r}
started = time.monotonic()
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(request)
data = b""
while b"\\r\\n\\r\\n" not in data:
    data += s.recv(65536)
head, body = data.split(b"\\r\\n\\r\\n", 1)
got = len(body)
while got < {size}:
    chunk = s.recv(1024 * 1024)
    if not chunk:
        break
    got += len(chunk)
print(got, time.monotonic() - started)
"""


SANDBOX_LOOPBACK = """
import socket, threading, time
size = {size}
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
def serve():
    conn, _ = server.accept()
    chunk = b"x" * (1024 * 1024)
    sent = 0
    while sent < size:
        conn.sendall(chunk[: min(len(chunk), size - sent)])
        sent += min(len(chunk), size - sent)
    conn.close()
threading.Thread(target=serve, daemon=True).start()
started = time.monotonic()
s = socket.create_connection(server.getsockname())
got = 0
while got < size:
    data = s.recv(1024 * 1024)
    if not data:
        break
    got += len(data)
print(got, time.monotonic() - started)
"""


def forwarder_alone(size: int, tmp: Path) -> float:
    """Seconds for ``size`` bytes through the agent's forwarder, on the host."""
    from twistedgw.testing.process import REPO

    sys.path.insert(0, str(REPO / "sandbox-image"))
    egress: Any = importlib.import_module("agent.egress")
    loop_module: Any = importlib.import_module("agent.loop")
    path = str(tmp / "forward.sock")
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    loop = loop_module.Loop()
    listening = egress.EgressForwarder(loop, path).listen(0)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            loop.run_once(0.05)

    def serve() -> None:
        conn, _ = server.accept()
        sent = 0
        while sent < size:
            n = min(len(CHUNK), size - sent)
            conn.sendall(CHUNK[:n])
            sent += n
        conn.close()

    threading.Thread(target=spin, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", listening.getsockname()[1])) as sock:
            started = time.monotonic()
            got = 0
            while got < size:
                data = sock.recv(1024 * 1024)
                if not data:
                    break
                got += len(data)
            assert got == size, got
            return time.monotonic() - started
    finally:
        stop.set()
        listening.close()
        server.close()


def run_in_sandbox(ws: Any, code: str) -> str:
    ws.send(json.dumps({"command": f"python3 - <<'EOF'\n{code}\nEOF", "timeout": 300}))
    while True:
        message = json.loads(ws.recv(timeout=320))
        if message.get("type") != "output":
            assert message.get("returncode") == 0, message
            return str(message["output"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cpus", type=float, default=1.0, help="the sandbox's cpus")
    args = parser.parse_args()
    size = args.mib * 1024 * 1024

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = int(server.server_address[1])

    tmp = Path(tempfile.mkdtemp(prefix="egressbench-"))
    hosts = tmp / "hosts"
    hosts.write_text(f"{TEST_HOSTS_MAGIC}\n127.0.0.1 download.test\n")
    env = {**gateway_env(), TEST_HOSTS_ENV: str(hosts)}
    # Short: the socket directory's path (under $TMPDIR, with the instance name twice) must
    # leave the agent's socket path within the 107 bytes Unix sockets allow.
    instance = f"eb-{secrets.token_hex(3)}"
    gateway = GatewayProcess(
        instance, "--egress-allow-cidr", "127.0.0.1/32", "--max-cpus", str(args.cpus), env=env
    )
    client = docker.from_env()
    try:
        gateway.start()
        created = requests.post(
            gateway.url + "/sandboxes",
            json={"egress": [f"download.test:{port}"], "cpus": args.cpus},
            timeout=60,
        )
        created.raise_for_status()
        sandbox_id = created.json()["sandbox_id"]
        attrs = client.containers.get(f"twistedgw-{sandbox_id}").attrs
        socket_dir = next(
            m["Source"] for m in attrs["Mounts"] if m["Destination"] == "/run/twistedgw"
        )
        egress_socket = os.path.join(socket_dir, EGRESS_SOCKET_NAME)
        proxied = f"GET http://download.test:{port}/{size} HTTP/1.1\r\nHost: download.test\r\n\r\n"
        direct = f"GET /{size} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

        results: dict[str, list[float]] = {
            "direct": [],
            "gateway proxy": [],
            "sandbox": [],
            "sandbox loopback": [],
            "forwarder alone": [],
        }
        with connect(f"{gateway.ws_url}/ws/{sandbox_id}", max_size=None) as ws:
            for _ in range(args.runs):
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    started = time.monotonic()
                    assert read_answer(sock, direct) == size
                    results["direct"].append(time.monotonic() - started)
                with socket.socket(socket.AF_UNIX) as sock:
                    started = time.monotonic()
                    sock.connect(egress_socket)
                    assert read_answer(sock, proxied.encode()) == size
                    results["gateway proxy"].append(time.monotonic() - started)
                code = SANDBOX_CLIENT.format(request=proxied.encode(), size=size)
                got, seconds = run_in_sandbox(ws, code).split()
                assert int(got) == size, got
                results["sandbox"].append(float(seconds))
                got, seconds = run_in_sandbox(ws, SANDBOX_LOOPBACK.format(size=size)).split()
                assert int(got) == size, got
                results["sandbox loopback"].append(float(seconds))
                results["forwarder alone"].append(forwarder_alone(size, tmp))
        base = statistics.median(results["direct"])
        print(
            f"== egress: {args.mib} MiB download, {args.runs} runs each, sandbox cpus "
            f"{args.cpus:g}, median (min..max)"
        )
        print(f"{'path':<16}{'seconds':>10}{'MiB/s':>10}{'range MiB/s':>18}{'vs direct':>11}")
        for name, samples in results.items():
            median = statistics.median(samples)
            rates = (args.mib / max(samples), args.mib / min(samples))
            # The forwarder's own server is a raw socket, not http.server: no ratio.
            ratio = (
                "-" if name in ("forwarder alone", "sandbox loopback") else f"{median / base:.2f}x"
            )
            print(
                f"{name:<16}{median:>10.3f}{args.mib / median:>10.0f}"
                f"{f'{rates[0]:.0f}..{rates[1]:.0f}':>18}{ratio:>11}"
            )
    finally:
        gateway.stop()
        for container in client.containers.list(
            all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"}
        ):
            container.remove(force=True)
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
