"""Egress by allow-list, end to end: a real gateway, the real image, and an "internet" of two
servers on 127.0.0.1 (HTTP, and HTTPS with a certificate for ``allowed.test``) started by the
test. The gateway maps ``.test`` names through its test hosts file
(``TWISTEDGW_EGRESS_TEST_HOSTS``) and may reach 127.0.0.1 only because the test says
``--egress-allow-cidr 127.0.0.1/32``. Sandbox traffic leaves the sandbox only through the
agent's forwarder and the gateway's proxy; nothing is sent to any non-loopback address (the
direct connect attempt goes to TEST-NET-1 from a namespace without a route, and fails there).
"""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess, remove_instance_containers
from tests.integration.helpers import rss_kib, run
from twistedgw.egress.resolver import TEST_HOSTS_ENV, TEST_HOSTS_MAGIC
from twistedgw.testing.process import gateway_env


class Handler(BaseHTTPRequestHandler):
    """``/hello`` answers who asked; ``/big?n=BYTES`` streams that many bytes."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/big"):
            size = int(self.path.split("n=", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 65536
            sent = 0
            try:
                while sent < size:
                    n = min(len(chunk), size - sent)
                    self.wfile.write(chunk[:n])
                    sent += n
            except OSError:
                pass
            return
        body = f"hello {self.headers.get('Host')} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class Internet:
    """The test's HTTP and HTTPS servers on 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        self.cert = tmp / "cert.pem"
        key = tmp / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=allowed.test",
                "-addext",
                "subjectAltName=DNS:allowed.test",
                "-keyout",
                str(key),
                "-out",
                str(self.cert),
            ],
            check=True,
            capture_output=True,
        )
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.https = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.https.socket = context.wrap_socket(self.https.socket, server_side=True)
        self.http.daemon_threads = self.https.daemon_threads = True
        for server in (self.http, self.https):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def http_port(self) -> int:
        return int(self.http.server_address[1])

    @property
    def https_port(self) -> int:
        return int(self.https.server_address[1])

    def close(self) -> None:
        for server in (self.http, self.https):
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    servers = Internet(tmp_path_factory.mktemp("internet"))
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def egress_gateway(
    docker_client: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway whose test resolver maps the ``.test`` names, allowed to reach 127.0.0.1."""
    hosts = tmp_path_factory.mktemp("hosts") / "hosts"
    hosts.write_text(
        f"{TEST_HOSTS_MAGIC}\n127.0.0.1 allowed.test denied.test\n169.254.169.254 meta.test\n"
    )
    env = {**gateway_env(), TEST_HOSTS_ENV: str(hosts)}
    gateway = GatewayProcess(
        f"it-egress-{secrets.token_hex(3)}", "--egress-allow-cidr", "127.0.0.1/32", env=env
    )
    gateway.start()
    yield gateway
    gateway.stop()
    remove_instance_containers(docker_client, gateway.instance)


@pytest.fixture(scope="module")
def sandbox(egress_gateway: GatewayProcess, internet: Internet) -> str:
    return egress_gateway.create(
        json={
            "egress": [
                f"allowed.test:{internet.http_port}",
                f"allowed.test:{internet.https_port}",
                "meta.test:80",
            ]
        }
    )


def python(ws: Any, code: str, timeout: float = 60) -> dict[str, Any]:
    """Run a Python program in the sandbox (as the sandbox user) and return the result."""
    return run(ws, f"python3 - <<'EOF'\n{code}\nEOF", timeout=timeout)


FETCH = """
import sys, ssl, urllib.request, urllib.error
context = ssl.create_default_context(cafile="/tmp/ca.pem") if "{url}".startswith("https") else None
try:
    with urllib.request.urlopen("{url}", timeout=20, context=context) as answer:
        print(answer.status, answer.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode().strip())
"""


def test_allowed_name_over_http_and_https_works(
    egress_gateway: GatewayProcess, sandbox: str, internet: Internet
) -> None:
    """Python's urllib in the sandbox reaches an allowed name over HTTP (forward proxy) and
    over HTTPS (CONNECT tunnel, certificate checked for the name), with nothing but the proxy
    variables the sandbox got; the gateway logs the decisions."""
    ca = internet.cert.read_text()
    with connect(f"{egress_gateway.ws_url}/ws/{sandbox}") as ws:
        assert run(ws, f"cat > /tmp/ca.pem <<'EOF'\n{ca}EOF")["returncode"] == 0
        http = python(ws, FETCH.format(url=f"http://allowed.test:{internet.http_port}/hi"))
        assert http["output"] == f"200 hello allowed.test:{internet.http_port} /hi\n", http
        https = python(ws, FETCH.format(url=f"https://allowed.test:{internet.https_port}/tls"))
        assert https["output"] == f"200 hello allowed.test:{internet.https_port} /tls\n", https
    log = egress_gateway.log_path.read_text()
    assert f"egress {sandbox}: allowed GET allowed.test:{internet.http_port}" in log
    assert f"egress {sandbox}: allowed CONNECT allowed.test:{internet.https_port}" in log


def test_denied_and_rebound_names_get_403(
    egress_gateway: GatewayProcess, sandbox: str, internet: Internet
) -> None:
    """A name not in the list gets 403 with a one-line reason; a listed name that resolves to
    169.254.169.254 (rebinding onto cloud metadata) gets 403 too, decided by the proxy on the
    address before any connection."""
    with connect(f"{egress_gateway.ws_url}/ws/{sandbox}") as ws:
        denied = python(ws, FETCH.format(url=f"http://denied.test:{internet.http_port}/"))
        assert denied["output"] == (
            f"403 egress refused: denied.test:{internet.http_port} is not in this sandbox's "
            "egress list\n"
        )
        rebound = python(ws, FETCH.format(url="http://meta.test/latest/meta-data/"))
        assert rebound["output"].startswith("403 egress refused: meta.test resolves to a ")
        assert "link-local address 169.254.169.254" in rebound["output"]
    log = egress_gateway.log_path.read_text()
    assert f"egress {sandbox}: refused meta.test:80" in log


def test_sandbox_has_only_loopback_and_the_proxy_variables(
    egress_gateway: GatewayProcess, sandbox: str, docker_client: Any
) -> None:
    """The sandbox has no interface but loopback and a direct connect to a non-loopback
    address fails (no route); ``env | grep -i proxy`` shows the proxy variables; the
    gateway's socket is in the agent's directory, out of the sandbox user's reach."""
    attrs = docker_client.containers.get(f"twistedgw-{sandbox}").attrs
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    with connect(f"{egress_gateway.ws_url}/ws/{sandbox}") as ws:
        assert run(ws, "ls /sys/class/net")["output"].split() == ["lo"]
        direct = python(
            ws,
            "import socket\n"
            "try:\n"
            "    socket.create_connection(('192.0.2.1', 80), timeout=3)\n"
            "except OSError as e:\n"
            "    print(type(e).__name__, e.errno)\n",
        )
        assert direct["output"] in ("OSError 101\n", "OSError 113\n"), direct  # unreachable
        env = run(ws, "env | grep -i proxy | sort")["output"].splitlines()
        assert env == [
            "HTTPS_PROXY=http://127.0.0.1:3128",
            "HTTP_PROXY=http://127.0.0.1:3128",
            "NO_PROXY=localhost,127.0.0.1,::1",
            "http_proxy=http://127.0.0.1:3128",
            "https_proxy=http://127.0.0.1:3128",
            "no_proxy=localhost,127.0.0.1,::1",
        ]
        reach = python(
            ws,
            "import socket\n"
            "try:\n"
            "    socket.socket(socket.AF_UNIX).connect('/run/twistedgw/proxy.sock')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n",
        )
        assert reach["output"] == "PermissionError\n"
    shown = egress_gateway.get(f"/sandboxes/{sandbox}?details=true").json()
    assert shown["network"] == "none" and "meta.test:80" in shown["egress"]


@pytest.mark.serial
def test_hundred_parallel_requests_and_flat_rss(
    egress_gateway: GatewayProcess, sandbox: str, internet: Internet
) -> None:
    """100 requests at once from the sandbox all complete, and the gateway's RSS stays flat
    over three rounds. A load test (it measures RSS, and once timed out beside four xdist
    workers): it runs in the serial phase."""
    program = f"""
import urllib.request
from concurrent.futures import ThreadPoolExecutor
URL = "http://allowed.test:{internet.http_port}/p%d"
def get(i):
    with urllib.request.urlopen(URL % i, timeout=60) as answer:
        return answer.read().decode().split()[-1]
with ThreadPoolExecutor(100) as pool:
    got = list(pool.map(get, range(100)))
print(sum(g == "/p%d" % i for i, g in enumerate(got)))
"""
    with connect(f"{egress_gateway.ws_url}/ws/{sandbox}") as ws:
        assert python(ws, program)["output"] == "100\n"  # warm-up round
        before = rss_kib(egress_gateway.pid)
        for _ in range(3):
            result = python(ws, program)
            # The whole result (exit code, stderr, timing), not pytest's truncated repr.
            assert result["output"] == "100\n", json.dumps(result)[-3000:]
        after = rss_kib(egress_gateway.pid)
    assert after - before < 16 * 1024, (before, after)


def test_client_that_stalls_mid_body_does_not_grow_the_gateway(
    egress_gateway: GatewayProcess, sandbox: str, internet: Internet
) -> None:
    """A client in the sandbox that reads 1 MiB of a 512 MiB download and then stops: the
    gateway's memory does not grow with the download (backpressure from the sandbox back to
    the server)."""
    program = f"""
import socket, time
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"GET http://allowed.test:{internet.http_port}/big?n={512 * 1024 * 1024} HTTP/1.1\\r\\n"
          b"Host: allowed.test\\r\\n\\r\\n")
got = 0
while got < 1024 * 1024:
    got += len(s.recv(65536))
print("stalled", flush=True)
time.sleep(6)
"""
    before = rss_kib(egress_gateway.pid)
    with connect(f"{egress_gateway.ws_url}/ws/{sandbox}") as ws:
        ws.send(json.dumps({"command": f"python3 - <<'EOF'\n{program}\nEOF", "stream": True}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = json.loads(ws.recv(timeout=30))
            if message.get("type") == "output" and "stalled" in message.get("data", ""):
                break
            assert message.get("type") != "result", message
        time.sleep(3)
        during = rss_kib(egress_gateway.pid)
        while json.loads(ws.recv(timeout=30)).get("type") != "result":
            pass
    assert during - before < 32 * 1024, (before, during)
    assert requests.get(egress_gateway.url + "/healthz", timeout=10).status_code == 200


def test_egress_survives_a_gateway_restart(
    egress_gateway: GatewayProcess, sandbox: str, internet: Internet
) -> None:
    """After the gateway restarts, the recovered sandbox's proxy listens again (its allow-list
    comes back from the container's labels): allowed still works, denied is still 403."""
    egress_gateway.stop()
    egress_gateway.start()
    with connect(f"{egress_gateway.ws_url}/ws/{sandbox}") as ws:
        http = python(ws, FETCH.format(url=f"http://allowed.test:{internet.http_port}/again"))
        assert http["output"] == f"200 hello allowed.test:{internet.http_port} /again\n", http
        denied = python(ws, FETCH.format(url=f"http://denied.test:{internet.http_port}/"))
        assert denied["output"].startswith("403 egress refused: ")
