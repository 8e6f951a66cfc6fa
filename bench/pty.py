"""Keystroke echo benchmark (issue 16): one key typed into a PTY until its echo comes back.

    python bench/pty.py [--keys 500] [--warmup 50] [--json PATH]

Starts its own gateway, creates one sandbox and runs ``stty raw -echo; exec cat`` on a PTY
(so the echo is written by a user process, as a shell's line editor does, not by the line
discipline). For each of ``--keys`` keystrokes it sends one character and waits until that
character comes back; the round trip is timed on the client. Measured in the same run:

- **gateway, JSON**: ``stdin`` messages in, ``output`` chunks (``stream: "pty"``) out, through
  ``/ws/{id}`` (client -> gateway -> agent -> cat and back);
- **gateway, binary**: the same with binary terminal input and output frames;
- **agent direct** (the baseline): the same JSON round trip on the agent's own endpoint (the
  one the gateway uses: its port published on 127.0.0.1), without the gateway.

Reports p50/p95/p99 (ms) of each; target p50 < 5 ms through the gateway on loopback.

Then screen output throughput (no target): ``seq 1 --flood-lines`` on a PTY through the gateway
(JSON and binary), beside the same command on a pseudo-terminal of this host read by a plain
blocking loop (the kernel's PTY on this machine, the ceiling for any terminal). The
machine's load is printed before and after (it is shared). Everything it creates (the
gateway, its containers) is removed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import benchlib
import docker
import requests
from benchlib import percentile
from websockets.sync.client import ClientConnection, connect, unix_connect

from twistedgw import protocol
from twistedgw.runtime.hardening import AGENT_PORT, SOCKET_NAME
from twistedgw.runtime.labels import LABEL_INSTANCE
from twistedgw.testing.process import GatewayProcess

ECHO_COMMAND = "stty raw -echo; exec cat"
KEYS = "abcdefghijklmnopqrstuvwxyz0123456789"


class Typist:
    """One PTY running ``ECHO_COMMAND`` on one connection; types keys and times their echo."""

    def __init__(self, ws: ClientConnection, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self.rid = f"keys-{secrets.token_hex(3)}"
        ws.send(
            json.dumps(
                {
                    "type": "pty",
                    "request_id": self.rid,
                    "cols": 80,
                    "rows": 24,
                    "command": ECHO_COMMAND,
                    "binary": binary,
                }
            )
        )
        started = self._next_json("started")
        self.pid = int(started["pid"])
        self.screen = bytearray()
        # Ready once the terminal is raw: a probe key comes back exactly once.
        deadline = time.monotonic() + 30
        while True:
            self._type("!")
            try:
                self._wait_for(b"!", 0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.2)
        self._drain()

    def _next_json(self, kind: str) -> dict[str, Any]:
        while True:
            message = self.ws.recv(timeout=30)
            if isinstance(message, str):
                decoded = json.loads(message)
                if decoded.get("type") == kind:
                    return dict(decoded)
                if decoded.get("type") == "error":
                    raise RuntimeError(f"error reply: {decoded}")

    def _type(self, key: str) -> None:
        if self.binary:
            self.ws.send(
                protocol.BINARY_STDIN_HEAD.pack(protocol.BINARY_STDIN, self.pid) + key.encode()
            )
        else:
            self.ws.send(json.dumps({"type": "stdin", "request_id": self.rid, "data": key}))

    def _received(self, message: str | bytes) -> bytes:
        if isinstance(message, bytes):
            return message[protocol.BINARY_OUTPUT_HEAD.size :]
        decoded = json.loads(message)
        if decoded.get("type") == "output":
            return str(decoded["data"]).encode()
        return b""

    def _wait_for(self, key: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while key not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no echo of {key!r}")
            self.screen += self._received(self.ws.recv(timeout=left))
        self.screen.clear()

    def _drain(self) -> None:
        try:
            while True:
                self.ws.recv(timeout=0.05)
        except TimeoutError:
            self.screen.clear()

    def round_trips(self, count: int) -> list[float]:
        samples = []
        for i in range(count):
            key = KEYS[i % len(KEYS)]
            start = time.perf_counter()
            self._type(key)
            self._wait_for(key.encode(), 10.0)
            samples.append((time.perf_counter() - start) * 1000.0)
        return samples

    def close(self) -> None:
        self.ws.send(json.dumps({"type": "signal", "pid": self.pid, "signal": "KILL"}))


def throughput(nbytes: int, chunks: int, seconds: float) -> dict[str, float]:
    """The figures of one output flood: MB, seconds, MB/s and how many chunks it came in."""
    return {
        "mb": nbytes / 1e6,
        "seconds": seconds,
        "mb_s": nbytes / 1e6 / seconds,
        "chunks": chunks,
    }


def flood(ws: ClientConnection, lines: int, binary: bool) -> dict[str, float]:
    """MB/s of ``seq 1 LINES`` on a PTY, from ``pty`` to its result."""
    rid = f"flood-{secrets.token_hex(3)}"
    command = f"seq 1 {lines}"
    message = {"type": "pty", "request_id": rid, "cols": 80, "rows": 24, "command": command}
    start = time.perf_counter()
    ws.send(json.dumps({**message, "binary": binary}))
    nbytes = chunks = 0
    while True:
        received = ws.recv(timeout=300)
        if isinstance(received, bytes):
            nbytes += len(received) - protocol.BINARY_OUTPUT_HEAD.size
            chunks += 1
            continue
        decoded = json.loads(received)
        if decoded.get("type") == "output":
            nbytes += len(decoded["data"].encode())
            chunks += 1
        elif decoded.get("type") in ("result", "error"):
            break
    return throughput(nbytes, chunks, time.perf_counter() - start)


def flood_local(lines: int) -> dict[str, float]:
    """The same on a pseudo-terminal of this host, read by a blocking loop (the baseline)."""
    master, slave = os.openpty()
    start = time.perf_counter()
    child = subprocess.Popen(["seq", "1", str(lines)], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    nbytes = chunks = 0
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the writer is gone
            break
        if not data:
            break
        nbytes += len(data)
        chunks += 1
    child.wait()
    os.close(master)
    return throughput(nbytes, chunks, time.perf_counter() - start)


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": percentile(samples, 50),
        "p95_ms": percentile(samples, 95),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples),
    }


def agent_endpoint(client: Any, instance: str, sandbox_id: str) -> tuple[str, str, str]:
    """How the gateway reaches the sandbox's agent: ``("tcp", url, secret)`` for its port
    published on 127.0.0.1, ``("unix", path, secret)`` for its socket (``network: none``)."""
    found = client.containers.list(
        all=True, filters={"label": f"{LABEL_INSTANCE}={instance}", "name": sandbox_id}
    )
    if not found:
        raise RuntimeError(f"no container for sandbox {sandbox_id}")
    attrs = found[0].attrs
    secret = dict(e.split("=", 1) for e in attrs["Config"]["Env"] if "=" in e)[
        "SANDBOX_AGENT_SECRET"
    ]
    for binding in (attrs["NetworkSettings"]["Ports"] or {}).get(f"{AGENT_PORT}/tcp") or []:
        if binding.get("HostIp") == "127.0.0.1" and binding.get("HostPort"):
            return "tcp", f"ws://127.0.0.1:{binding['HostPort']}/agent", secret
    for mount in attrs["Mounts"]:
        path = os.path.join(mount["Source"], SOCKET_NAME)
        if os.path.exists(path):
            return "unix", path, secret
    raise RuntimeError("the sandbox's agent is reachable neither on loopback nor by socket")


def main() -> int:
    parser = benchlib.bench_arguments(__doc__)
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--flood-lines", type=int, default=3_000_000)
    options = parser.parse_args()

    client = docker.from_env(timeout=120)
    instance = f"bench-pty-{secrets.token_hex(3)}"
    gateway = GatewayProcess(instance)
    results: dict[str, Any] = {
        "instance": instance,
        **benchlib.host_load_before(),
    }
    try:
        gateway.start()
        created = requests.post(gateway.url + "/sandboxes", timeout=120)
        assert created.status_code == 200, created.text
        sandbox_id = created.json()["sandbox_id"]
        kind, where, secret = agent_endpoint(client, instance, sandbox_id)
        results["agent_transport"] = kind

        def through_gateway() -> ClientConnection:
            return connect(f"{gateway.ws_url}/ws/{sandbox_id}", compression=None)

        def direct() -> ClientConnection:
            auth = {"Authorization": f"Bearer {secret}"}
            if kind == "tcp":
                return connect(where, additional_headers=auth, compression=None)
            return unix_connect(
                where, "ws://localhost/agent", additional_headers=auth, compression=None
            )

        paths = (
            ("agent direct (JSON)", direct, False),
            ("gateway (JSON)", through_gateway, False),
            ("gateway (binary frames)", through_gateway, True),
        )
        for name, open_ws, binary in paths:
            with open_ws() as ws:
                typist = Typist(ws, binary)
                typist.round_trips(options.warmup)
                results[name] = summary(typist.round_trips(options.keys))
                typist.close()
            print(name, json.dumps(results[name]), flush=True)
        if options.flood_lines:
            output: dict[str, Any] = {"local pty (baseline)": flood_local(options.flood_lines)}
            with through_gateway() as ws:
                output["gateway (JSON)"] = flood(ws, options.flood_lines, False)
                output["gateway (binary frames)"] = flood(ws, options.flood_lines, True)
            results["output"] = output
            print("output", json.dumps(output), flush=True)
    finally:
        benchlib.stop_instance(gateway, client)
    return benchlib.finish_run(results, report, options.json)


def report(results: dict[str, Any]) -> None:
    print(f"\n{benchlib.host_load_line(results)}")
    print("| path | keys | p50 | p95 | p99 | max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, figures in results.items():
        if isinstance(figures, dict) and "p50_ms" in figures:
            print(
                f"| {name} | {figures['n']} | {figures['p50_ms']:.2f} ms | "
                f"{figures['p95_ms']:.2f} ms | {figures['p99_ms']:.2f} ms | "
                f"{figures['max_ms']:.2f} ms |"
            )
    gateway = results.get("gateway (JSON)")
    verdict = "met" if gateway and gateway["p50_ms"] < 5.0 else "MISSED"
    print(f"target: gateway p50 < 5 ms: {verdict}")
    output = results.get("output")
    if output:
        print("\n| screen output (seq on a PTY) | MB | s | MB/s | chunks |")
        print("| --- | --- | --- | --- | --- |")
        for name, f in output.items():
            print(
                f"| {name} | {f['mb']:.1f} | {f['seconds']:.2f} | {f['mb_s']:.2f} | {f['chunks']} |"
            )


if __name__ == "__main__":
    sys.exit(main())
