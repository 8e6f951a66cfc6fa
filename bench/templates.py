"""Templates benchmark (issue 18): how long ``POST /sandboxes {"template": NAME}`` takes when
the template's warm pool has a container ready (the hand-out), against a cold create of the
same template.

    python bench/templates.py [--samples N] [--template NAME]

It starts two gateways of its own on 127.0.0.1 (one with ``--pool-size NAME=1``, one with no
pool), waits before every pooled sample until the pool is full again (so no refill runs
alongside the timed request), deletes each sandbox untimed, and prints median, p90 and max in
ms. ``SANDBOX_IMAGE`` and ``TEMPLATE_IMAGE_PREFIX`` name the images, as for the tests.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import docker
import requests

from twistedgw.runtime.labels import LABEL_INSTANCE
from twistedgw.testing.process import GatewayProcess, template_image

RESULTS = Path(__file__).resolve().parent / "results" / "templates.json"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def pool_ready(gateway: GatewayProcess, template: str) -> int:
    pool = requests.get(gateway.url + "/healthz", timeout=10).json()["pool"]
    return int(pool["templates"].get(template, {}).get("ready", 0))


def wait_pool(gateway: GatewayProcess, template: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while pool_ready(gateway, template) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {template} pool did not fill within {timeout} s")
        time.sleep(0.05)


def timed_create(gateway: GatewayProcess, template: str) -> float:
    started = time.perf_counter()
    answer = requests.post(gateway.url + "/sandboxes", json={"template": template}, timeout=120)
    took = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"POST /sandboxes: {answer.status_code} {answer.text[:200]}")
    requests.delete(f"{gateway.url}/sandboxes/{answer.json()['sandbox_id']}", timeout=120)
    return took * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--template", default="python")
    args = parser.parse_args(argv)
    name = args.template
    declare = ("--template", f"{name}={template_image(name)}")
    tag = secrets.token_hex(3)
    pooled = GatewayProcess(f"bench-tpl-pool-{tag}", *declare, "--pool-size", f"{name}=1")
    cold = GatewayProcess(f"bench-tpl-cold-{tag}", *declare)
    samples: dict[str, list[float]] = {"pool": [], "cold": []}
    try:
        pooled.start()
        cold.start()
        for i in range(args.samples + 1):  # the first round is untimed (warm-up)
            wait_pool(pooled, name)
            time.sleep(0.2)  # the refill's container start settles
            hand_out = timed_create(pooled, name)
            cold_ms = timed_create(cold, name)
            if i:
                samples["pool"].append(hand_out)
                samples["cold"].append(cold_ms)
    finally:
        client = docker.from_env()
        for gateway in (pooled, cold):
            gateway.stop()
            for container in client.containers.list(
                all=True, filters={"label": f"{LABEL_INSTANCE}={gateway.instance}"}
            ):
                container.remove(force=True)
    summary: dict[str, Any] = {"template": name, "samples": args.samples}
    for kind, values in samples.items():
        summary[kind] = {
            "median_ms": round(percentile(values, 0.5), 1),
            "p90_ms": round(percentile(values, 0.9), 1),
            "max_ms": round(max(values), 1),
        }
        print(
            f"{name} {kind:4s} POST /sandboxes: median {summary[kind]['median_ms']} ms, "
            f"p90 {summary[kind]['p90_ms']} ms, max {summary[kind]['max_ms']} ms "
            f"(n={len(values)})"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
