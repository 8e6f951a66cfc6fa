"""A real agent process on a Unix socket, for the black-box suites: on the host (this Python,
which must be the image's 3.11) or inside the sandbox image (Docker, socket in a bind-mounted
directory).  Plus a raw WebSocket client for what a well-behaved library will not send."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SANDBOX_IMAGE", "sandbox-websocket-image")
#: Where the host agent's ``agent`` package (or module) is found: this repository's by default;
#: point it elsewhere to run the suite against another agent implementation.
AGENT_PATH = os.environ.get("AGENT_BLACKBOX_PATH", str(REPO / "sandbox-image"))
LABEL = "org.twistedgw.agent-blackbox"
SOCKET_DIR_IN_CONTAINER = "/run/twistedgw"


class AgentServer:
    """One agent process listening on ``self.socket`` with secret ``self.secret``."""

    def __init__(self, where: str, **env: str) -> None:
        self.where = where
        self.secret = uuid.uuid4().hex
        self.dir = tempfile.mkdtemp(prefix="twistedgw-agent-bb-")
        os.chmod(self.dir, 0o777)  # the image's agent runs as uid 999 (agent)
        self.socket = os.path.join(self.dir, "agent.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.container: str | None = None
        settings = {"SANDBOX_AGENT_SECRET": self.secret, **env}
        if where == "host":
            child_env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "PYTHONPATH": f"{REPO}:{AGENT_PATH}",
                "AGENT_UNIX_SOCKET": self.socket,
                **settings,
            }
            self.log = open(os.path.join(self.dir, "agent.log"), "wb")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent"], env=child_env, stderr=self.log
            )
        else:
            settings["AGENT_UNIX_SOCKET"] = f"{SOCKET_DIR_IN_CONTAINER}/agent.sock"
            args = ["docker", "run", "-d", "--rm", "--network", "none", "--label", f"{LABEL}=1"]
            args += ["-v", f"{self.dir}:{SOCKET_DIR_IN_CONTAINER}"]
            for key, value in settings.items():
                args += ["-e", f"{key}={value}"]
            out = subprocess.run([*args, IMAGE], capture_output=True, check=True, text=True)
            self.container = out.stdout.strip()
        self.wait_ready()
        self.pid = self._agent_pid()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.socket):
                try:
                    if http_get(self.socket, "/healthz").startswith(b"HTTP/1.1 200"):
                        return
                except OSError:
                    pass
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError(f"agent not ready on {self.socket} within {timeout} s")

    def _agent_pid(self) -> int:
        if self.proc is not None:
            return self.proc.pid
        assert self.container is not None
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", self.container],
            capture_output=True,
            check=True,
            text=True,
        )
        # tini -> supervise -> the agent: the agent is the grandchild that runs "-m agent".
        parents = {int(out.stdout)}
        for _ in range(2):
            children = set()
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        stat = Path(f"/proc/{entry}/stat").read_text()
                        cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if int(stat.rsplit(")", 1)[1].split()[1]) in parents:
                        if cmdline.endswith(b"-m\0agent\0") and b"supervise" not in cmdline:
                            return int(entry)
                        children.add(int(entry))
            parents = children
        raise RuntimeError("no agent process under the container's tini")

    def alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        if self.container is not None:
            subprocess.run(["docker", "rm", "-f", self.container], capture_output=True)
        subprocess.run(["rm", "-rf", self.dir], capture_output=True)


def http_get(path: str, target: str, headers: str = "") -> bytes:
    """One raw HTTP request over the Unix socket; the whole response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        head = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}"
        s.sendall(f"{head}\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


class RawClient:
    """A hand-rolled WebSocket client: sends whatever frames a test wants."""

    def __init__(self, server: AgentServer) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(server.socket)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                "GET /agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\nAuthorization: Bearer {server.secret}\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("closed during the handshake")
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> None:
        first = (0x80 if fin else 0) | opcode
        n = len(payload)
        bit = 0x80 if mask else 0
        if n < 126:
            head = struct.pack("!BB", first, bit | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", first, bit | 126, n)
        else:
            head = struct.pack("!BBQ", first, bit | 127, n)
        if mask:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        self.sock.sendall(head + payload)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b0 & 0x0F, self._read(n)

    def recv_json(self) -> Any:
        opcode, payload = self.recv_frame()
        assert opcode == 0x1, f"expected a text frame, got opcode {opcode}: {payload!r}"
        return json.loads(payload)

    def close(self) -> None:
        self.sock.close()
