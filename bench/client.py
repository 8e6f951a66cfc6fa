"""The client library's overhead (issue 19): a command's round trip through
``twistedgw.client`` (sync and asyncio) beside a raw WebSocket client on the same sandbox.

    python bench/client.py [--runs 200]

Starts its own gateway (``twistedgw.testing.process``), creates one sandbox, and times
``--runs`` sequential ``true`` commands each way (median and p90, in ms); also the time of a
``Sandbox.create`` + first command + delete through the client. Everything it creates is
removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import docker
from websockets.sync.client import connect

from twistedgw.client import AsyncSandbox, Sandbox
from twistedgw.runtime.labels import LABEL_INSTANCE
from twistedgw.testing.process import GatewayProcess


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(len(ordered) * 0.9) - 1]
    return f"median {statistics.median(ordered) * 1000:.2f} ms, p90 {p90 * 1000:.2f} ms"


def raw(url: str, sandbox_id: str, runs: int) -> list[float]:
    times = []
    with connect(f"{url.replace('http', 'ws', 1)}/ws/{sandbox_id}") as ws:
        for _ in range(runs):
            start = time.perf_counter()
            ws.send(json.dumps({"command": "true"}))
            json.loads(ws.recv())
            times.append(time.perf_counter() - start)
    return times


def sync_client(url: str, sandbox_id: str, runs: int) -> list[float]:
    times = []
    sb = Sandbox.connect(sandbox_id, url)
    try:
        for _ in range(runs):
            start = time.perf_counter()
            sb.run("true")
            times.append(time.perf_counter() - start)
    finally:
        sb.close()
    return times


def async_client(url: str, sandbox_id: str, runs: int) -> list[float]:
    async def main() -> list[float]:
        times = []
        sb = await AsyncSandbox.connect(sandbox_id, url)
        try:
            for _ in range(runs):
                start = time.perf_counter()
                await sb.run("true")
                times.append(time.perf_counter() - start)
        finally:
            await sb.close()
        return times

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    gateway = GatewayProcess(f"bench-client-{secrets.token_hex(4)}")
    gateway.start()
    try:
        sb = Sandbox.create(url=gateway.url, delete_on_exit=True)
        with sb:
            for name, run in (
                ("raw websocket", raw),
                ("sync client", sync_client),
                ("async client", async_client),
            ):
                run(gateway.url, sb.sandbox_id, 10)  # warm up
                samples = run(gateway.url, sb.sandbox_id, args.runs)
                print(f"{name:14} `true` x{args.runs}: {summary(samples)}")
        cycles = []
        for _ in range(5):
            start = time.perf_counter()
            with Sandbox.create(url=gateway.url) as other:
                other.run("true")
            cycles.append(time.perf_counter() - start)
        print(f"create + run + delete through the client x5: {summary(cycles)}")
    finally:
        gateway.stop()
        client = docker.from_env()
        for container in client.containers.list(
            all=True, filters={"label": f"{LABEL_INSTANCE}={gateway.instance}"}
        ):
            container.remove(force=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
