"""``HostAgentRuntime``: a ``FakeRuntime`` whose sandboxes are REAL agent processes on the host.

Each ``create`` starts ``python -m agent`` (this interpreter, the repository's
``sandbox-image/agent``) listening on a Unix socket in a private temp directory, with the
sandbox's agent secret and command environment, as ``DockerRuntime`` does for a
``network: none`` container; the ``ContainerInfo`` carries that socket (``agent_socket``), so
the gateway dials it like a network-less sandbox's. The manager waits for the agent to be
ready as for any container.

The agent runs as the test's user, not as the image's ``sandbox`` user, and sees the host's
file system: what a test does through it must stay inside the sandbox's ``home`` (its
``HOME`` and the files routes' home directory; relative file paths resolve there) or another
temp directory. Commands start in the agent user's home directory unless given ``cwd``.

``remove`` stops the agent by its pid (SIGTERM, then SIGKILL), then any process it started
that outlived it (also by pid, found from the agent's pid before it stopped), and removes
the temp directory; ``stop_all`` does that for every agent still running. Nothing else is
ever signalled. An agent is also sent SIGTERM by the kernel if the process that started it
dies first (a test run killed at a timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred

from twistedgw.runtime.interface import ContainerInfo, ContainerSpec
from twistedgw.testing.fakes import FakeRuntime

#: The repository this module is part of (it holds ``sandbox-image/agent``).
REPO = Path(__file__).resolve().parents[2]
AGENT_PATH = REPO / "sandbox-image"


class HostAgent:
    """One agent process: its ``Popen``, temp directory, socket and home directory."""

    def __init__(self, spec: ContainerSpec, agent_env: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="twistedgw-hostagent-"))
        self.home = self.dir / "home"
        self.home.mkdir()
        self.socket = str(self.dir / "agent.sock")
        command_env = {"HOME": str(self.home), **dict(spec.settings.env)}
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "PYTHONPATH": f"{REPO}:{AGENT_PATH}",
            "PYTHONDONTWRITEBYTECODE": "1",
            "AGENT_UNIX_SOCKET": self.socket,
            "SANDBOX_AGENT_SECRET": spec.agent_secret,
            "SANDBOX_COMMAND_ENV": json.dumps(command_env),
            **agent_env,
        }
        self.log_path = self.dir / "agent.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent"],
                env=env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_terminate_with_parent,
            )
        self.pid = self.proc.pid

    def stop(self, grace: float = 5.0) -> None:
        """Stop the agent (by pid), then what it started and left running, and remove the
        temp directory."""
        leftovers = _descendants(self.pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid, started in leftovers:
            # Only the very process seen under the agent (same start time: not a reused pid).
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def _terminate_with_parent() -> None:
    """In the agent's child before exec: SIGTERM it when the process that started it dies
    (``PR_SET_PDEATHSIG``), so a test process killed mid-test (a timeout, a mutation run)
    leaves no agent behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _descendants(root: int) -> list[tuple[int, str]]:
    """Every process below ``root`` (pid, start time), from ``/proc``."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        started[int(entry)] = fields[19]
    found: list[tuple[int, str]] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append((pid, started[pid]))
        todo.extend(children.get(pid, []))
    return found


class HostAgentRuntime(FakeRuntime):
    """A ``FakeRuntime`` whose every container is a real agent process on the host, reached
    over a Unix socket (see the module docstring). ``agents`` holds the running ones by
    container id; ``agent_env`` is added to each agent's environment (``AGENT_*``)."""

    def __init__(self, agent_env: dict[str, str] | None = None, instance: str = "hostgw") -> None:
        super().__init__(agent=None, agent_port=0, instance=instance)
        self.agent_env = dict(agent_env or {})
        self.agents: dict[str, HostAgent] = {}

    def _started(self, spec: ContainerSpec, info: ContainerInfo) -> ContainerInfo:
        """Start the sandbox's agent; its container is reached on the agent's socket."""
        agent = HostAgent(spec, self.agent_env)
        self.agents[info.container_id] = agent
        return attrs.evolve(
            info,
            ip_address="127.0.0.1",
            agent_host="127.0.0.1",
            agent_port=0,
            agent_socket=agent.socket,
        )

    def remove(self, container_id: str, sandbox_id: str = "") -> Deferred[None]:
        agent = self.agents.pop(container_id, None)
        if agent is not None:
            agent.stop()
        return super().remove(container_id, sandbox_id)

    def agent_for(self, sandbox_id: str) -> HostAgent:
        """The agent process of the sandbox ``sandbox_id``."""
        for container_id, info in self.containers.items():
            if info.sandbox_id == sandbox_id and container_id in self.agents:
                return self.agents[container_id]
        raise KeyError(sandbox_id)

    def stop_all(self) -> None:
        """Stop every agent this runtime started and still runs."""
        while self.agents:
            _, agent = self.agents.popitem()
            agent.stop()


def wait_for_exit(pid: int, timeout: float = 5.0) -> bool:
    """Whether the process ``pid`` is gone (or a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False
