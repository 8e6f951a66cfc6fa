"""CPU time per started user process, by how the agent starts it (a load-insensitive figure).

Runs the agent's own ``agent.spawn.start_process`` inside a container of the sandbox image,
as the image runs the agent (uid ``agent`` with SETUID, SETGID and KILL only, no-new-privileges),
and reads the container's cgroup CPU counter before and after N processes of each mode:

* ``direct``  - posix_spawn as the agent's own uid (how processes started before issue 12);
* ``runas``   - posix_spawn of the image's runas wrapper, which execs the command as ``sandbox``;
* ``spawner`` - the persistent spawner (agent/spawner.py, spawner.c), as ``sandbox``.

Each process is ``bash -c true`` with the environment the agent gives commands, and its pipes
are read to the end and the process reaped, as the agent does. The modes are alternated in
rounds; the figure is the cgroup's CPU time (every process in the container: the harness, the
spawner and the commands) divided by the number of processes, so other load on the machine
does not enter it (only the wall time does).

    .venv/bin/python bench/spawn_cpu.py --image twistedgw-spawner-dev --count 400 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CGROUP_USAGE = "/sys/fs/cgroup/cpuacct/cpuacct.usage"  # v1, in ns
CGROUP_STAT = "/sys/fs/cgroup/cpu.stat"  # v2: usage_usec
MODES = ("direct", "runas", "spawner")
ENV = {
    "HOME": "/home/sandbox",
    "USER": "sandbox",
    "LOGNAME": "sandbox",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SHELL": "/bin/bash",
}


def cgroup_cpu_ns() -> int:
    try:
        with open(CGROUP_USAGE) as f:
            return int(f.read())
    except OSError:
        with open(CGROUP_STAT) as f:
            for line in f:
                name, value = line.split()
                if name == "usage_usec":
                    return int(value) * 1000
    raise RuntimeError("no cgroup CPU counter")


def inside(count: int, rounds: int, modes: list[str]) -> dict[str, Any]:
    """The measurement, in the container (as uid agent with its capabilities)."""
    from agent import spawn
    from agent.spawner import Spawner

    identity, _ = spawn.user_identity({"AGENT_SPAWNER": "off"})
    assert identity.prefix, "run as the image's agent user (another uid than sandbox)"
    users = {
        "direct": spawn.UserIdentity(
            oom_score_adj=identity.oom_score_adj,
            agent_oom_score_adj=identity.agent_oom_score_adj,
        ),
        "runas": identity,
        "spawner": spawn.UserIdentity(
            identity.prefix,
            identity.oom_score_adj,
            identity.agent_oom_score_adj,
            identity.uid,
            identity.gid,
            Spawner(
                identity.prefix,
                oom_score_adj=(identity.oom_score_adj or 0, identity.agent_oom_score_adj),
            ),
        ),
    }
    argv = ["/bin/bash", "-c", "true"]

    def one(user: spawn.UserIdentity) -> None:
        started = spawn.start_process(argv, ENV, "/home/sandbox", user=user)
        os.close(started.stdin)
        for fd in (started.stdout, started.stderr):
            os.set_blocking(fd, True)
            while os.read(fd, 65536):
                pass
            os.close(fd)
        os.waitpid(started.pid, 0)

    for mode in modes:  # warm-up (starts the spawner)
        for _ in range(20):
            one(users[mode])
    totals = {m: {"cpu_ns": 0, "wall_s": 0.0, "n": 0} for m in modes}
    for _ in range(rounds):
        for mode in modes:
            cpu0, wall0 = cgroup_cpu_ns(), time.monotonic()
            for _ in range(count):
                one(users[mode])
            totals[mode]["cpu_ns"] += cgroup_cpu_ns() - cpu0
            totals[mode]["wall_s"] += time.monotonic() - wall0
            totals[mode]["n"] += count
    return {
        m: {
            "cpu_ms_per_process": round(t["cpu_ns"] / t["n"] / 1e6, 3),
            "wall_ms_per_process": round(t["wall_s"] / t["n"] * 1e3, 3),
            "processes": t["n"],
        }
        for m, t in totals.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--image", default=os.environ.get("SANDBOX_IMAGE", "sandbox-websocket-image")
    )
    parser.add_argument("--count", type=int, default=400, help="processes per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.inside:
        print(json.dumps(inside(args.count, args.rounds, modes)))
        return
    script = Path(__file__).resolve()
    caps = "-all,+setuid,+setgid,+kill"
    command = [
        "docker", "run", "--rm", "--cap-drop", "ALL",
        "--cap-add", "SETUID", "--cap-add", "SETGID", "--cap-add", "KILL",
        "--security-opt", "no-new-privileges",
        "-v", f"{script}:/spawn_cpu.py:ro",
        "--entrypoint", "/usr/bin/setpriv", args.image,
        "--reuid=999", "--regid=999", "--clear-groups",
        f"--inh-caps={caps}", f"--ambient-caps={caps}", "--",
        "python3", "/spawn_cpu.py", "--inside",
        "--count", str(args.count), "--rounds", str(args.rounds), "--modes", ",".join(modes),
    ]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["image"] = args.image
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
