"""Code in a sandbox cannot take its own sandbox down (issue 12), on the real engine and image.

The agent runs as its own user (`agent`), commands as `sandbox`: user code cannot signal,
ptrace or read the agent; it is the OOM killer's first choice; and an agent killed anyway (from
outside, as root) is brought back by the supervisor in the same container, files intact, while
the gateway tells its clients and serves the sandbox again.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess, remove_instance_containers
from tests.integration.helpers import agent_pid, recv, run, send

#: A command line that prints the in-container pid of the agent (its cmdline is readable by
#: anyone, as everywhere on Linux).
FIND_AGENT = (
    "for p in /proc/[0-9]*; do "
    "if [ \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" = 'python3 -u -m agent ' ]; then "
    'echo "${p#/proc/}"; fi; done'
)

#: Python that tries to SIGKILL every process it can see (libc's kill reports failures with
#: -1 instead of raising, so it goes through the whole list).
KILL_EVERYTHING = (
    "python3 -c 'import ctypes, os; libc = ctypes.CDLL(None); "
    '[libc.kill(int(p), 9) for p in os.listdir("/proc") '
    "if p.isdigit() and int(p) != os.getpid()]'"
)


@pytest.fixture(scope="module")
def gateway(docker_client: Any) -> Iterator[GatewayProcess]:
    """A gateway with a small memory limit, so that a memory hog reaches it quickly."""
    gw = GatewayProcess(f"it-{secrets.token_hex(4)}", "--memory", "256m", "--reap-interval", "1")
    gw.start()
    yield gw
    gw.stop()
    remove_instance_containers(docker_client, gw.instance)


@pytest.fixture
def sandbox(gateway: GatewayProcess) -> Iterator[str]:
    sandbox_id = gateway.create()
    yield sandbox_id
    gateway.delete(sandbox_id)


def container_of(docker_client: Any, sandbox_id: str) -> Any:
    return docker_client.containers.get(f"twistedgw-{sandbox_id}")


@pytest.mark.parametrize("command", ["kill -9 -1", KILL_EVERYTHING], ids=["kill-1", "python"])
def test_killing_everything_leaves_the_sandbox_standing(
    gateway: GatewayProcess, docker_client: Any, sandbox: str, command: str
) -> None:
    """A command that kills every process it may signal kills only the user's own processes:
    the client gets its command's result, the agent (same process) serves the next command on
    the same connection, the sandbox is still listed and the file written before is there."""
    container = container_of(docker_client, sandbox)
    agent_before = agent_pid(container)
    with connect(f"{gateway.ws_url}/ws/{sandbox}") as ws:
        assert run(ws, "echo precious > f && echo ok")["output"] == "ok\n"
        assert run(ws, "cd /tmp && X=1", session="s")["success"]
        send(ws, {"command": "sleep 60", "request_id": "bystander"})
        send(ws, {"command": command, "request_id": "killer", "timeout": 30})
        results = {}
        while len(results) < 2:
            message = recv(ws)
            results[message["request_id"]] = message
        assert results["killer"]["type"] == "result"
        assert (results["bystander"]["type"], results["bystander"]["returncode"]) == ("result", -9)
        assert run(ws, "cat f")["output"] == "precious\n"
        assert run(ws, "id -un")["output"] == "sandbox\n"
    assert agent_pid(container) == agent_before
    container.reload()
    assert container.attrs["State"]["Running"] is True
    assert gateway.get(f"/sandboxes/{sandbox}").status_code == 200
    details = gateway.get(f"/sandboxes/{sandbox}?details=true").json()
    assert details["agent_restarts"] == 0


def test_agent_is_out_of_reach_of_user_code(
    gateway: GatewayProcess, docker_client: Any, sandbox: str
) -> None:
    """User code cannot read the agent's (or PID 1's) environment, ptrace it or signal it,
    and the agent's secret and settings appear nowhere it can read."""
    attrs = container_of(docker_client, sandbox).attrs
    secret = dict(e.split("=", 1) for e in attrs["Config"]["Env"])["SANDBOX_AGENT_SECRET"]
    with connect(f"{gateway.ws_url}/ws/{sandbox}") as ws:
        pid = run(ws, FIND_AGENT)["output"].strip()
        assert pid.isdigit(), pid
        for target in (pid, "1"):
            denied = run(ws, f"cat /proc/{target}/environ")
            assert denied["returncode"] != 0
            assert "Permission denied" in denied["error"]
        ptrace = run(
            ws,
            "python3 -c 'import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
            f"r = libc.ptrace(16, {pid}, 0, 0); print(r, ctypes.get_errno())'",
        )
        assert ptrace["output"] == "-1 1\n"  # PTRACE_ATTACH: EPERM
        signal = run(ws, f"kill -KILL {pid}")
        assert signal["returncode"] != 0 and "not permitted" in signal["error"]
        everything = run(
            ws,
            "env; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n'",
        )
        assert secret not in everything["output"]
        assert "SANDBOX_AGENT_SECRET" not in everything["output"]
        assert "AGENT_" not in run(ws, "env")["output"]
        # The agent is still the same and still serves.
        assert run(ws, FIND_AGENT)["output"].strip() == pid


def test_session_listing_shows_the_cwd_of_shells_of_another_uid(
    gateway: GatewayProcess, sandbox: str
) -> None:
    """The agent (uid agent) still reads where a session's shell (uid sandbox) is."""
    with connect(f"{gateway.ws_url}/ws/{sandbox}") as ws:
        assert run(ws, "cd /tmp", session="where")["success"]
        send(ws, {"type": "list_sessions", "request_id": "ls"})
        listing = recv(ws)
        cwd = {entry["session"]: entry["cwd"] for entry in listing["sessions"]}
        assert cwd["where"] == "/tmp"


def test_memory_hog_dies_and_the_agent_lives(
    gateway: GatewayProcess, docker_client: Any, sandbox: str
) -> None:
    """A command allocating past the sandbox's memory limit is the OOM killer's choice: it is
    killed with oom_killed true, and the agent (same process, same connection) lives on."""
    container = container_of(docker_client, sandbox)
    agent_before = agent_pid(container)
    with connect(f"{gateway.ws_url}/ws/{sandbox}") as ws:
        assert run(ws, "echo kept > f")["success"]
        result = run(ws, "python3 -c 'a = bytearray(1024 ** 3); print(len(a))'", timeout=60)
        assert result["success"] is False
        assert result["returncode"] == -9
        assert result.get("oom_killed") is True
        assert run(ws, "cat f")["output"] == "kept\n"
    assert agent_pid(container) == agent_before


def kill_agent_as_root(container: Any) -> None:
    """SIGKILL the agent from outside the sandbox's reach (docker exec as root)."""
    result = container.exec_run(["sh", "-c", f"kill -9 $({FIND_AGENT})"], user="root")
    assert result.exit_code == 0, result.output


@pytest.mark.serial  # a latency figure: served again within 2 s
def test_agent_killed_from_outside_comes_back(
    gateway: GatewayProcess, docker_client: Any, sandbox: str
) -> None:
    """The agent SIGKILLed as root: the container keeps running (no restart, files intact),
    the supervisor brings the agent back, and the gateway serves the sandbox again within
    2 s. The attached client gets an error for its command in flight, an ``agent_restarted``
    message naming the lost command and session, and close code 4001; the lost session is
    reported to the first command that uses it."""
    container = container_of(docker_client, sandbox)
    started_at = container.attrs["State"]["StartedAt"]
    agent_before = agent_pid(container)
    with connect(f"{gateway.ws_url}/ws/{sandbox}") as ws:
        assert run(ws, "echo precious > f && echo ok")["output"] == "ok\n"
        assert run(ws, "cd /tmp", session="work")["success"]
        send(ws, {"command": "sleep 60", "request_id": "in-flight"})
        time.sleep(0.2)
        killed_at = time.monotonic()
        kill_agent_as_root(container)
        lost = recv(ws, timeout=10)
        assert (lost["type"], lost["request_id"]) == ("error", "in-flight")
        assert (lost["error_code"], lost["success"]) == ("agent_restarted", False)
        notice = recv(ws, timeout=10)
        assert notice["type"] == "agent_restarted"
        assert notice["lost_requests"] == ["in-flight"]
        assert notice["lost_sessions"] == ["work"]
        with pytest.raises(ConnectionClosed) as closed:
            recv(ws, timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4001
        assert "restarted" in closed.value.rcvd.reason
    while True:
        try:
            with connect(f"{gateway.ws_url}/ws/{sandbox}", open_timeout=5) as ws:
                assert run(ws, "cat f")["output"] == "precious\n"
                served_after = time.monotonic() - killed_at
                session = run(ws, "pwd", session="work")
                assert session["error_code"] == "session_lost"
                assert run(ws, "pwd", session="work")["output"] == "/home/sandbox\n"
            break
        except Exception:
            if time.monotonic() - killed_at > 10:
                raise
            time.sleep(0.05)
    print(f"agent killed -> sandbox served again after {served_after * 1000:.0f} ms")
    assert served_after < 2.0
    container.reload()
    assert container.attrs["State"]["Running"] is True
    assert container.attrs["State"]["StartedAt"] == started_at
    assert container.attrs["RestartCount"] == 0
    assert agent_pid(container) != agent_before
    details = gateway.get(f"/sandboxes/{sandbox}?details=true").json()
    assert details["status"] != "removed"
    assert details["agent_restarts"] == 1


#: Prints the in-container pid of the persistent spawner (see sandbox-image/spawner.c).
FIND_SPAWNER = (
    "for p in /proc/[0-9]*; do "
    "case \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" in '/opt/agent/spawner '*) "
    'echo "${p#/proc/}";; esac; done'
)


def test_user_processes_come_from_the_spawner_as_the_agents_children(
    gateway: GatewayProcess, sandbox: str
) -> None:
    """The spawner runs as `sandbox` with no capability and an empty environment, and a
    command it starts is the agent's own child (clone(CLONE_PARENT)), as `sandbox`, with no
    capability and oom_score_adj 500."""
    with connect(f"{gateway.ws_url}/ws/{sandbox}") as ws:
        agent = run(ws, FIND_AGENT)["output"].strip()
        spawner = run(ws, FIND_SPAWNER)["output"].strip()
        assert spawner.isdigit(), spawner
        status = run(ws, f"grep -E '^(PPid|Uid|CapPrm|CapEff|CapAmb):' /proc/{spawner}/status")
        fields = dict(line.split(":", 1) for line in status["output"].splitlines())
        assert fields["PPid"].strip() == agent
        assert fields["Uid"].split() == ["1000"] * 4
        for cap in ("CapPrm", "CapEff", "CapAmb"):
            assert int(fields[cap], 16) == 0
        assert run(ws, f"wc -c < /proc/{spawner}/environ")["output"].strip() == "0"
        own = run(ws, "echo $PPID $(id -u) $(cat /proc/self/oom_score_adj)")["output"].split()
        assert own == [agent, "1000", "500"]
        caps = run(ws, "grep -E '^Cap(Prm|Eff|Amb):' /proc/self/status")["output"].split()
        assert [int(v, 16) for v in caps[1::2]] == [0, 0, 0]


def test_kill_everything_kills_the_spawner_and_the_next_command_still_works(
    gateway: GatewayProcess, sandbox: str
) -> None:
    """`kill -9 -1` from user code also kills the spawner (same uid): the next commands run
    (each once), from a new spawner, and a session started afterwards works."""
    with connect(f"{gateway.ws_url}/ws/{sandbox}") as ws:
        before = run(ws, FIND_SPAWNER)["output"].strip()
        assert before.isdigit(), before
        run(ws, "kill -9 -1", timeout=10)
        assert run(ws, "echo once >> counted; cat counted")["output"] == "once\n"
        after = run(ws, FIND_SPAWNER)["output"].strip()
        assert after.isdigit() and after != before
        assert run(ws, "echo in-session", session="s1")["output"] == "in-session\n"
        assert run(ws, "exit 3")["returncode"] == 3


@pytest.mark.serial  # a latency figure: served within 3 s
def test_a_stopped_spawner_does_not_hang_the_agent(gateway: GatewayProcess, sandbox: str) -> None:
    """`kill -STOP <spawner>` from user code: the next command completes within a few seconds
    (the agent gives up on the stopped spawner and starts another), and so do the ones after."""
    with connect(f"{gateway.ws_url}/ws/{sandbox}") as ws:
        stopped = run(ws, FIND_SPAWNER)["output"].strip()
        assert stopped.isdigit(), stopped
        assert run(ws, f"kill -STOP {stopped}")["success"]
        began = time.monotonic()
        result = run(ws, "echo served", timeout=5)
        assert (result["output"], result["returncode"]) == ("served\n", 0)
        assert time.monotonic() - began < 3.0
        replaced = run(ws, FIND_SPAWNER)["output"].strip()
        assert replaced.isdigit() and replaced != stopped
        assert run(ws, f"test -e /proc/{stopped} || echo gone")["output"] == "gone\n"
        for _ in range(5):
            assert run(ws, "true", timeout=5)["success"]
