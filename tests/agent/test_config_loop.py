"""The agent's configuration, its event loop, and the rule that one function starts processes."""

from __future__ import annotations

import ast
import json
import socket
from typing import Any

import pytest
from agent.config import AgentConfig, ConfigError
from agent.loop import Loop, SocketTransport

from tests.agent.conftest import AGENT_ROOT


def test_from_environ_scrubs_the_secret_and_the_command_env() -> None:
    """``from_environ`` removes the secret and the command env from the environ it reads, keeps
    the secret as bytes and the command env in ``child_env``, caps a default timeout of 90 at the
    maximum 60, reads the socket, and keeps the secret out of the repr."""
    environ = {
        "SANDBOX_AGENT_SECRET": "s3cret",
        "SANDBOX_COMMAND_ENV": json.dumps({"FOO": "bar"}),
        "AGENT_MAX_TIMEOUT": "60",
        "AGENT_DEFAULT_TIMEOUT": "90",
        "AGENT_UNIX_SOCKET": "/run/x.sock",
    }
    config = AgentConfig.from_environ(environ)
    assert "SANDBOX_AGENT_SECRET" not in environ
    assert "SANDBOX_COMMAND_ENV" not in environ
    assert config.secret == b"s3cret"
    assert config.child_env["FOO"] == "bar"
    assert config.max_timeout == 60.0
    assert config.default_timeout == 60.0  # never above the maximum
    assert config.unix_socket == "/run/x.sock"
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"SANDBOX_AGENT_SECRET": "s", "AGENT_PORT": "70000"},
        {"SANDBOX_AGENT_SECRET": "s", "AGENT_MAX_OUTPUT": "lots"},
        {"SANDBOX_AGENT_SECRET": "s", "AGENT_MAX_TIMEOUT": "nan"},
        {"SANDBOX_AGENT_SECRET": "s", "AGENT_LOG_LEVEL": "loud"},
        {"SANDBOX_AGENT_SECRET": "s", "SANDBOX_COMMAND_ENV": "[1]"},
        {"SANDBOX_AGENT_SECRET": "s", "SANDBOX_COMMAND_ENV": '{"A=B": "x"}'},
    ],
)
def test_unusable_environments_are_config_errors(environ: dict[str, str]) -> None:
    """No secret, a port out of range, a non-numeric output cap, a NaN maximum timeout, an
    unknown log level or a bad command env is a ConfigError."""
    with pytest.raises(ConfigError):
        AgentConfig.from_environ(environ)


def test_spawn_method_fork_is_selectable() -> None:
    """``AGENT_SPAWN=fork`` sets the spawn method to ``fork``."""
    config = AgentConfig.from_environ({"SANDBOX_AGENT_SECRET": "s", "AGENT_SPAWN": "fork"})
    assert config.spawn_method == "fork"


def test_timers_run_in_order_and_cancelled_ones_do_not() -> None:
    """Timers scheduled out of order run in the order of their delays; a cancelled one does not
    run."""
    loop = Loop()
    try:
        ran: list[str] = []
        loop.call_later(0.03, ran.append, "late")
        loop.call_later(0.01, ran.append, "early")
        loop.call_later(0.02, ran.append, "cancelled").cancel()
        loop.call_later(0.05, loop.stop)
        loop.run()
        assert ran == ["early", "late"]
    finally:
        loop.close()


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = b""

    def connection_made(self, transport: Any) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")


def test_a_transport_pauses_its_writer_when_full_and_resumes_when_drained() -> None:
    """A socket transport calls ``pause_writing`` once its buffer passes the high mark while the
    peer does not read, delivers all 4 MiB and calls ``resume_writing`` once drained, passes
    incoming data on, and calls ``connection_lost`` when the peer closes."""
    loop = Loop()
    ours, theirs = socket.socketpair()
    try:
        proto = Recorder()
        transport = SocketTransport(loop, ours, proto)
        transport.set_write_buffer_limits(high=64 * 1024)
        for _ in range(64):
            transport.write(b"x" * 65536)  # the peer does not read: the buffer fills
        assert proto.events == ["made", "pause"]
        theirs.setblocking(False)
        received = 0
        for _ in range(2000):
            try:
                received += len(theirs.recv(1 << 20))
            except BlockingIOError:
                pass
            loop.run_once(0.01)
            if received == 64 * 65536:
                break
        assert received == 64 * 65536
        assert proto.events == ["made", "pause", "resume"]
        theirs.sendall(b"hello")
        loop.run_once(0.5)
        assert proto.data == b"hello"
        theirs.close()
        loop.run_once(0.5)
        assert proto.events[-1] == "lost"
    finally:
        theirs.close()
        loop.close()


def test_only_the_spawn_module_starts_processes() -> None:
    """Issue 12 changes how user processes start (uid, oom_score_adj) in one place: no other
    agent module may call posix_spawn, fork, exec* or subprocess (spawner.py is spawn.py's
    client of the persistent spawner, which it starts)."""
    starters = {
        "posix_spawn", "posix_spawnp", "fork", "forkpty", "execv", "execve", "execvp",
        "execvpe", "spawnv", "spawnve", "system", "popen", "Popen",
        "create_subprocess_exec", "create_subprocess_shell",
    }  # fmt: skip
    offenders = []
    for path in sorted((AGENT_ROOT / "agent").glob("*.py")):
        if path.name in ("spawn.py", "spawner.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in starters:
                offenders.append(f"{path.name}:{node.lineno} {node.attr}")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "subprocess" in names:
                    offenders.append(f"{path.name}:{node.lineno} imports subprocess")
    assert offenders == []
    spawn = (AGENT_ROOT / "agent" / "spawn.py").read_text()
    assert "def start_process(" in spawn
