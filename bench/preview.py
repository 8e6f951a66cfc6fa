"""Port preview benchmark (issue 16): a download through the preview proxy beside
``docker exec cat`` of the same file, in one run.

    python bench/preview.py [--size-mib 100] [--repeat 3] [--network bridge|none] [--json PATH]

Starts its own gateway on loopback, creates one sandbox, writes a ``--size-mib`` file of random
bytes in it and serves its directory with ``python3 -m http.server 8000`` (a background
process). Then, each ``--repeat`` times (the median is reported):

- the file through ``/sandboxes/{id}/ports/8000/big.bin`` (read 1 MiB at a time);
- ``docker exec <container> cat`` of the same file (to /dev/null);

and once more through the preview with a slow client (64 KiB reads, 10 ms apart), to show that
the gateway does not buffer what the client has not read. The gateway's RSS is sampled every
50 ms during the preview downloads.

Targets: preview throughput >= 0.5x ``docker exec cat``; the gateway's peak RSS grows by far
less than the file (a few MiB, not ~100). The machine's load is printed (it is shared).
Everything it creates (the gateway, its containers) is removed at the end.
"""

from __future__ import annotations

import json
import secrets
import statistics
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
from benchlib import RssSampler, rss_kib
from websockets.sync.client import connect

from twistedgw.testing.process import GatewayProcess

MIB = 1024 * 1024


def command(ws: Any, text: str, **fields: Any) -> dict[str, Any]:
    """Run a command over the sandbox WebSocket; its final message."""
    ws.send(json.dumps({"command": text, **fields}))
    while True:
        message = dict(json.loads(ws.recv(timeout=300)))
        if message.get("type") != "output":
            return message


def download(url: str, nbytes: int, slow: bool = False) -> float:
    """Seconds to read ``url``'s body (checked to be ``nbytes`` long)."""
    start = time.perf_counter()
    got = 0
    with requests.get(url, stream=True, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: {response.status_code} {response.text[:200]}")
        for chunk in response.iter_content(64 * 1024 if slow else MIB):
            got += len(chunk)
            if slow:
                time.sleep(0.01)
    if got != nbytes:
        raise RuntimeError(f"read {got} bytes of {nbytes}")
    return time.perf_counter() - start


def exec_cat(container: str, path: str, nbytes: int) -> float:
    start = time.perf_counter()
    out = subprocess.run(
        ["docker", "exec", container, "sh", "-c", f"cat {path} | wc -c"],
        check=True,
        capture_output=True,
        text=True,
    )
    if int(out.stdout.strip()) != nbytes:
        raise RuntimeError(f"docker exec cat read {out.stdout.strip()} bytes of {nbytes}")
    return time.perf_counter() - start


def exec_cat_out(container: str, path: str, nbytes: int) -> float:
    """``docker exec cat`` with the bytes coming out of the container (to this process)."""
    start = time.perf_counter()
    got = 0
    with subprocess.Popen(
        ["docker", "exec", container, "cat", path], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(MIB):
            got += len(chunk)
    if proc.returncode != 0 or got != nbytes:
        raise RuntimeError(f"docker exec cat: exit {proc.returncode}, {got} bytes of {nbytes}")
    return time.perf_counter() - start


def main() -> int:
    parser = benchlib.bench_arguments(__doc__)
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--network", choices=("bridge", "none"), default="bridge")
    options = parser.parse_args()

    client = docker.from_env(timeout=120)
    # Short: a network-less sandbox's agent socket path (state dir, instance, id) must fit
    # the 107 bytes of an AF_UNIX address.
    instance = f"bp-{secrets.token_hex(3)}"
    size = f"{options.size_mib + 256}m"
    gateway = GatewayProcess(
        instance,
        "--home-size",
        size,
        "--memory",
        f"{2 * options.size_mib + 512}m",
        "--agent-ready-timeout",
        "120",
    )
    nbytes = options.size_mib * MIB
    results: dict[str, Any] = {
        "mib": options.size_mib,
        "network": options.network,
        **benchlib.host_load_before(),
    }
    try:
        gateway.start()
        body = {"network": "none"} if options.network == "none" else None
        created = requests.post(gateway.url + "/sandboxes", json=body, timeout=120)
        assert created.status_code == 200, created.text
        sandbox_id = created.json()["sandbox_id"]
        container = f"twistedgw-{sandbox_id}"
        with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
            made = command(
                ws, f"head -c {nbytes} /dev/urandom > /home/sandbox/big.bin", timeout=300
            )
            assert made.get("returncode") == 0, made
            started = command(
                ws,
                "cd /home/sandbox && exec python3 -m http.server 8000",
                background=True,
                request_id="http",
            )
            assert started["type"] == "started", started
        base = f"{gateway.url}/sandboxes/{sandbox_id}/ports/8000/"
        deadline = time.monotonic() + 30
        while requests.get(base, timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("http.server did not come up")
            time.sleep(0.2)
        url = base + "big.bin"

        download(url, nbytes)  # warm-up (page cache, connections)
        rss_before = rss_kib(gateway.pid)
        with RssSampler(gateway.pid, 0.05) as sampler:
            preview = [download(url, nbytes) for _ in range(options.repeat)]
        fast_peak = max(sampler.samples)
        with RssSampler(gateway.pid, 0.05) as slow_sampler:
            slow = download(url, nbytes, slow=True)
        slow_peak = max(slow_sampler.samples)
        cat = [
            exec_cat_out(container, "/home/sandbox/big.bin", nbytes) for _ in range(options.repeat)
        ]
        cat_in = [exec_cat(container, "/home/sandbox/big.bin", nbytes) for _ in range(1)]
        results.update(
            preview_mib_s=options.size_mib / statistics.median(preview),
            docker_exec_cat_mib_s=options.size_mib / statistics.median(cat),
            in_container_cat_mib_s=options.size_mib / statistics.median(cat_in),
            slow_client_mib_s=options.size_mib / slow,
            preview_runs_s=preview,
            docker_exec_cat_runs_s=cat,
            gateway_rss_before_mib=rss_before / 1024,
            gateway_rss_peak_growth_mib=(fast_peak - rss_before) / 1024,
            gateway_rss_peak_growth_slow_mib=(slow_peak - rss_before) / 1024,
        )
    finally:
        benchlib.stop_instance(gateway, client)
    return benchlib.finish_run(results, report, options.json)


def report(r: dict[str, Any]) -> None:
    print(f"host {benchlib.host_load_line(r)}")
    ratio = r["preview_mib_s"] / r["docker_exec_cat_mib_s"]
    print(f"{r['mib']} MiB download (network {r['network']})   MiB/s")
    print(f"  preview proxy                    {r['preview_mib_s']:9.1f}")
    print(f"  docker exec cat (out to host)    {r['docker_exec_cat_mib_s']:9.1f}")
    print(f"  ratio (target >= 0.5)            {ratio:9.2f}")
    print(f"  (cat | wc -c inside, no transfer {r['in_container_cat_mib_s']:9.1f})")
    print(f"  slow client (64 KiB / 10 ms)     {r['slow_client_mib_s']:9.1f}")
    print(
        f"  gateway RSS {r['gateway_rss_before_mib']:.1f} MiB before; peak growth "
        f"{r['gateway_rss_peak_growth_mib']:.1f} MiB (fast client), "
        f"{r['gateway_rss_peak_growth_slow_mib']:.1f} MiB (slow client)"
    )


if __name__ == "__main__":
    sys.exit(main())
