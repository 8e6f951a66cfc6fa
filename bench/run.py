"""twistedgw benchmark suite: the gateway against plain Docker, measured in the same run.

    python bench/run.py [--smoke] [--only ttfc,rtt,throughput,stream,scale,hop,agent,burst]
                        [--json PATH]

Starts its own gateway processes (``twistd --nodaemon sandboxgw`` on a free loopback port,
instance ``bench-<run>-<name>``, temporary --state-dir), runs the benchmarks, prints one table
per benchmark (gateway and baseline side by side: median, p99, n, ratio gateway/baseline), a
summary against the targets, and writes every figure to JSON (default bench/results/latest.json).
Everything it creates (gateway processes, their containers, baseline containers labelled
``org.twistedgw.bench=1``, temporary files) is removed at the end, also on errors and Ctrl-C.

Missing a target is not an error: the exit status is non-zero only when a benchmark fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, next to this file
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository root

import docker
from agentbench import bench_agent, bench_burst
from benchlib import (
    IMAGE,
    MIB,
    REPO,
    BenchError,
    CpuWindow,
    Gateway,
    RssSampler,
    RunContext,
    container_pids,
    describe_machine,
    fmt,
    fmt_ratio,
    gateway_help,
    machine_info,
    ratio,
    rss_kib,
    summarize,
    table,
    ws_connect,
    ws_run,
)

BENCHMARKS = ("ttfc", "rtt", "throughput", "stream", "scale", "hop", "agent", "burst")
#: Gateway RSS growth during the stream that still counts as "flat".
FLAT_RSS_MIB = 16.0
perf = time.perf_counter


@dataclass
class Config:
    smoke: bool = False
    ttfc_samples: int = 20
    pool_size: int = 4
    rtt_samples: int = 200
    rtt_baseline_samples: int = 50
    clients: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    duration: float = 10.0
    stream_bytes: int = 64 * MIB
    stream_reps: int = 3
    scale_count: int = 100
    scale_sdk_samples: int = 5
    rest_seconds: float = 5.0
    hop_samples: int = 200
    agent_samples: int = 10
    burst_count: int = 32
    #: Fixed pauses (letting things settle before a measurement).
    settle_seconds: float = 1.0

    @classmethod
    def smoke_config(cls) -> Config:
        return cls(
            smoke=True,
            ttfc_samples=2,
            rtt_samples=5,
            rtt_baseline_samples=5,
            clients=[1, 8],
            duration=1.0,
            stream_bytes=1 * MIB,
            stream_reps=1,
            scale_count=3,
            scale_sdk_samples=1,
            rest_seconds=1.0,
            hop_samples=5,
            agent_samples=1,
            burst_count=4,
            settle_seconds=0.2,
        )


def say(text: str = "") -> None:
    print(text, flush=True)


def ms(stats: dict[str, Any], key: str = "median") -> str:
    return fmt(stats.get(key))


def lat_cells(stats: dict[str, Any]) -> list[str]:
    """median, p99 and n cells of a latency summary (in ms)."""
    return [ms(stats), ms(stats, "p99"), str(stats.get("n", 0))]


def med(stats: dict[str, Any]) -> float | None:
    value = stats.get("median")
    return None if value is None else float(value)


LAT_HEADERS = ["median ms", "p99 ms", "n"]


# =============================================================================================
# 1. ttfc: time to first command
# =============================================================================================


def wait_pool_full(gateway: Gateway | None, timeout: float = 180.0) -> None:
    """Wait until a pooled gateway reports a full pool (``/healthz`` ``pool``), or sleep 2 s
    when it does not report one."""
    if gateway is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool = gateway.healthz().get("pool")
        if not isinstance(pool, dict) or "ready" not in pool or "size" not in pool:
            time.sleep(2.0)
            return
        if int(pool["ready"]) >= int(pool["size"]):
            return
        time.sleep(0.1)
    raise BenchError(f"the pool of {gateway.instance} did not fill within {timeout} s")


def bench_ttfc(ctx: RunContext, cfg: Config, pool_supported: bool) -> dict[str, Any]:
    cold_args = ["--pool-size", "0"] if pool_supported else []
    cold = ctx.start_gateway("ttfc-cold", *cold_args)
    warm = (
        ctx.start_gateway("ttfc-warm", "--pool-size", str(cfg.pool_size))
        if pool_supported
        else None
    )
    runner = asyncio.Runner()
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "cold_total", "cold_create", "cold_connect", "cold_command",
            "warm_total", "warm_create", "warm_connect", "warm_command",
            "sdk_total", "sdk_run", "sdk_exec",
        )
    }  # fmt: skip

    async def connect_and_echo(url: str) -> tuple[float, float]:
        t0 = perf()
        ws = await ws_connect(url)
        t1 = perf()
        try:
            result = await ws_run(ws, "echo hi", "ttfc")
            if result.get("output") != "hi\n":
                raise BenchError(f"unexpected output {result!r}")
            return t1 - t0, perf() - t1
        finally:
            await ws.close()

    def gateway_sample(gw: Gateway, kind: str, record: bool) -> None:
        t0 = perf()
        sandbox_id = gw.create()
        t1 = perf()
        connect, command = runner.run(connect_and_echo(gw.ws_base + sandbox_id))
        total = perf() - t0
        gw.delete(sandbox_id)  # not timed
        if record:
            samples[f"{kind}_total"].append(total)
            samples[f"{kind}_create"].append(t1 - t0)
            samples[f"{kind}_connect"].append(connect)
            samples[f"{kind}_command"].append(command)

    def sdk_sample(record: bool) -> None:
        t0 = perf()
        container = ctx.run_baseline()
        t1 = perf()
        try:
            result = container.exec_run("echo hi")
            t2 = perf()
            if result.exit_code != 0 or result.output != b"hi\n":
                raise BenchError(f"exec_run: {result!r}")
        finally:
            ctx.remove_container(container)  # not timed
        if record:
            samples["sdk_total"].append(t2 - t0)
            samples["sdk_run"].append(t1 - t0)
            samples["sdk_exec"].append(t2 - t1)

    try:
        # One untimed round first (connection pools, page cache), then interleaved samples.
        # Before every sample the warm gateway's pool is full, so no refill runs alongside.
        for i in range(cfg.ttfc_samples + 1):
            record = i > 0
            if record and (i == 1 or i % 5 == 0 or i == cfg.ttfc_samples):
                say(f"  ttfc: sample {i}/{cfg.ttfc_samples}")
            wait_pool_full(warm)
            gateway_sample(cold, "cold", record)
            wait_pool_full(warm)
            sdk_sample(record)
            if warm is not None:
                wait_pool_full(warm)
                gateway_sample(warm, "warm", record)
    finally:
        runner.close()
        ctx.stop_gateway(cold)
        if warm is not None:
            ctx.stop_gateway(warm)

    stats = {k: summarize(v, 1000.0) for k, v in samples.items()}
    result: dict[str, Any] = {
        "unit": "ms",
        "stats": stats,
        "cold_pool_option": bool(cold_args),
        "warm": "measured" if warm is not None else "skipped: --pool-size not supported",
        "ratio_cold": ratio(med(stats["cold_total"]), med(stats["sdk_total"])),
        "ratio_warm": ratio(med(stats["warm_total"]), med(stats["sdk_total"])) if warm else None,
    }
    rows: list[list[str]] = []
    for kind in ("cold", "warm"):
        if kind == "warm" and warm is None:
            rows.append(["warm: skipped (--pool-size not supported)", *[""] * 7])
            continue
        pairs = [
            ("total", "total", "sdk_total"),
            ("  POST /sandboxes | containers.run", "create", "sdk_run"),
            ("  WebSocket connect | -", "connect", None),
            ("  first echo hi | exec_run", "command", "sdk_exec"),
        ]
        for label, key, base in pairs:
            g = stats[f"{kind}_{key}"]
            b = stats[base] if base else {"n": 0}
            rows.append(
                [
                    f"{kind}: {label}",
                    *lat_cells(g),
                    *(lat_cells(b) if base else ["", "", ""]),
                    fmt_ratio(ratio(med(g), med(b))) if base else "",
                ]
            )
    say(
        table(
            "ttfc: time to first command (gateway POST+connect+echo vs SDK run+exec_run)",
            ["", *("gw " + h for h in LAT_HEADERS), *("SDK " + h for h in LAT_HEADERS), "ratio"],
            rows,
        )
    )
    say(
        "  note: gateway sandboxes are hardened (read-only root, tmpfs, caps dropped, limits), "
        "publish the agent port and POST waits for the agent; the SDK baseline is a plain run."
    )
    if warm is None:
        say("  warm: skipped: --pool-size not supported")
    return result


# =============================================================================================
# 2. rtt: command round trip on an open WebSocket vs docker exec
# =============================================================================================


def bench_rtt(ctx: RunContext, cfg: Config) -> dict[str, Any]:
    gw = ctx.start_gateway("rtt")
    container = None
    commands = {"true": ["true"], "echo hello": ["echo", "hello"]}
    expected = {"true": "", "echo hello": "hello\n"}
    gw_samples: dict[str, list[float]] = {c: [] for c in commands}
    sdk_samples: dict[str, list[float]] = {c: [] for c in commands}
    cli_samples: dict[str, list[float]] = {c: [] for c in commands}
    try:
        sandbox_id = gw.create()
        container = ctx.run_baseline()

        async def gateway_side() -> None:
            ws = await ws_connect(gw.ws_base + sandbox_id)
            try:
                for i in range(20):  # warm-up
                    await ws_run(ws, "true", f"w{i}")
                for command in commands:
                    for i in range(cfg.rtt_samples):
                        t0 = perf()
                        result = await ws_run(ws, command, f"r{i}")
                        gw_samples[command].append(perf() - t0)
                        if result.get("output") != expected[command]:
                            raise BenchError(f"unexpected result {result!r}")
            finally:
                await ws.close()

        say(f"  rtt: gateway, {cfg.rtt_samples} x 2 commands")
        asyncio.run(gateway_side())

        say(f"  rtt: SDK exec_run, {cfg.rtt_baseline_samples} x 2 commands")
        for _ in range(3):
            container.exec_run("true")
        for command, argv in commands.items():
            for _ in range(cfg.rtt_baseline_samples):
                t0 = perf()
                executed = container.exec_run(argv)
                sdk_samples[command].append(perf() - t0)
                if executed.exit_code != 0 or executed.output.decode() != expected[command]:
                    raise BenchError(f"exec_run {argv}: {executed!r}")

        say(f"  rtt: CLI docker exec, {cfg.rtt_baseline_samples} x 2 commands")
        for _ in range(2):
            subprocess.run(["docker", "exec", container.id, "true"], check=True, timeout=60)
        for command, argv in commands.items():
            for _ in range(cfg.rtt_baseline_samples):
                t0 = perf()
                done = subprocess.run(
                    ["docker", "exec", container.id, *argv], capture_output=True, timeout=60
                )
                cli_samples[command].append(perf() - t0)
                if done.returncode != 0 or done.stdout.decode() != expected[command]:
                    raise BenchError(f"docker exec {argv}: {done!r}")
    finally:
        ctx.stop_gateway(gw)
        if container is not None:
            ctx.remove_container(container)

    result: dict[str, Any] = {"unit": "ms", "commands": {}}
    rows = []
    for command in commands:
        g = summarize(gw_samples[command], 1000.0)
        s = summarize(sdk_samples[command], 1000.0)
        c = summarize(cli_samples[command], 1000.0)
        result["commands"][command] = {
            "gateway": g,
            "sdk_exec_run": s,
            "cli_docker_exec": c,
            "ratio_sdk": ratio(med(g), med(s)),
            "ratio_cli": ratio(med(g), med(c)),
        }
        rows.append(
            [
                command,
                *lat_cells(g),
                *lat_cells(s),
                fmt_ratio(ratio(med(g), med(s))),
                *lat_cells(c),
                fmt_ratio(ratio(med(g), med(c))),
            ]
        )
    say(
        table(
            "rtt: sequential command round trip (open WebSocket vs docker exec)",
            [
                "command",
                *("gw " + h for h in LAT_HEADERS),
                *("SDK " + h for h in LAT_HEADERS),
                "ratio",
                *("CLI " + h for h in LAT_HEADERS),
                "ratio",
            ],
            rows,
        )
    )
    return result


# =============================================================================================
# 3. throughput: N clients over N sandboxes vs N threads of exec_run over N containers
# =============================================================================================


async def gateway_load(
    sockets: Sequence[Any], duration: float, warmup: float, gateway_pid: int
) -> dict[str, Any]:
    """Each socket: one ``echo x`` in flight at a time, for warmup + duration seconds."""
    start = perf()
    warm_until = start + warmup
    deadline = warm_until + duration
    latencies: list[float] = []
    completed = [0]

    async def client(index: int, ws: Any) -> None:
        n = 0
        while True:
            t0 = perf()
            if t0 >= deadline:
                return
            request_id = f"t{index}-{n}"
            n += 1
            await ws.send(f'{{"command": "echo x", "request_id": "{request_id}"}}')
            message = json.loads(await asyncio.wait_for(ws.recv(), 60))
            t1 = perf()
            if (
                message.get("request_id") != request_id
                or message.get("returncode") != 0
                or message.get("output") != "x\n"
            ):
                raise BenchError(f"unexpected result {str(message)[:300]}")
            if t0 >= warm_until:
                latencies.append(t1 - t0)
            if warm_until <= t1 <= deadline:
                completed[0] += 1

    async def measure() -> dict[str, float]:
        await asyncio.sleep(max(0.0, warm_until - perf()))
        window = CpuWindow(gateway_pid)
        await asyncio.sleep(max(0.0, deadline - perf()))
        return window.stop()

    tasks = [client(i, ws) for i, ws in enumerate(sockets)]
    cpu, *_ = await asyncio.gather(measure(), *tasks)
    return {
        "commands_per_s": completed[0] / duration,
        "completed": completed[0],
        "latency_ms": summarize(latencies, 1000.0, keep=False),
        "cpu": cpu,
    }


def sdk_load(containers: Sequence[Any], duration: float, warmup: float) -> dict[str, Any]:
    """One thread per container, each running ``exec_run("echo x")`` back to back."""
    start = perf()
    warm_until = start + warmup
    deadline = warm_until + duration
    latencies: list[float] = []
    completed = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def worker(container: Any) -> None:
        while not errors:
            t0 = perf()
            if t0 >= deadline:
                return
            try:
                result = container.exec_run(["echo", "x"])
            except Exception as e:
                errors.append(repr(e))
                return
            t1 = perf()
            if result.exit_code != 0 or result.output != b"x\n":
                errors.append(f"exec_run: {result!r}")
                return
            with lock:
                if t0 >= warm_until:
                    latencies.append(t1 - t0)
                if warm_until <= t1 <= deadline:
                    completed[0] += 1

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in containers]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, warm_until - perf()))
    window = CpuWindow(None)
    time.sleep(max(0.0, deadline - perf()))
    cpu = window.stop()
    for thread in threads:
        thread.join(max(1.0, deadline + 120 - perf()))
    if errors:
        raise BenchError(f"SDK load failed: {errors[0]}")
    if any(t.is_alive() for t in threads):
        raise BenchError("SDK load threads did not finish")
    return {
        "commands_per_s": completed[0] / duration,
        "completed": completed[0],
        "latency_ms": summarize(latencies, 1000.0, keep=False),
        "cpu": cpu,
    }


def bench_throughput(ctx: RunContext, cfg: Config) -> dict[str, Any]:
    levels = sorted(set(cfg.clients))
    most = max(levels)
    warmup = min(1.0, 0.2 * cfg.duration)
    gw = ctx.start_gateway("throughput")
    sdk_client = docker.from_env(timeout=120, max_pool_size=most + 4)
    containers: list[Any] = []
    levels_out: dict[str, Any] = {}
    try:
        say(f"  throughput: creating {most} sandboxes and {most} baseline containers")
        t_setup = perf()
        # Set-up, not measured: a few at a time.
        with ThreadPoolExecutor(max_workers=4) as pool:
            sandbox_ids = list(pool.map(lambda _: gw.create(), range(most)))
            for container in pool.map(lambda _: ctx.run_baseline(sdk_client), range(most)):
                containers.append(container)
            list(pool.map(lambda c: c.exec_run("true"), containers))  # warm-up
        say(f"  throughput: set up in {perf() - t_setup:.1f} s")

        with asyncio.Runner() as runner:

            async def connect_all() -> list[Any]:
                sockets = [await ws_connect(gw.ws_base + sid) for sid in sandbox_ids]
                for i, ws in enumerate(sockets):
                    await ws_run(ws, "true", f"warm{i}")
                return sockets

            async def close_all(sockets: list[Any]) -> None:
                await asyncio.gather(*(ws.close() for ws in sockets))

            sockets = runner.run(connect_all())
            try:
                for n in levels:
                    say(f"  throughput: {n} client(s), {warmup:g} s warm-up + {cfg.duration:g} s")
                    g = runner.run(gateway_load(sockets[:n], cfg.duration, warmup, gw.pid))
                    s = sdk_load(containers[:n], cfg.duration, warmup)
                    levels_out[str(n)] = {
                        "gateway": g,
                        "sdk_exec_run": s,
                        "ratio": ratio(g["commands_per_s"], s["commands_per_s"]),
                    }
            finally:
                runner.run(close_all(sockets))
    finally:
        t_cleanup = perf()
        ctx.stop_gateway(gw)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(ctx.remove_container, containers))
        sdk_client.close()
        say(f"  throughput: cleaned up in {perf() - t_cleanup:.1f} s")

    rows: list[list[str]] = []
    for clients, level in levels_out.items():
        g, s = level["gateway"], level["sdk_exec_run"]
        rows.append(
            [
                clients,
                fmt(g["commands_per_s"]),
                ms(g["latency_ms"], "median"),
                ms(g["latency_ms"], "p99"),
                fmt(g["cpu"]["gateway_cpu_pct"]),
                fmt(g["cpu"]["client_cpu_pct"]),
                fmt(g["cpu"]["system_busy_pct"]),
                fmt(s["commands_per_s"]),
                ms(s["latency_ms"], "median"),
                ms(s["latency_ms"], "p99"),
                fmt(s["cpu"]["engine_cpu_pct"]),
                fmt(s["cpu"]["client_cpu_pct"]),
                fmt(s["cpu"]["system_busy_pct"]),
                fmt_ratio(level["ratio"]),
            ]
        )
    say(
        table(
            f"throughput: N clients x `echo x`, one in flight each, {cfg.duration:g} s per level",
            [
                "clients",
                "gw cmd/s",
                "p50 ms",
                "p99 ms",
                "gw cpu%",
                "client%",
                "host%",
                "SDK cmd/s",
                "p50 ms",
                "p99 ms",
                "engine%",
                "client%",
                "host%",
                "ratio",
            ],
            rows,
        )
    )
    say(
        "  cpu% = % of one core (gw: gateway process; client: this load generator; engine: "
        "dockerd+containerd+shims+docker-proxy); host% = whole machine busy (all cores).\n"
        f"  The load generator is one asyncio process (websockets) on the same "
        f"{os.cpu_count()}-core machine: it competes with the gateway, so gateway figures "
        "are a lower bound. SDK side: one thread per container, exec_run back to back."
    )
    return {"duration_s": cfg.duration, "warmup_s": warmup, "levels": levels_out}


# =============================================================================================
# 4. stream: streamed output through the WebSocket vs docker exec stdout
# =============================================================================================


def base64_size(nbytes: int) -> int:
    """Bytes ``base64`` (coreutils, 76 columns, final newline) writes for ``nbytes`` input."""
    encoded = 4 * math.ceil(nbytes / 3)
    return encoded + math.ceil(encoded / 76)


def bench_stream(ctx: RunContext, cfg: Config) -> dict[str, Any]:
    nbytes = cfg.stream_bytes
    command = f"head -c {nbytes} /dev/zero | base64"
    expected = base64_size(nbytes)
    gw = ctx.start_gateway("stream")
    container = None
    gw_rates: list[float] = []
    cli_rates: list[float] = []
    gw_cpu: list[dict[str, float]] = []
    cli_cpu: list[dict[str, float]] = []
    rss_samples: list[int] = []
    try:
        sandbox_id = gw.create()
        container = ctx.run_baseline()

        async def stream_once(ws: Any, request_id: str) -> int:
            await ws.send(
                json.dumps({"command": command, "request_id": request_id, "stream": True})
            )
            total = 0
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 120))
                if message.get("type") == "output":
                    if message.get("stream") == "stdout":
                        total += len(message["data"])
                    continue
                if message.get("request_id") != request_id or message.get("returncode") != 0:
                    raise BenchError(f"stream result: {str(message)[:300]}")
                return total

        with asyncio.Runner() as runner:
            ws = runner.run(ws_connect(gw.ws_base + sandbox_id))
            try:
                runner.run(ws_run(ws, "true", "warm"))
                time.sleep(cfg.settle_seconds)
                rss_before = rss_kib(gw.pid)
                for rep in range(cfg.stream_reps):
                    say(f"  stream: {nbytes / MIB:g} MiB, repetition {rep + 1}/{cfg.stream_reps}")
                    with RssSampler(gw.pid, 0.1) as sampler:
                        window = CpuWindow(gw.pid)
                        t0 = perf()
                        total = runner.run(stream_once(ws, f"s{rep}"))
                        elapsed = perf() - t0
                        gw_cpu.append(window.stop())
                    rss_samples.extend(sampler.samples)
                    if total != expected:
                        raise BenchError(f"gateway delivered {total} bytes, expected {expected}")
                    gw_rates.append(total / MIB / elapsed)

                    window = CpuWindow(None)
                    t0 = perf()
                    process = subprocess.Popen(
                        ["docker", "exec", container.id, "sh", "-c", command],
                        stdout=subprocess.PIPE,
                    )
                    assert process.stdout is not None
                    got = 0
                    fd = process.stdout.fileno()
                    while chunk := os.read(fd, 1 << 20):
                        got += len(chunk)
                    if process.wait(60) != 0:
                        raise BenchError(f"docker exec exited {process.returncode}")
                    elapsed = perf() - t0
                    cli_cpu.append(window.stop())
                    if got != expected:
                        raise BenchError(f"docker exec gave {got} bytes, expected {expected}")
                    cli_rates.append(got / MIB / elapsed)
                time.sleep(cfg.settle_seconds)
                rss_after = rss_kib(gw.pid)
            finally:
                runner.run(ws.close())
    finally:
        ctx.stop_gateway(gw)
        if container is not None:
            ctx.remove_container(container)

    peak = max([rss_before, *rss_samples])
    growth_mib = (peak - rss_before) / 1024
    g = summarize(gw_rates)
    c = summarize(cli_rates)
    result: dict[str, Any] = {
        "bytes_in": nbytes,
        "bytes_out": expected,
        "unit": "MiB/s of base64 text",
        "gateway": g,
        "docker_exec": c,
        "ratio": ratio(med(g), med(c)),
        "gateway_cpu": gw_cpu,
        "docker_exec_cpu": cli_cpu,
        "gateway_rss_mib": {
            "before": rss_before / 1024,
            "peak": peak / 1024,
            "after": rss_after / 1024,
            "growth": growth_mib,
            "samples": len(rss_samples),
            "flat": growth_mib <= FLAT_RSS_MIB,
        },
    }

    def cpu_cell(windows: list[dict[str, float]], key: str) -> str:
        return fmt(sorted(w.get(key, math.nan) for w in windows)[len(windows) // 2])

    say(
        table(
            f"stream: {nbytes / MIB:g} MiB through base64 ({expected / MIB:.1f} MiB of text), "
            "MiB/s delivered to the reader",
            ["", "median MiB/s", "worst MiB/s", "n", "gw cpu%", "engine%", "client%", "host%"],
            [
                [
                    "gateway WebSocket (stream: true)",
                    fmt(g["median"]),
                    fmt(g["min"]),
                    str(g["n"]),
                    cpu_cell(gw_cpu, "gateway_cpu_pct"),
                    cpu_cell(gw_cpu, "engine_cpu_pct"),
                    cpu_cell(gw_cpu, "client_cpu_pct"),
                    cpu_cell(gw_cpu, "system_busy_pct"),
                ],
                [
                    "docker exec stdout",
                    fmt(c["median"]),
                    fmt(c["min"]),
                    str(c["n"]),
                    "-",
                    cpu_cell(cli_cpu, "engine_cpu_pct"),
                    cpu_cell(cli_cpu, "client_cpu_pct"),
                    cpu_cell(cli_cpu, "system_busy_pct"),
                ],
                ["ratio gateway/docker exec", fmt_ratio(result["ratio"]), "", "", "", "", "", ""],
            ],
        )
    )
    say(
        f"  gateway RSS: {rss_before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB during "
        f"({len(rss_samples)} samples every 100 ms), {rss_after / 1024:.1f} MiB after; growth "
        f"{growth_mib:.1f} MiB ({'flat' if growth_mib <= FLAT_RSS_MIB else 'NOT flat'}, "
        f"flat = growth <= {FLAT_RSS_MIB:g} MiB)"
    )
    return result


# =============================================================================================
# 5. scale: many sandboxes, one client each, resources at rest
# =============================================================================================


def buckets(count: int) -> list[tuple[int, int]]:
    edges = [(1, 10), (11, 50), (51, 100)]
    out = [(lo, min(hi, count)) for lo, hi in edges if lo <= count]
    if count > 100:
        out.append((101, count))
    return out


def bench_scale(ctx: RunContext, cfg: Config) -> dict[str, Any]:
    count = cfg.scale_count
    gw = ctx.start_gateway("scale")
    create_lat: list[float] = []
    delete_lat: list[float] = []
    sdk_before: list[float] = []
    sdk_after: list[float] = []
    sandbox_ids: list[str] = []

    def sdk_create_samples(into: list[float]) -> None:
        for _ in range(cfg.scale_sdk_samples):
            t0 = perf()
            container = ctx.run_baseline()
            into.append(perf() - t0)
            ctx.remove_container(container)

    try:
        time.sleep(cfg.settle_seconds)
        idle_window = CpuWindow(gw.pid)
        time.sleep(cfg.rest_seconds)
        idle_cpu = idle_window.stop()
        rss_idle = rss_kib(gw.pid)

        say(f"  scale: SDK containers.run x {cfg.scale_sdk_samples} with no sandboxes")
        sdk_create_samples(sdk_before)
        say(f"  scale: creating {count} sandboxes one after another")
        for i in range(count):
            t0 = perf()
            sandbox_ids.append(gw.create())
            create_lat.append(perf() - t0)
            if (i + 1) % 25 == 0:
                say(f"    {i + 1}/{count} (last {create_lat[-1] * 1000:.0f} ms)")
        rss_sandboxes = rss_kib(gw.pid)
        say(f"  scale: SDK containers.run x {cfg.scale_sdk_samples} with {count} sandboxes")
        sdk_create_samples(sdk_after)

        async def attached_phase() -> dict[str, Any]:
            t0 = perf()
            sockets = []
            for sid in sandbox_ids:
                sockets.append(await ws_connect(gw.ws_base + sid))
            connect_s = perf() - t0
            try:
                for i, ws in enumerate(sockets):
                    await ws_run(ws, "true", f"a{i}")
                await asyncio.sleep(cfg.settle_seconds)
                with RssSampler(gw.pid, 0.1) as sampler:
                    window = CpuWindow(gw.pid)
                    await asyncio.sleep(cfg.rest_seconds)
                    rest_cpu = window.stop()
                rss_rest = rss_kib(gw.pid)
                agents = await asyncio.to_thread(agent_memory, gw, sandbox_ids)
                return {
                    "connect_all_s": connect_s,
                    "rest_cpu": rest_cpu,
                    "rss_rest_kib": rss_rest,
                    "rss_rest_peak_kib": max([rss_rest, *sampler.samples]),
                    "agents": agents,
                }
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets))

        say(f"  scale: attaching {count} WebSocket clients, {cfg.rest_seconds:g} s at rest")
        attached = asyncio.run(attached_phase())

        say(f"  scale: deleting {count} sandboxes")
        for sid in sandbox_ids:
            t0 = perf()
            gw.delete(sid)
            delete_lat.append(perf() - t0)
        sandbox_ids.clear()
        time.sleep(cfg.settle_seconds)
        rss_deleted = rss_kib(gw.pid)
    finally:
        ctx.stop_gateway(gw)

    curve = []
    for lo, hi in buckets(count):
        curve.append({"range": f"{lo}-{hi}", **summarize(create_lat[lo - 1 : hi], 1000.0)})
    agents = attached["agents"]
    rest_cpu = attached["rest_cpu"]
    rss_rest_mib = attached["rss_rest_kib"] / 1024
    result = {
        "count": count,
        "create_ms": summarize(create_lat, 1000.0),
        "create_curve_ms": curve,
        "delete_ms": summarize(delete_lat, 1000.0),
        "sdk_run_ms_before": summarize(sdk_before, 1000.0),
        "sdk_run_ms_after": summarize(sdk_after, 1000.0),
        "connect_all_s": attached["connect_all_s"],
        "gateway_rss_mib": {
            "idle": rss_idle / 1024,
            "with_sandboxes": rss_sandboxes / 1024,
            "with_sandboxes_and_clients": rss_rest_mib,
            "peak_at_rest": attached["rss_rest_peak_kib"] / 1024,
            "after_delete": rss_deleted / 1024,
            "per_sandbox_kib": (attached["rss_rest_kib"] - rss_idle) / max(1, count),
        },
        "gateway_cpu_pct_idle": idle_cpu["gateway_cpu_pct"],
        "gateway_cpu_pct_at_rest": rest_cpu["gateway_cpu_pct"],
        "rest_cpu": rest_cpu,
        "agent_rss_mib": agents["agent"],
        "container_rss_mib": agents["container"],
        "container_rss_total_mib": agents["total_mib"],
    }
    rows = [
        [
            f"create #{c['range']}",
            *lat_cells(c),
            *(lat_cells(result["sdk_run_ms_before"]) if i == 0 else [""] * 3),
            *(lat_cells(result["sdk_run_ms_after"]) if i == len(curve) - 1 else [""] * 3),
        ]
        for i, c in enumerate(curve)
    ]
    rows.append(["delete (each)", *lat_cells(result["delete_ms"]), *[""] * 6])
    say(
        table(
            f"scale: {count} sandboxes created one after another (POST includes agent readiness)",
            [
                "",
                *LAT_HEADERS,
                "SDK run @0 ms",
                "p99",
                "n",
                f"SDK run @{count} ms",
                "p99",
                "n",
            ],
            rows,
        )
    )
    rss = result["gateway_rss_mib"]
    say(
        table(
            f"scale: resources at rest ({cfg.rest_seconds:g} s) with {count} sandboxes and "
            f"{count} WebSocket clients",
            ["", "gateway", "baseline (idle gateway, 0 sandboxes)", "ratio"],
            [
                [
                    "gateway RSS MiB",
                    fmt(rss_rest_mib),
                    fmt(rss["idle"]),
                    fmt_ratio(ratio(rss_rest_mib, rss["idle"])),
                ],
                ["gateway RSS per sandbox+client KiB", fmt(rss["per_sandbox_kib"]), "", ""],
                [
                    "gateway CPU % (of one core)",
                    fmt(rest_cpu["gateway_cpu_pct"]),
                    fmt(idle_cpu["gateway_cpu_pct"]),
                    "",
                ],
                [
                    "agent RSS MiB per sandbox (median / p99)",
                    f"{fmt(agents['agent'].get('median'))} / {fmt(agents['agent'].get('p99'))}",
                    "",
                    "",
                ],
                [
                    "agent+tini RSS MiB per sandbox (median)",
                    fmt(agents["container"].get("median")),
                    "",
                    "",
                ],
                ["all sandboxes: agent+tini RSS MiB", fmt(agents["total_mib"]), "", ""],
                ["connect all clients s", fmt(attached["connect_all_s"]), "", ""],
                ["gateway RSS MiB after deleting all", fmt(rss["after_delete"]), "", ""],
            ],
        )
    )
    return result


def agent_memory(gw: Gateway, sandbox_ids: Sequence[str]) -> dict[str, Any]:
    """Host RSS of each sandbox's agent and tini (host PIDs from ``docker top``)."""
    agent_mib: list[float] = []
    container_mib: list[float] = []
    for sid in sandbox_ids:
        agent, tini = container_pids(gw.container(sid))
        if agent is None:
            raise BenchError(f"no agent process found in sandbox {sid}")
        a = rss_kib(agent) / 1024
        t = rss_kib(tini) / 1024 if tini else 0.0
        agent_mib.append(a)
        container_mib.append(a + t)
    return {
        "agent": summarize(agent_mib, keep=False),
        "container": summarize(container_mib, keep=False),
        "total_mib": sum(container_mib),
    }


# =============================================================================================
# 6. hop: per-hop overhead, through the gateway vs straight to the agent's published port
# =============================================================================================


def bench_hop(ctx: RunContext, cfg: Config) -> dict[str, Any]:
    gw = ctx.start_gateway("hop")
    via: list[float] = []
    direct: list[float] = []
    try:
        sandbox_id = gw.create()
        agent_url, headers = gw.agent_endpoint(sandbox_id)

        async def measure() -> None:
            ws_gw = await ws_connect(gw.ws_base + sandbox_id)
            ws_agent = await ws_connect(agent_url, headers)
            try:
                for i in range(20):
                    await ws_run(ws_gw, "echo hi", f"wg{i}")
                    await ws_run(ws_agent, "echo hi", f"wa{i}")
                for i in range(cfg.hop_samples):
                    # Alternate which side goes first, so drift hits both alike.
                    order = [(ws_gw, via), (ws_agent, direct)]
                    for ws, into in order if i % 2 == 0 else order[::-1]:
                        t0 = perf()
                        result = await ws_run(ws, "echo hi", f"h{i}")
                        into.append(perf() - t0)
                        if result.get("output") != "hi\n":
                            raise BenchError(f"unexpected result {result!r}")
            finally:
                await ws_gw.close()
                await ws_agent.close()

        say(f"  hop: {cfg.hop_samples} x echo hi through the gateway and straight to the agent")
        asyncio.run(measure())
    finally:
        ctx.stop_gateway(gw)

    g = summarize(via, 1000.0)
    d = summarize(direct, 1000.0)
    overhead_us = (g["median"] - d["median"]) * 1000.0
    result = {
        "unit": "ms",
        "gateway": g,
        "direct_agent": d,
        "ratio": ratio(med(g), med(d)),
        "overhead_us_median": overhead_us,
        "overhead_us_p99": (g["p99"] - d["p99"]) * 1000.0,
    }
    say(
        table(
            "hop: WebSocket round trip of `echo hi`, same sandbox: via gateway vs direct to agent",
            ["", *("gw " + h for h in LAT_HEADERS), *("agent " + h for h in LAT_HEADERS), "ratio"],
            [
                ["echo hi", *lat_cells(g), *lat_cells(d), fmt_ratio(result["ratio"])],
            ],
        )
    )
    say(
        f"  gateway overhead per round trip: {overhead_us:.0f} us at the median, "
        f"{result['overhead_us_p99']:.0f} us between the p99s (both legs via 127.0.0.1)"
    )
    return result


# =============================================================================================
# summary, main
# =============================================================================================


def summary_rows(results: dict[str, Any], cfg: Config) -> list[dict[str, Any]]:
    """One row per headline figure: gateway, baseline, ratio, target, met."""
    rows: list[dict[str, Any]] = []

    def add(
        name: str,
        gateway: Any,
        baseline: Any,
        ratio_value: float | None,
        target: str,
        met: bool | None,
        note: str = "",
    ) -> None:
        verdict = "n/a" if met is None else ("met" if met else "MISSED")
        if note:
            verdict = f"{verdict} ({note})"
        rows.append(
            {
                "figure": name,
                "gateway": gateway,
                "baseline": baseline,
                "ratio": ratio_value,
                "target": target,
                "met": met,
                "verdict": verdict,
            }
        )

    ttfc = results.get("ttfc")
    if isinstance(ttfc, dict) and "stats" in ttfc:
        st = ttfc["stats"]
        sdk = med(st["sdk_total"])
        if ttfc["ratio_warm"] is not None:
            r = ttfc["ratio_warm"]
            add("ttfc warm (ms)", med(st["warm_total"]), sdk, r, "<= 0.25x SDK", r <= 0.25)
        else:
            add("ttfc warm (ms)", None, sdk, None, "<= 0.25x SDK", None, "skipped")
        r = ttfc["ratio_cold"]
        add(
            "ttfc cold (ms)",
            med(st["cold_total"]),
            sdk,
            r,
            "<= 1.2x SDK",
            None if r is None else r <= 1.2,
        )
    rtt = results.get("rtt")
    if isinstance(rtt, dict) and "commands" in rtt:
        c = rtt["commands"]["echo hello"]
        r = c["ratio_sdk"]
        add(
            "rtt echo hello (ms)",
            med(c["gateway"]),
            med(c["sdk_exec_run"]),
            r,
            "<= 0.1x exec_run",
            None if r is None else r <= 0.1,
        )
    tp = results.get("throughput")
    if isinstance(tp, dict) and tp.get("levels"):
        levels = tp["levels"]
        key = "32" if "32" in levels else max(levels, key=int)
        level = levels[key]
        exact = key == "32"
        note = "" if exact else "target is @32"
        g, s = level["gateway"], level["sdk_exec_run"]
        r = level["ratio"]
        add(
            f"throughput@{key} (cmd/s)",
            g["commands_per_s"],
            s["commands_per_s"],
            r,
            ">= 5x SDK",
            (r is not None and r >= 5) if exact else None,
            note,
        )
        p99 = g["latency_ms"].get("p99")
        add(
            f"throughput@{key} p99 (ms)",
            p99,
            s["latency_ms"].get("p99"),
            ratio(p99, s["latency_ms"].get("p99")),
            "< 50 ms",
            (p99 is not None and p99 < 50) if exact else None,
            note,
        )
    stream = results.get("stream")
    if isinstance(stream, dict) and "gateway" in stream:
        r = stream["ratio"]
        rss = stream["gateway_rss_mib"]
        add(
            "stream (MiB/s)",
            med(stream["gateway"]),
            med(stream["docker_exec"]),
            r,
            ">= 0.5x docker exec, flat RSS",
            r is not None and r >= 0.5 and rss["flat"],
            f"RSS +{rss['growth']:.1f} MiB",
        )
    scale = results.get("scale")
    if isinstance(scale, dict) and "gateway_rss_mib" in scale:
        rss = scale["gateway_rss_mib"]
        n = scale["count"]
        value = rss["with_sandboxes_and_clients"]
        add(
            f"gateway RSS @{n} sandboxes+clients (MiB)",
            value,
            rss["idle"],
            ratio(value, rss["idle"]),
            "< 150 MiB @100",
            value < 150 if n >= 100 else None,
            "" if n >= 100 else f"only {n} sandboxes",
        )
    hop = results.get("hop")
    if isinstance(hop, dict) and "gateway" in hop:
        add(
            "hop echo hi (ms)",
            med(hop["gateway"]),
            med(hop["direct_agent"]),
            hop["ratio"],
            "- (info)",
            None,
            f"+{hop['overhead_us_median']:.0f} us",
        )
    agent = results.get("agent")
    if isinstance(agent, dict) and "images" in agent:
        new = agent["images"][agent["image"]]
        old = agent["images"].get(agent["baseline_image"] or "", {})
        old_rss = med(old["idle_rss_mib"]) if old else None
        old_start = med(old["start_ms"]) if old else None
        rss = med(new["idle_rss_mib"])
        add(
            "idle agent RSS (MiB)",
            rss,
            old_rss,
            ratio(rss, old_rss),
            "<= 16 MiB",
            None if rss is None else rss <= 16,
            "baseline: the previous image's agent",
        )
        start = med(new["start_ms"])
        add(
            "agent start: exec to handshake (ms)",
            start,
            old_start,
            ratio(start, old_start),
            "- (info)",
            None,
            "baseline: the previous image's agent",
        )
    burst = results.get("burst")
    if isinstance(burst, dict) and "ratio" in burst:
        r = burst["ratio"]
        n = burst["count"]
        all_ok = burst["succeeded"] == n
        add(
            f"burst: {n} cold creates at once (s)",
            burst["gateway_wall_s"],
            burst["sdk_wall_s"],
            r,
            "all succeed, <= 1.5x SDK",
            all_ok and r is not None and r <= 1.5 if n == 32 else None,
            f"{burst['succeeded']}/{n} succeeded",
        )
    return rows


def print_summary(rows: list[dict[str, Any]], errors: dict[str, str]) -> None:
    cells = [
        [
            row["figure"],
            fmt(row["gateway"]),
            fmt(row["baseline"]),
            fmt_ratio(row["ratio"]),
            row["target"],
            row["verdict"],
        ]
        for row in rows
    ]
    for name, error in errors.items():
        cells.append([name, "-", "-", "-", "-", f"ERROR: {error.splitlines()[0][:60]}"])
    say(table("summary", ["figure", "gateway", "baseline", "ratio", "target", "met?"], cells))


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(
        description="twistedgw benchmarks: gateway vs plain Docker, in the same run."
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sample counts (< 60 s)")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(BENCHMARKS)}")
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / "bench" / "results" / "latest.json",
        help="where to write the figures (default bench/results/latest.json)",
    )
    parser.add_argument("--ttfc-samples", type=int, help="ttfc samples per variant (20)")
    parser.add_argument("--rtt-samples", type=int, help="rtt gateway samples per command (200)")
    parser.add_argument("--rtt-baseline-samples", type=int, help="rtt SDK/CLI samples (50)")
    parser.add_argument("--clients", help="throughput client counts, e.g. 1,8 (1,8,32,64)")
    parser.add_argument("--duration", type=float, help="throughput seconds per level (10)")
    parser.add_argument("--stream-mib", type=float, help="stream input size in MiB (64)")
    parser.add_argument("--stream-reps", type=int, help="stream repetitions (3)")
    parser.add_argument("--scale-count", type=int, help="scale: number of sandboxes (100)")
    parser.add_argument("--rest-seconds", type=float, help="scale: seconds at rest (5)")
    parser.add_argument("--hop-samples", type=int, help="hop samples per side (200)")
    parser.add_argument("--agent-samples", type=int, help="agent start/RSS samples per image (10)")
    parser.add_argument("--burst-count", type=int, help="burst: cold creates at once (32)")
    args = parser.parse_args(argv)

    cfg = Config.smoke_config() if args.smoke else Config()
    overrides: dict[str, Callable[[Any], None]] = {
        "ttfc_samples": lambda v: setattr(cfg, "ttfc_samples", v),
        "rtt_samples": lambda v: setattr(cfg, "rtt_samples", v),
        "rtt_baseline_samples": lambda v: setattr(cfg, "rtt_baseline_samples", v),
        "duration": lambda v: setattr(cfg, "duration", v),
        "stream_mib": lambda v: setattr(cfg, "stream_bytes", int(v * MIB)),
        "stream_reps": lambda v: setattr(cfg, "stream_reps", v),
        "scale_count": lambda v: setattr(cfg, "scale_count", v),
        "rest_seconds": lambda v: setattr(cfg, "rest_seconds", v),
        "hop_samples": lambda v: setattr(cfg, "hop_samples", v),
        "agent_samples": lambda v: setattr(cfg, "agent_samples", v),
        "burst_count": lambda v: setattr(cfg, "burst_count", v),
    }
    for name, apply in overrides.items():
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                parser.error(f"--{name.replace('_', '-')} must be greater than 0")
            apply(value)
    if args.clients:
        try:
            cfg.clients = [int(x) for x in args.clients.split(",") if x.strip()]
        except ValueError:
            parser.error("--clients takes comma-separated integers")
        if not cfg.clients or min(cfg.clients) <= 0:
            parser.error("--clients needs positive integers")
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choose from {','.join(BENCHMARKS)}")
        args.selected = [n for n in BENCHMARKS if n in names]
    else:
        args.selected = list(BENCHMARKS)
    return args, cfg


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    # Ctrl-C and SIGTERM unwind through the cleanup (also when SIGINT came in ignored, as it
    # does for background jobs of a non-interactive shell).
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.time()
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    interrupted = False
    contexts: list[RunContext] = []
    info: dict[str, Any] = {}
    try:
        ctx = RunContext()
        contexts.append(ctx)
        try:
            ctx.docker.ping()
            ctx.docker.images.get(IMAGE)
        except Exception as e:
            raise BenchError(
                f"needs a running Docker engine and the image {IMAGE!r} "
                f"(sandbox-image/build.sh): {e}"
            ) from e
        info = machine_info(ctx.docker)
        say(describe_machine(info))
        say(
            f"run     : {'smoke' if cfg.smoke else 'full'} run {ctx.run_id}, benchmarks "
            f"{','.join(args.selected)}; gateway instances bench-{ctx.run_id}-*"
        )
        wants_pool = {"ttfc", "burst"} & set(args.selected)
        pool_supported = "--pool-size" in gateway_help() if wants_pool else False
        if "ttfc" in args.selected and not pool_supported:
            say("note    : twistd sandboxgw has no --pool-size: warm ttfc will be skipped")
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "ttfc": lambda: bench_ttfc(ctx, cfg, pool_supported),
            "rtt": lambda: bench_rtt(ctx, cfg),
            "throughput": lambda: bench_throughput(ctx, cfg),
            "stream": lambda: bench_stream(ctx, cfg),
            "scale": lambda: bench_scale(ctx, cfg),
            "hop": lambda: bench_hop(ctx, cfg),
            "agent": lambda: bench_agent(ctx, cfg.agent_samples),
            "burst": lambda: bench_burst(ctx, cfg.burst_count, pool_supported),
        }
        for name in args.selected:
            say()
            say(f"-- {name}")
            t0 = perf()
            try:
                results[name] = runners[name]()
                results[name]["elapsed_s"] = perf() - t0
            except BenchError as e:
                errors[name] = str(e)
                say(f"ERROR in {name}: {e}")
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
                say(f"ERROR in {name}:\n{traceback.format_exc()}")
                for gateway in ctx.gateways:
                    if gateway.instance.startswith(f"bench-{ctx.run_id}-{name}"):
                        say(f"  last lines of the {gateway.instance} log:\n{gateway.tail(15)}")
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted: cleaning up")
    except BenchError as e:
        errors["setup"] = str(e)
        say(f"ERROR: {e}")
    finally:
        for context in contexts:
            context.cleanup()

    rows = summary_rows(results, cfg)
    say()
    print_summary(rows, errors)
    document = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": time.time() - started,
        "smoke": cfg.smoke,
        "interrupted": interrupted,
        "config": asdict(cfg),
        "machine": info,
        "benchmarks": results,
        "summary": rows,
        "errors": errors,
    }
    try:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_finite(document), indent=2, allow_nan=False, default=_json_default)
        args.json.write_text(text + "\n")
        say(f"\nfigures written to {args.json}  ({time.time() - started:.0f} s in all)")
    except (OSError, ValueError) as e:
        say(f"ERROR: could not write {args.json}: {e}")
        return 1
    if interrupted:
        return 130
    return 1 if errors else 0


def _json_default(value: Any) -> Any:
    return str(value)


def _finite(value: Any) -> Any:
    """The document with NaN and infinities replaced by null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
