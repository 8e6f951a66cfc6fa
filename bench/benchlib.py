"""Plumbing for the twistedgw benchmarks: gateway processes, baseline containers, /proc readings,
statistics, WebSocket helpers and table printing.

Everything here talks to 127.0.0.1 only (the gateway's port, and container ports published on
loopback) and to the local Docker engine through the docker SDK / CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

from twistedgw.runtime.hardening import AGENT_PORT
from twistedgw.runtime.labels import LABEL_INSTANCE, LABEL_SANDBOX_ID
from twistedgw.testing.process import (
    IMAGE,
    REPO,
    GatewayFailed,
    GatewayProcess,
    twistd_command,
)
from twistedgw.testing.process import gateway_env as harness_env

#: Label on every baseline container the benchmark creates (plus a per-run label below).
BENCH_LABEL = "org.twistedgw.bench"
BENCH_RUN_LABEL = "org.twistedgw.bench.run"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


class BenchError(Exception):
    """A benchmark could not produce its figures (not a missed target)."""


# -- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with few samples p99 is the maximum."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summarize(values: Sequence[float], scale: float = 1.0, keep: bool = True) -> dict[str, Any]:
    """Median, p50/p90/p99, mean, min, max and n of ``values`` (multiplied by ``scale``)."""
    scaled = [v * scale for v in values]
    if not scaled:
        return {"n": 0}
    out: dict[str, Any] = {
        "n": len(scaled),
        "median": statistics.median(scaled),
        "p90": percentile(scaled, 90),
        "p99": percentile(scaled, 99),
        "mean": statistics.fmean(scaled),
        "min": min(scaled),
        "max": max(scaled),
    }
    if keep:
        out["samples"] = [round(v, 6) for v in scaled]
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


# -- formatting -------------------------------------------------------------------------------


def fmt(value: Any, unit: str = "") -> str:
    """A number with about three significant digits (and an optional unit)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        v = float(value)
        a = abs(v)
        if a >= 100:
            text = f"{v:.0f}"
        elif a >= 10:
            text = f"{v:.1f}"
        elif a >= 1:
            text = f"{v:.2f}"
        else:
            text = f"{v:.3f}"
    return f"{text} {unit}".rstrip() if unit else text


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i]) for i in range(len(row))
        ]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(cells[0]))
    body = [line(cells[0]), rule, *(line(r) for r in cells[1:])]
    return "\n".join([f"== {title}", *body])


# -- /proc readings ---------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of a host process in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_seconds() -> float:
    """CPU time of this (load generator) process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat; idle, iowait and steal are not busy."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    total = sum(parts[:8])
    return float(total - parts[3] - parts[4] - parts[7]), float(total)


def host_busy_pct(seconds: float = 1.0) -> float:
    """How busy the whole machine is (all cores, 0-100) over ``seconds``."""
    busy0, total0 = system_cpu()
    time.sleep(seconds)
    busy1, total1 = system_cpu()
    return 100.0 * (busy1 - busy0) / max(1.0, total1 - total0)


#: Long-lived processes of the Docker engine (comm names; shims are cut to 15 characters).
ENGINE_COMMS = frozenset({"dockerd", "containerd", "containerd-shim", "docker-proxy"})


def find_pids(comms: frozenset[str]) -> list[int]:
    """PIDs of host processes whose comm is one of ``comms`` (read from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() in comms:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _cpu_of(pids: Iterable[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue
    return out


class CpuWindow:
    """CPU use over a time window: the gateway process, this process (the load generator), the
    Docker engine's long-lived processes, and the whole machine (100% = every core busy)."""

    def __init__(self, gateway_pid: int | None) -> None:
        self.gateway_pid = gateway_pid
        self.engine0 = _cpu_of(find_pids(ENGINE_COMMS))
        self.t0 = time.perf_counter()
        self.gw0 = cpu_seconds(gateway_pid) if gateway_pid else 0.0
        self.self0 = self_cpu_seconds()
        self.sys0 = system_cpu()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        busy1, total1 = system_cpu()
        self1 = self_cpu_seconds()
        gw1 = cpu_seconds(self.gateway_pid) if self.gateway_pid else 0.0
        engine1 = _cpu_of(self.engine0)
        busy0, total0 = self.sys0
        engine = sum(engine1[pid] - self.engine0[pid] for pid in engine1)
        out = {
            "wall_s": wall,
            "client_cpu_pct": 100.0 * (self1 - self.self0) / wall,
            "engine_cpu_pct": 100.0 * engine / wall,
            "system_busy_pct": 100.0 * (busy1 - busy0) / max(1.0, total1 - total0),
        }
        if self.gateway_pid:
            out["gateway_cpu_pct"] = 100.0 * (gw1 - self.gw0) / wall
        return out


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds on a thread of its own."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_kib(self.pid))
            except (OSError, BenchError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- small stand-alone benchmarks (bench/pty.py, preview.py, files.py) -------------------------


def bench_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a stand-alone benchmark: its docstring's first line as the
    description, and ``--json PATH`` for its figures."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--json", default=None)
    return parser


def host_load_before() -> dict[str, Any]:
    """How loaded the machine is as a run starts: load averages and 1 s of all-core busy %."""
    return {"load_before": os.getloadavg(), "busy_pct": host_busy_pct(1.0)}


def host_load_line(results: dict[str, Any]) -> str:
    """``load average before a/b/c, after d/e/f; busy N%`` from ``host_load_before`` and
    ``finish_run`` figures."""
    load_b = "/".join(f"{x:.2f}" for x in results["load_before"])
    load_a = "/".join(f"{x:.2f}" for x in results["load_after"])
    return f"load average before {load_b}, after {load_a}; busy {results['busy_pct']:.0f}%"


def stop_instance(gateway: GatewayProcess, client: Any) -> None:
    """Stop a benchmark's gateway (by PID), then force-remove the containers labelled with its
    instance; a failed removal is printed, not raised (the figures matter more)."""
    gateway.stop()
    mine = {"label": f"{LABEL_INSTANCE}={gateway.instance}"}
    try:
        for c in client.containers.list(all=True, filters=mine):
            c.remove(force=True)
    except Exception as e:  # the figures matter more than a tidy exit
        print(f"cleanup: {e} (remove containers labelled {mine['label']})", flush=True)


def finish_run(
    results: dict[str, Any], report: Callable[[dict[str, Any]], None], json_path: str | None
) -> int:
    """Record the load after the run, print the report, write the JSON if asked; exit code 0."""
    results["load_after"] = os.getloadavg()
    report(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return 0


# -- machine description ----------------------------------------------------------------------


def machine_info(client: Any) -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    try:
        docker_version = str(client.version().get("Version", "unknown"))
    except Exception as e:
        docker_version = f"unknown ({e})"

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    versions: dict[str, str] = {}
    for module in ("twisted", "autobahn", "websockets", "docker"):
        try:
            versions[module] = str(__import__(module).__version__)
        except Exception:
            versions[module] = "unknown"
    try:
        versions["twisted"] = __import__("twisted").version.short()
    except Exception:
        pass
    try:
        loadavg = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        loadavg = []
    return {
        "host_busy_pct_before": round(host_busy_pct(1.0), 1),
        "loadavg_before": loadavg,
        "cpu_model": cpu_model,
        "cores": os.cpu_count() or 0,
        "memory_gib": round(mem_kib / MIB, 1),
        "kernel": platform.release(),
        "docker_server": docker_version,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "git_commit": commit,
        "git_dirty": dirty,
        "image": IMAGE,
        "libraries": versions,
    }


def describe_machine(info: dict[str, Any]) -> str:
    busy = info["host_busy_pct_before"] > 10
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items())
    return "\n".join(
        [
            f"machine : {info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB, "
            f"kernel {info['kernel']}",
            f"docker  : server {info['docker_server']}, image {info['image']}",
            f"python  : {info['python']} ({info['python_executable']}); {libs}",
            f"commit  : {info['git_commit']}{' (dirty tree)' if info['git_dirty'] else ''}",
            f"load    : machine {info['host_busy_pct_before']:.0f}% busy (all cores) just "
            f"before the run, load average {' '.join(info['loadavg_before'])}"
            + ("  <- other work on this machine skews the figures" if busy else ""),
        ]
    )


# -- the run context: gateways, baseline containers, cleanup ----------------------------------


def gateway_env() -> dict[str, str]:
    env = harness_env()
    env.pop("TWISTEDGW_TOKENS", None)  # the benchmark gateways are open, on loopback only
    return env


def gateway_help() -> str:
    """``twistd sandboxgw --help`` of the code under test."""
    result = subprocess.run(
        [*twistd_command(), "sandboxgw", "--help"],
        cwd=REPO,
        env=gateway_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout + result.stderr


class Gateway(GatewayProcess):
    """One ``twistd --nodaemon sandboxgw`` child process on a free loopback port (the shared
    harness, ``twistedgw.testing.process``), named and cleaned up by a ``RunContext``."""

    poll_interval = 0.05

    def __init__(self, ctx: RunContext, name: str, args: Sequence[str]) -> None:
        super().__init__(
            f"bench-{ctx.run_id}-{name}",
            "--max-sandboxes",
            "400",
            *args,
            state_dir=ctx.tmpdir / f"state-{name}",
            log_path=ctx.tmpdir / f"gateway-{name}.log",
            env=gateway_env(),
        )
        self.ctx = ctx

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/"

    def start(self, timeout: float = 60.0, ready: bool = True) -> None:
        try:
            super().start(timeout, ready)
        except GatewayFailed as e:
            raise BenchError(str(e)) from None

    def tail(self, lines: int = 30) -> str:
        return super().tail(lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """SIGTERM (by PID), wait, SIGKILL if it will not go."""
        return super().stop(sig, timeout)

    # -- REST ---------------------------------------------------------------------------------

    def create(self, timeout: float = 120.0) -> str:
        response = requests.post(self.url + "/sandboxes", timeout=timeout)
        if response.status_code != 200:
            raise BenchError(f"POST /sandboxes: {response.status_code} {response.text[:300]}")
        sandbox_id = str(response.json()["sandbox_id"])
        self.ctx.note_sandbox(self, sandbox_id)
        return sandbox_id

    def delete(self, sandbox_id: str, timeout: float = 120.0) -> None:
        response = requests.delete(f"{self.url}/sandboxes/{sandbox_id}", timeout=timeout)
        self.ctx.forget_sandbox(self, sandbox_id)
        if response.status_code not in (200, 404):
            raise BenchError(f"DELETE: {response.status_code} {response.text[:300]}")

    def healthz(self) -> dict[str, Any]:
        return dict(requests.get(self.url + "/healthz", timeout=10).json())

    def container(self, sandbox_id: str) -> Any:
        found = self.ctx.docker.containers.list(
            all=True,
            filters={
                "label": [f"{LABEL_INSTANCE}={self.instance}", f"{LABEL_SANDBOX_ID}={sandbox_id}"]
            },
        )
        if not found:
            raise BenchError(f"no container for sandbox {sandbox_id}")
        return found[0]

    def agent_endpoint(self, sandbox_id: str) -> tuple[str, dict[str, str]]:
        """The agent's published loopback URL and its auth header (from ``docker inspect``)."""
        attrs = self.container(sandbox_id).attrs
        env = dict(e.split("=", 1) for e in attrs["Config"]["Env"] if "=" in e)
        binding = attrs["NetworkSettings"]["Ports"][f"{AGENT_PORT}/tcp"][0]
        host = binding.get("HostIp") or "127.0.0.1"
        if host != "127.0.0.1":
            raise BenchError(f"agent port published on {host}, not 127.0.0.1")
        url = f"ws://127.0.0.1:{binding['HostPort']}/agent"
        return url, {"Authorization": f"Bearer {env['SANDBOX_AGENT_SECRET']}"}


class RunContext:
    """Everything one benchmark run creates, so that it can all be removed at the end."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(3)
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"twistedgw-bench-{self.run_id}-"))
        self.docker = docker.from_env(timeout=120, max_pool_size=80)
        self.gateways: list[Gateway] = []
        self.sandboxes: dict[str, Gateway] = {}
        self._lock = threading.Lock()

    # -- gateways -----------------------------------------------------------------------------

    def start_gateway(self, name: str, *args: str) -> Gateway:
        gateway = Gateway(self, name, args)
        self.gateways.append(gateway)
        gateway.start()
        return gateway

    def stop_gateway(self, gateway: Gateway) -> None:
        """Stop it, then remove its containers (by its instance label)."""
        gateway.stop()
        self.remove_instance(gateway.instance)
        for sandbox_id, owner in list(self.sandboxes.items()):
            if owner is gateway:
                self.forget_sandbox(gateway, sandbox_id)

    def note_sandbox(self, gateway: Gateway, sandbox_id: str) -> None:
        with self._lock:
            self.sandboxes[sandbox_id] = gateway

    def forget_sandbox(self, gateway: Gateway, sandbox_id: str) -> None:
        with self._lock:
            self.sandboxes.pop(sandbox_id, None)

    def remove_instance(self, instance: str) -> int:
        """Remove the containers of one of our gateway instances (by its label only)."""
        return self._remove({"label": [f"{LABEL_INSTANCE}={instance}"]})

    # -- baseline containers ------------------------------------------------------------------

    def baseline_labels(self) -> dict[str, str]:
        return {BENCH_LABEL: "1", BENCH_RUN_LABEL: self.run_id}

    def run_baseline(self, client: Any = None) -> Any:
        """A plain detached container of the sandbox image, labelled as ours."""
        return (client or self.docker).containers.run(
            IMAGE,
            detach=True,
            auto_remove=False,
            labels=self.baseline_labels(),
            environment={"SANDBOX_AGENT_SECRET": "x"},
        )

    def remove_container(self, container: Any) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if "in progress" not in str(e):
                raise

    def remove_baselines(self) -> int:
        return self._remove({"label": [f"{BENCH_LABEL}=1", f"{BENCH_RUN_LABEL}={self.run_id}"]})

    def _remove(self, filters: dict[str, list[str]]) -> int:
        """Force-remove the containers matching ``filters`` (a few at a time)."""
        containers = self.docker.containers.list(all=True, filters=filters)

        def remove(container: Any) -> int:
            try:
                self.remove_container(container)
                return 1
            except Exception as e:
                print(f"warning: could not remove container {container.short_id}: {e}")
                return 0

        if not containers:
            return 0
        with ThreadPoolExecutor(max_workers=min(8, len(containers))) as pool:
            removed = sum(pool.map(remove, containers))
        # A removal already in progress (409) finishes on the engine's side: wait for it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = self.docker.containers.list(all=True, filters=filters)
            if not left:
                break
            for container in left:
                try:
                    self.remove_container(container)
                except Exception:
                    pass
            time.sleep(0.5)
        else:
            print(f"warning: containers matching {filters} are still there after 30 s")
        return removed

    # -- final cleanup ------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop every gateway we started, remove every container we created, drop temp files.
        Safe to call twice; never raises."""
        for gateway in self.gateways:
            try:
                gateway.stop()
            except Exception as e:
                print(f"warning: stopping gateway {gateway.instance}: {e}")
        for gateway in self.gateways:
            try:
                self.remove_instance(gateway.instance)
            except Exception as e:
                print(f"warning: removing containers of {gateway.instance}: {e}")
        try:
            self.remove_baselines()
        except Exception as e:
            print(f"warning: removing baseline containers: {e}")
        self.sandboxes.clear()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# -- container processes ----------------------------------------------------------------------


def container_pids(container: Any) -> tuple[int | None, int | None]:
    """Host PIDs of (agent, tini) in a sandbox container; ``docker top`` shows host PIDs."""
    agent = tini = None
    for pid, args in container.top(ps_args="-o pid,args")["Processes"]:
        if "tini" in args:
            tini = int(pid)
        elif "agent.py" in args or args.endswith("-m agent"):
            agent = int(pid)
    return agent, tini


# -- WebSocket helpers (asyncio client of the ``websockets`` library) -------------------------


async def ws_connect(url: str, headers: dict[str, str] | None = None) -> Any:
    from websockets.asyncio.client import connect

    return await connect(
        url,
        additional_headers=headers,
        compression=None,  # neither the gateway nor the agent negotiates it; don't offer
        max_size=256 * MIB,
        ping_interval=None,  # no client pings mid-measurement (the gateway pings us)
        open_timeout=60,
        close_timeout=5,
    )


async def ws_run(ws: Any, command: str, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Send one command and return its final message (skipping streamed output chunks)."""
    await ws.send(json.dumps({"command": command, "request_id": request_id}))
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if message.get("type") == "output":
            continue
        if message.get("request_id") != request_id:
            raise BenchError(f"unexpected message {str(message)[:300]}")
        if message.get("returncode") != 0:
            raise BenchError(f"command {command!r} failed: {str(message)[:300]}")
        return dict(message)
