"""``HostAgentRuntime``'s own promise (``twistedgw/testing/hostagents.py``): the agent
processes it starts never outlive the test process that started them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from twistedgw.testing.hostagents import wait_for_exit

_STARTER = textwrap.dedent(
    """
    import os, sys
    from twistedgw.runtime.interface import ContainerSpec
    from twistedgw.sandbox import SandboxSettings
    from twistedgw.testing.hostagents import HostAgent

    spec = ContainerSpec("a" * 32, 1.0, "secret-0123456789", SandboxSettings(idle_timeout=60))
    agent = HostAgent(spec, {})
    print(agent.pid, agent.dir, flush=True)
    sys.stdin.read(1)
    os._exit(9)  # killed mid-test: no clean-up runs
    """
)


def test_an_agent_is_stopped_when_the_process_that_started_it_dies() -> None:
    """A test process that dies without cleaning up (``os._exit``, as at a timeout) takes its
    agent with it: the kernel sends the agent SIGTERM (``PR_SET_PDEATHSIG``)."""
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None and starter.stdin is not None
    pid_text, directory = starter.stdout.readline().split()
    pid = int(pid_text)
    try:
        assert not wait_for_exit(pid, timeout=0.3), "the agent should run while its parent does"
        starter.stdin.write("x")
        starter.stdin.close()
        assert starter.wait(10) == 9
        assert wait_for_exit(pid, timeout=10), "the agent outlived the process that started it"
    finally:
        if not wait_for_exit(pid, timeout=0):
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
        subprocess.run(["rm", "-rf", directory], check=False)
