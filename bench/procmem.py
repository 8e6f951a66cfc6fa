"""Memory of a background process that writes without end (issue 14).

    PYTHONPATH=$PWD SANDBOX_IMAGE=IMG .venv/bin/python bench/procmem.py [--seconds 60]

Starts a gateway (its own instance, loopback port, temporary state), creates a sandbox, reads
the RSS of the gateway and of the sandbox's agent, then runs ``yes`` in the background for
``--seconds`` and samples both every 5 s. Halfway through, a second client attaches to the
process with ``since=0`` and reads nothing more (a stalled watcher: the agent must not buffer
for it, the gateway must not either). Then ``yes`` is killed with ``signal``, the watcher
closed, and the figures are printed: baseline, peak and end RSS of both, and the process log's
``bytes``/``dropped`` from ``processes``. Everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import docker
from websockets.sync.client import connect

from twistedgw.runtime.labels import LABEL_INSTANCE, LABEL_SANDBOX_ID
from twistedgw.testing.process import GatewayProcess


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def agent_pid(container: Any) -> int:
    for pid, args in container.top(ps_args="-o pid,args")["Processes"]:
        if args.endswith("-m agent") and "supervise" not in args and "tini" not in args:
            return int(pid)
    raise RuntimeError("agent not found")


def ask(ws: Any, message: dict[str, Any]) -> dict[str, Any]:
    ws.send(json.dumps(message))
    while True:
        reply = json.loads(ws.recv(timeout=30))
        if reply.get("type") != "output":
            return dict(reply)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    client = docker.from_env()
    gateway = GatewayProcess(f"procmem-{secrets.token_hex(4)}")
    gateway.start()
    stalled: Any = None
    try:
        import requests

        sandbox_id = requests.post(gateway.url + "/sandboxes", timeout=120).json()["sandbox_id"]
        (container,) = client.containers.list(
            filters={
                "label": [
                    f"{LABEL_INSTANCE}={gateway.instance}",
                    f"{LABEL_SANDBOX_ID}={sandbox_id}",
                ]
            }
        )
        agent = agent_pid(container)
        url = f"{gateway.ws_url}/ws/{sandbox_id}"
        with connect(url) as ws:
            ask(ws, {"command": "true"})  # a first command, so both have warmed up
            time.sleep(1)
            base = {"gateway": rss_kib(gateway.pid), "agent": rss_kib(agent)}
            started = ask(ws, {"command": "yes", "background": True, "timeout": 3600})
            pid = started["pid"]
            samples = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                time.sleep(5)
                if stalled is None and time.monotonic() - t0 >= args.seconds / 2:
                    stalled = connect(url, max_size=None).__enter__()
                    stalled.send(json.dumps({"type": "attach", "pid": pid, "since": 0}))
                    # ...and never reads again.
                samples.append((round(time.monotonic() - t0), rss_kib(gateway.pid), rss_kib(agent)))
                t, gw_kib, agent_kib = samples[-1]
                print(f"t={t:3d}s gateway {gw_kib:6d} KiB agent {agent_kib:6d} KiB", flush=True)
            listing = ask(ws, {"type": "processes"})
            entry = next(p for p in listing["processes"] if p["pid"] == pid)
            ask(ws, {"type": "signal", "pid": pid, "signal": "KILL"})
        print(
            json.dumps(
                {
                    "seconds": args.seconds,
                    "baseline_kib": base,
                    "peak_kib": {
                        "gateway": max(s[1] for s in samples),
                        "agent": max(s[2] for s in samples),
                    },
                    "end_kib": {"gateway": samples[-1][1], "agent": samples[-1][2]},
                    "log_bytes": entry["bytes"],
                    "log_dropped": entry["dropped"],
                },
                indent=1,
            )
        )
        return 0
    finally:
        if stalled is not None:
            try:
                stalled.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            stalled.socket.close()
        gateway.stop()
        for container in client.containers.list(
            all=True, filters={"label": f"{LABEL_INSTANCE}={gateway.instance}"}
        ):
            container.remove(force=True)


if __name__ == "__main__":
    sys.exit(main())
