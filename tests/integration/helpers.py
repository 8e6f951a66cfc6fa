"""Small helpers for integration tests: WebSocket command calls and memory readings."""

from __future__ import annotations

import json
import time
from typing import Any


def send(ws: Any, message: dict[str, Any]) -> None:
    ws.send(json.dumps(message))


def recv(ws: Any, timeout: float = 30.0) -> dict[str, Any]:
    return dict(json.loads(ws.recv(timeout=timeout)))


def run(ws: Any, command: str, **fields: Any) -> dict[str, Any]:
    """Send one command (with any extra message fields, ``timeout`` included) and return its
    final result, skipping output chunks."""
    send(ws, {"command": command, **fields})
    wait = 30.0 + float(fields.get("timeout") or 0)
    while True:
        message = recv(ws, wait)
        if message.get("type") != "output":
            return message


def rss_kib(pid: int) -> int:
    """Resident set size of a host process, in KiB (from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def agent_pid(container: Any) -> int:
    """Host PID of the agent process in a sandbox container (docker top shows host PIDs)."""
    top = container.top(ps_args="-o pid,args")
    for pid, args in top["Processes"]:
        runs_agent = "agent.py" in args or args.endswith("-m agent")
        if runs_agent and "tini" not in args and "supervise" not in args:
            return int(pid)
    raise RuntimeError(f"agent not found in {top}")


def container_processes(container: Any) -> list[str]:
    """Command lines of every process in a container."""
    return [args for _, args in container.top(ps_args="-o pid,args")["Processes"]]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached in time")
