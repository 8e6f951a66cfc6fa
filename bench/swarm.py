"""Swarm benchmark (issue 20): cold create and first command under ``--backend swarm`` beside
plain Docker, in one run.

    python bench/swarm.py [--samples N]

It starts the second, swarm-mode engine if it is not up (``scripts/ensure-swarm.sh``; it
is left running), then two gateways of its own on 127.0.0.1: one on the default engine, one
with ``--backend swarm`` on the swarm engine. Samples alternate between them. Each sample
times ``POST /sandboxes`` (create, start, agent ready), then a WebSocket connect and the
first ``echo`` (first command), and deletes the sandbox untimed. Prints median, p90 and max
in ms and writes ``bench/results/swarm.json``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from benchlib import host_busy_pct, percentile
from websockets.sync.client import connect

from twistedgw.testing.process import REPO, GatewayProcess

RESULTS = Path(__file__).resolve().parent / "results" / "swarm.json"
SWARM_URL = "unix:///run/twistedgw-swarm/docker.sock"


def sample(gateway: GatewayProcess) -> tuple[float, float]:
    """(create ms, connect + first command ms)."""
    started = time.perf_counter()
    answer = requests.post(gateway.url + "/sandboxes", timeout=120)
    created = time.perf_counter()
    if answer.status_code != 200:
        raise RuntimeError(f"POST /sandboxes: {answer.status_code} {answer.text[:200]}")
    sandbox_id = answer.json()["sandbox_id"]
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}") as ws:
        ws.send(json.dumps({"command": "echo hi"}))
        result = json.loads(ws.recv(timeout=60))
    done = time.perf_counter()
    if result.get("output") != "hi\n":
        raise RuntimeError(f"first command: {result}")
    requests.delete(f"{gateway.url}/sandboxes/{sandbox_id}", timeout=120)
    return (created - started) * 1000, (done - created) * 1000


def stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "max": max(values),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=15)
    args = parser.parse_args(argv)
    subprocess.run([str(REPO / "scripts" / "ensure-swarm.sh")], check=True, timeout=300)
    tag = secrets.token_hex(3)
    gateways = {
        "docker": GatewayProcess(f"bench-docker-{tag}"),
        "swarm": GatewayProcess(
            f"bench-swarm-{tag}", "--backend", "swarm", "--docker-url", SWARM_URL
        ),
    }
    samples: dict[str, dict[str, list[float]]] = {
        name: {"create": [], "first_command": [], "total": []} for name in gateways
    }
    busy = host_busy_pct()
    try:
        for gateway in gateways.values():
            gateway.start()
        for i in range(args.samples + 1):  # the first round is untimed (warm-up)
            for name, gateway in gateways.items():
                create_ms, first_ms = sample(gateway)
                if i:
                    samples[name]["create"].append(create_ms)
                    samples[name]["first_command"].append(first_ms)
                    samples[name]["total"].append(create_ms + first_ms)
    finally:
        for gateway in gateways.values():
            gateway.stop()
    summary: dict[str, Any] = {
        "samples": args.samples,
        "host_busy_pct_before": busy,
        "results": {
            name: {what: stats(values) for what, values in kinds.items()}
            for name, kinds in samples.items()
        },
    }
    print(f"{args.samples} samples each, host {busy:.0f}% busy before the run")
    print(f"{'backend':8} {'what':14} {'median':>8} {'p90':>8} {'max':>8}  (ms)")
    for name, kinds in summary["results"].items():
        for what, s in kinds.items():
            print(f"{name:8} {what:14} {s['median']:8.0f} {s['p90']:8.0f} {s['max']:8.0f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
