"""CPU time the agent spends per seed command: a figure that a loaded machine moves far less
than wall-clock throughput (issue 14's seed-path check).

    .venv/bin/python bench/agentcpu.py [--tree DIR ...] [--commands 2000] [--rounds 3]

For each source tree (default: this checkout), starts its agent on this host (its own
``sandbox-image/agent`` and ``twistedgw/protocol.py``, a Unix socket, as the black-box tests
do), sends ``--commands`` seed commands (``{"command": "echo x"}``) one at a time over one
WebSocket, and reads the agent's CPU time (/proc/PID/schedstat) before and after. Trees are
alternated ``--rounds`` times. Prints microseconds of agent CPU per command and wall time per
command, per round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from websockets.sync.client import unix_connect


def cpu_seconds(pid: int) -> float:
    """Time the process has run on a CPU (/proc/PID/schedstat, nanoseconds)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def measure(tree: Path, commands: int) -> tuple[float, float]:
    workdir = tempfile.mkdtemp(prefix="agentcpu-")
    sock = os.path.join(workdir, "agent.sock")
    secret = uuid.uuid4().hex
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": f"{tree}:{tree / 'sandbox-image'}",
        "AGENT_UNIX_SOCKET": sock,
        "SANDBOX_AGENT_SECRET": secret,
        "AGENT_LOG_LEVEL": "warn",
    }
    proc = subprocess.Popen([sys.executable, "-m", "agent"], env=env, cwd=workdir)
    try:
        deadline = time.monotonic() + 20
        while True:  # the socket file appears before the agent listens on it
            try:
                ws = unix_connect(
                    sock,
                    "ws://localhost/agent",
                    additional_headers={"Authorization": f"Bearer {secret}"},
                )
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with ws:
            for _ in range(50):  # warm-up
                ws.send(json.dumps({"command": "echo x"}))
                ws.recv(timeout=30)
            cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
            for _ in range(commands):
                ws.send(json.dumps({"command": "echo x"}))
                reply = json.loads(ws.recv(timeout=30))
                assert reply["output"] == "x\n", reply
            cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
        return (cpu1 - cpu0) / commands * 1e6, (wall1 - wall0) / commands * 1e3
    finally:
        proc.terminate()
        proc.wait(10)
        subprocess.run(["rm", "-rf", workdir], check=False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", action="append", type=Path)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = args.tree or [Path(__file__).resolve().parents[1]]
    for round_no in range(1, args.rounds + 1):
        for tree in trees:
            cpu_us, wall_ms = measure(tree, args.commands)
            print(
                f"round {round_no} {tree}: agent CPU {cpu_us:7.1f} us/command, "
                f"wall {wall_ms:6.2f} ms/command",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
