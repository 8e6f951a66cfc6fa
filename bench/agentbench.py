"""Agent benchmarks (issue 9): agent start and idle RSS, and a burst of cold creates.

* ``agent``: the agent of the sandbox image started alone in a container (Unix socket in a
  bind-mounted directory, no network).  Inside the container ``sh`` writes the clock just
  before it ``exec``s ``python3 -m agent``; the host retries a full, authenticated WebSocket
  handshake every millisecond and takes the clock when one is accepted: the difference is
  "exec to first accepted handshake" (both clocks are the host kernel's).  Then one command,
  one second idle, and the agent's RSS from /proc.  The same for a baseline image (by default
  the shared ``sandbox-websocket-image``, i.e. the agent it carries) in the same run.
* ``burst``: N (32) cold creates at once against a gateway without a pool, each followed by a
  WebSocket connect and ``echo hi``, vs N parallel SDK ``containers.run`` + ``exec_run``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchlib import (
    IMAGE,
    BenchError,
    RunContext,
    fmt,
    fmt_ratio,
    ratio,
    rss_kib,
    summarize,
    table,
    ws_connect,
    ws_run,
)

perf = time.perf_counter
BASELINE_IMAGE = os.environ.get("BENCH_BASELINE_IMAGE", "sandbox-websocket-image")
SOCKET_DIR = "/run/twistedgw"


def _handshake(path: str, secret: str) -> socket.socket | None:
    """One authenticated WebSocket handshake over a Unix socket; the socket if accepted."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                "GET /agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\nAuthorization: Bearer {secret}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                raise OSError("closed during the handshake")
            head += data
        if head.startswith(b"HTTP/1.1 101"):
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _command(sock: socket.socket, command: str) -> dict[str, Any]:
    """Send one command (a masked text frame) and read its result (unmasked frames)."""
    payload = json.dumps({"command": command, "request_id": "b"}).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    buf = b""
    while True:
        while len(buf) < 2:
            buf += sock.recv(65536)
        n = buf[1] & 0x7F
        start = 2 + (2 if n == 126 else 8 if n == 127 else 0)
        while len(buf) < start:
            buf += sock.recv(65536)
        if n == 126:
            n = int.from_bytes(buf[2:4], "big")
        elif n == 127:
            n = int.from_bytes(buf[2:10], "big")
        while len(buf) < start + n:
            buf += sock.recv(65536)
        message = json.loads(buf[start : start + n])
        buf = buf[start + n :]
        if message.get("type") in ("result", "error"):
            return dict(message)


def agent_sample(ctx: RunContext, image: str) -> tuple[float, float]:
    """(exec to first accepted handshake in s, idle agent RSS in MiB) for one fresh agent."""
    workdir = tempfile.mkdtemp(prefix="twistedgw-bench-agent-", dir=ctx.tmpdir)
    os.chmod(workdir, 0o777)
    secret = uuid.uuid4().hex
    container = ctx.docker.containers.run(
        image,
        entrypoint=[
            "/usr/bin/tini",
            "--",
            "sh",
            "-c",
            f"date +%s%N > {SOCKET_DIR}/t0; exec python3 -u -m agent",
        ],
        command=[],
        detach=True,
        network_mode="none",
        labels=ctx.baseline_labels(),
        environment={
            "SANDBOX_AGENT_SECRET": secret,
            "AGENT_UNIX_SOCKET": f"{SOCKET_DIR}/agent.sock",
        },
        volumes={workdir: {"bind": SOCKET_DIR, "mode": "rw"}},
    )
    try:
        path = os.path.join(workdir, "agent.sock")
        deadline = time.monotonic() + 60
        sock = None
        while sock is None:
            if time.monotonic() > deadline:
                raise BenchError(f"the agent of {image} accepted no handshake in 60 s")
            if os.path.exists(path):
                sock = _handshake(path, secret)
            if sock is None:
                time.sleep(0.001)
        accepted_ns = time.time_ns()
        with open(os.path.join(workdir, "t0")) as f:
            started_ns = int(f.read().strip())
        try:
            result = _command(sock, "echo hi")
        finally:
            sock.close()
        if result.get("output") != "hi\n":
            raise BenchError(f"the agent of {image} answered {str(result)[:200]}")
        time.sleep(1.0)
        rss = agent_rss_mib(container)
        return (accepted_ns - started_ns) / 1e9, rss
    finally:
        ctx.remove_container(container)
        shutil.rmtree(workdir, ignore_errors=True)


def agent_rss_mib(container: Any) -> float:
    """RSS of the python3 process in ``container`` (host PID from ``docker top``)."""
    for pid, args in container.top(ps_args="-o pid,args")["Processes"]:
        if args.startswith("python3"):
            return rss_kib(int(pid)) / 1024
    raise BenchError("no python3 process in the container")


def bench_agent(ctx: RunContext, samples: int) -> dict[str, Any]:
    images = [IMAGE]
    if BASELINE_IMAGE != IMAGE:
        try:
            ctx.docker.images.get(BASELINE_IMAGE)
            images.append(BASELINE_IMAGE)
        except Exception:
            print(f"  agent: baseline image {BASELINE_IMAGE} not found, measuring {IMAGE} only")
    figures: dict[str, dict[str, Any]] = {}
    starts: dict[str, list[float]] = {image: [] for image in images}
    rss: dict[str, list[float]] = {image: [] for image in images}
    agent_sample(ctx, IMAGE)  # untimed: page cache
    for i in range(samples):
        for image in images:  # interleaved, so both see the same machine
            start, mib = agent_sample(ctx, image)
            starts[image].append(start)
            rss[image].append(mib)
        if i == 0 or (i + 1) % 5 == 0:
            print(f"  agent: sample {i + 1}/{samples}", flush=True)
    for image in images:
        figures[image] = {
            "start_ms": summarize(starts[image], 1000.0),
            "idle_rss_mib": summarize(rss[image]),
        }
    rows = []
    for image in images:
        f = figures[image]
        rows.append(
            [
                image,
                fmt(f["start_ms"]["median"]),
                fmt(f["start_ms"]["p90"]),
                fmt(f["idle_rss_mib"]["median"]),
                fmt(f["idle_rss_mib"]["max"]),
                f["start_ms"]["n"],
            ]
        )
    print(
        table(
            "agent: exec to first accepted handshake, and idle RSS after one command",
            ["image", "start ms median", "p90", "RSS MiB median", "max", "n"],
            rows,
        ),
        flush=True,
    )
    return {
        "image": IMAGE,
        "baseline_image": images[1] if len(images) > 1 else None,
        "images": figures,
    }


async def _connect_and_echo(url: str) -> None:
    ws = await ws_connect(url)
    try:
        result = await ws_run(ws, "echo hi", "burst")
        if result.get("output") != "hi\n":
            raise BenchError(f"unexpected output {result!r}")
    finally:
        await ws.close()


def bench_burst(ctx: RunContext, count: int, pool_supported: bool) -> dict[str, Any]:
    gw = ctx.start_gateway("burst", *(["--pool-size", "0"] if pool_supported else []))
    try:
        errors: list[str] = []

        def gateway_one(_: int) -> str | None:
            try:
                sandbox_id = gw.create(timeout=300)
                asyncio.run(_connect_and_echo(gw.ws_base + sandbox_id))
                return sandbox_id
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                return None

        def sdk_one(_: int) -> Any:
            container = ctx.run_baseline()
            result = container.exec_run("echo hi")
            if result.exit_code != 0 or result.output != b"hi\n":
                raise BenchError(f"exec_run: {result!r}")
            return container

        with ThreadPoolExecutor(max_workers=count) as pool:
            t0 = perf()
            created = list(pool.map(gateway_one, range(count)))
            gateway_wall = perf() - t0
        ok = sum(1 for s in created if s is not None)
        with ThreadPoolExecutor(max_workers=8) as pool:  # not timed
            list(pool.map(gw.delete, [s for s in created if s is not None]))
        with ThreadPoolExecutor(max_workers=count) as pool:
            t0 = perf()
            containers = list(pool.map(sdk_one, range(count)))
            sdk_wall = perf() - t0
        with ThreadPoolExecutor(max_workers=8) as pool:  # not timed
            list(pool.map(ctx.remove_container, containers))
    finally:
        ctx.stop_gateway(gw)
    result: dict[str, Any] = {
        "count": count,
        "succeeded": ok,
        "errors": errors[:5],
        "gateway_wall_s": gateway_wall,
        "sdk_wall_s": sdk_wall,
        "ratio": ratio(gateway_wall, sdk_wall),
        "pool_size_0": pool_supported,
    }
    print(
        table(
            f"burst: {count} cold creates + connect + echo hi at once (no pool) vs "
            f"{count} parallel SDK run + exec_run",
            ["", "wall s", "succeeded"],
            [
                ["gateway", fmt(gateway_wall), f"{ok}/{count}"],
                ["SDK run + exec_run", fmt(sdk_wall), f"{count}/{count}"],
                ["ratio", fmt_ratio(result["ratio"]), ""],
            ],
        ),
        flush=True,
    )
    if errors:
        print(f"  burst: {len(errors)} failed, e.g. {errors[0][:200]}", flush=True)
    return result
