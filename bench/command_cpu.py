"""CPU time per command through the gateway, inside the sandbox (a load-insensitive figure).

Starts a gateway (image from SANDBOX_IMAGE), creates one sandbox, runs ``--count`` commands
(``true``) one after the other over its WebSocket, and reads the sandbox container's CPU
counter (cgroup v1 ``cpuacct.usage``, or v2 ``cpu.stat``, on the host) before and after: what
the agent and the command together cost per command, whatever else the machine is doing. Run it
once per image, alternating images:

    for i in 1 2 3; do for img in sandbox-websocket-image twistedgw-spawner-dev; do
        SANDBOX_IMAGE=$img PYTHONPATH=$PWD .venv/bin/python bench/command_cpu.py --count 1000
    done; done
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import IMAGE, RunContext, ws_connect, ws_run


def container_cpu_ns(container_id: str) -> int:
    """The container's CPU time so far, in ns, from its cgroup on the host."""
    for path in (
        f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage",
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat",
        f"/sys/fs/cgroup/docker/{container_id}/cpu.stat",
    ):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith("cpuacct.usage"):
            return int(text)
        for line in text.splitlines():
            name, value = line.split()
            if name == "usage_usec":
                return int(value) * 1000
    raise RuntimeError(f"no cgroup CPU counter for {container_id}")


def measure(count: int, command: str) -> dict[str, Any]:
    ctx = RunContext()
    try:
        gw = ctx.start_gateway("command-cpu")
        sandbox_id = gw.create()
        container_id = gw.container(sandbox_id).id

        async def run() -> dict[str, Any]:
            ws = await ws_connect(gw.ws_base + sandbox_id)
            try:
                for i in range(50):  # warm-up (the spawner starts on the first command)
                    await ws_run(ws, command, f"w{i}")
                cpu0, wall0 = container_cpu_ns(container_id), time.monotonic()
                for i in range(count):
                    await ws_run(ws, command, f"r{i}")
                cpu1, wall1 = container_cpu_ns(container_id), time.monotonic()
            finally:
                await ws.close()
            return {
                "image": IMAGE,
                "command": command,
                "commands": count,
                "container_cpu_ms_per_command": round((cpu1 - cpu0) / count / 1e6, 3),
                "wall_ms_per_command": round((wall1 - wall0) / count * 1e3, 3),
            }

        return asyncio.run(run())
    finally:
        for gateway in list(ctx.gateways):
            ctx.stop_gateway(gateway)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--command", default="true")
    args = parser.parse_args()
    print(json.dumps(measure(args.count, args.command)))


if __name__ == "__main__":
    main()
