"""The persistent spawner (sandbox-image/spawner.c) and the agent's client of it (agent.spawner),
against the real binary compiled here with the image's compiler flags, run as the current uid
(no wrapper prefix: the uid change itself is runas's, tested in test_spawn.py).

What must hold: the process is the agent's own child, in a new session, with exactly the given
argv/env/cwd/fds; chdir/exec failures are raised as OSError like a direct spawn; a spawner that
dies, stops, hangs or lies never blocks the agent for long, never gets a process run twice and
never gets a foreign pid trusted.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent import spawn, spawner

SPAWNER_C = Path(__file__).resolve().parents[2] / "sandbox-image" / "spawner.c"


@pytest.fixture(scope="module")
def spawner_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    """spawner.c compiled static, as the image build does."""
    binary = tmp_path_factory.mktemp("spawner") / "spawner"
    flags = ["-O2", "-Wall", "-Wextra", "-Werror", "-static", "-s"]
    subprocess.run(
        ["gcc", *flags, "-o", str(binary), str(SPAWNER_C)],
        check=True,
    )
    return str(binary)


@pytest.fixture
def client(spawner_binary: str) -> Iterator[spawner.Spawner]:
    sp = spawner.Spawner((), spawner_binary, timeout=2.0)
    yield sp
    sp.close()


def run(
    user: spawn.UserIdentity,
    argv: list[str],
    cwd: str = "/",
    env: dict[str, str] | None = None,
    stdin: bytes = b"",
) -> tuple[int, str, int]:
    """(pid, stdout, exit code) of ``argv`` started by start_process with ``user``."""
    started = spawn.start_process(
        argv, {"PATH": "/usr/bin:/bin"} if env is None else env, cwd, user=user
    )
    os.set_blocking(started.stdin, True)
    os.write(started.stdin, stdin)
    os.close(started.stdin)
    os.set_blocking(started.stdout, True)
    chunks = []
    while data := os.read(started.stdout, 65536):
        chunks.append(data)
    os.close(started.stdout)
    os.close(started.stderr)
    _, status = os.waitpid(started.pid, 0)
    return started.pid, b"".join(chunks).decode(), os.waitstatus_to_exitcode(status)


def zombie_children() -> set[int]:
    """This process's children that exited and were not reaped."""
    found = set()
    for name in os.listdir("/proc"):
        fields = spawner._proc_stat(int(name)) if name.isdigit() else None
        if fields and fields[0] == b"Z" and fields[1] == str(os.getpid()).encode():
            found.add(int(name))
    return found


def fake_spawner(tmp_path: Path, body: str) -> str:
    """A stand-in spawner (Python) that reads one request from fd 0 and then does ``body``."""
    script = tmp_path / "fake-spawner"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, socket, struct, sys, time\n"
        "sock = socket.socket(fileno=0)\n"
        "head, fds, _, _ = socket.recv_fds(sock, 12, 5)\n"
        "length = struct.unpack('=III', head)[0]\n"
        "while length > 0:\n"
        "    length -= len(sock.recv(length))\n" + body + "\n"
    )
    script.chmod(0o755)
    return str(script)


def test_the_process_is_the_agents_own_child_in_a_new_session_with_exactly_its_spec(
    client: spawner.Spawner, tmp_path: Path
) -> None:
    """argv, env (nothing more), cwd, stdin and the exit code are the request's; the process's
    parent is the caller (clone(CLONE_PARENT)), not the spawner; it leads its own session and
    holds no fd but 0, 1 and 2."""
    user = spawn.UserIdentity(spawner=client)
    script = (
        'read line; echo "in=$line"; echo "args=$0 $1"; echo "ppid=$PPID"; pwd; env | sort; '
        "echo sid=$(cut -d' ' -f6 /proc/self/stat); exit 7"
    )
    pid, out, code = run(
        user, ["/bin/sh", "-c", script, "argzero", "one"], str(tmp_path), {"A": "b c"}, b"typed\n"
    )
    lines = out.splitlines()
    assert code == 7
    assert lines[0] == "in=typed"
    assert lines[1] == "args=argzero one"
    assert lines[2] == f"ppid={os.getpid()}"
    assert client.pid is not None and client.pid != os.getpid()
    assert lines[3] == str(tmp_path)
    env_lines = [line for line in lines if "=" in line and line.split("=")[0] in ("A", "PATH")]
    assert "A=b c" in env_lines
    assert not any(line.startswith("PATH=") for line in lines)  # only what was given (+ sh's PWD)
    _, listing, _ = run(user, ["/bin/ls", "/proc/self/fd"])
    assert set(listing.split()) <= {"0", "1", "2", "3"}, listing  # 3: ls's own handle
    session = next(line for line in lines if line.startswith("sid="))
    assert session == f"sid={pid}"


def test_a_missing_cwd_and_a_missing_program_raise_like_a_direct_spawn_and_leave_no_zombie(
    client: spawner.Spawner,
) -> None:
    """The chdir/exec failure in the new process reaches the caller as the OSError (errno and
    file name) a direct spawn raises, and the failed process is reaped."""
    user = spawn.UserIdentity(spawner=client)
    zombies_before = zombie_children()  # earlier tests' children are not this test's business
    with pytest.raises(FileNotFoundError) as missing_dir:
        spawn.start_process(["/bin/true"], {}, "/nonexistent-dir", user=user)
    assert missing_dir.value.filename == "/nonexistent-dir"
    with pytest.raises(FileNotFoundError) as missing_program:
        spawn.start_process(["/nonexistent-program"], {}, "/", user=user)
    assert missing_program.value.filename == "/nonexistent-program"
    assert zombie_children() - zombies_before == set()
    assert client.started == 1 and client.discarded == 0


def test_a_killed_spawner_is_replaced_and_the_command_runs_once(
    client: spawner.Spawner, tmp_path: Path
) -> None:
    """`kill -9` of the spawner (as user code can): the next command runs, exactly once, on a
    new spawner, and the dead one is reaped."""
    user = spawn.UserIdentity(spawner=client)
    run(user, ["/bin/true"])
    first = client.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    marker = tmp_path / "ran"
    _, _, code = run(user, ["/bin/sh", "-c", f"echo x >> {marker}"])
    assert code == 0
    assert marker.read_text() == "x\n"
    assert client.pid not in (None, first)
    assert (client.started, client.discarded) == (2, 1)
    with pytest.raises(ChildProcessError):
        os.waitpid(first, os.WNOHANG)


def test_a_stopped_spawner_does_not_hang_the_caller(client: spawner.Spawner) -> None:
    """SIGSTOP of the spawner (as user code can): the next command completes on a new spawner
    well within the answer timeout, and the stopped one is killed and reaped."""
    user = spawn.UserIdentity(spawner=client)
    run(user, ["/bin/true"])
    stopped = client.pid
    assert stopped is not None
    os.kill(stopped, signal.SIGSTOP)
    began = time.monotonic()
    _, out, code = run(user, ["/bin/echo", "served"])
    assert (out, code) == ("served\n", 0)
    assert time.monotonic() - began < 1.0
    assert client.pid != stopped
    with pytest.raises(ChildProcessError):
        os.waitpid(stopped, os.WNOHANG)


def test_a_spawner_that_never_answers_costs_at_most_the_timeout_then_the_wrapper_runs_it(
    tmp_path: Path,
) -> None:
    """A spawner that reads the request and then hangs (not stopped, just silent) is given up
    on after ``timeout`` (twice: one retry), and start_process starts the command the old way."""
    sp = spawner.Spawner((), fake_spawner(tmp_path, "time.sleep(60)"), timeout=0.3)
    user = spawn.UserIdentity(spawner=sp)
    began = time.monotonic()
    _, out, code = run(user, ["/bin/echo", "fallback"])
    elapsed = time.monotonic() - began
    assert (out, code) == ("fallback\n", 0)
    assert 0.5 <= elapsed < 2.0
    assert (sp.started, sp.discarded) == (2, 2)


def test_a_pid_that_is_not_the_callers_child_is_not_trusted(tmp_path: Path) -> None:
    """A spawner answering a foreign pid (here its own parent's parent... pid 1) is discarded; the
    caller never treats that pid as its process."""
    body = "sock.send(struct.pack('=ii', 1, 0)); time.sleep(60)"
    sp = spawner.Spawner((), fake_spawner(tmp_path, body), timeout=1.0)
    with pytest.raises(spawner.SpawnerUnavailable):
        r, w = os.pipe()
        try:
            sp.spawn(["/bin/true"], {}, "/", (r, w, w))
        finally:
            os.close(r)
            os.close(w)
    assert (sp.started, sp.discarded) == (2, 2)


def request_by_hand(
    spawner_binary: str, argv: list[str], status_w: int
) -> tuple[socket.socket, int, tuple[int, int]]:
    """A spawner started here (so its CLONE_PARENT children are ours) and one request sent
    to it: (its socket, its pid, its answer)."""
    ours, theirs = socket.socketpair()
    pid = os.posix_spawn(
        spawner_binary,
        [spawner_binary, str(os.getpid())],
        {},
        file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 0)],
    )
    theirs.close()
    rights = struct.pack("4i", 1, 1, 2, status_w)
    ours.sendmsg([spawner.encode(argv, {}, "/")], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    child, error = struct.unpack("=ii", ours.recv(8))
    return ours, pid, (child, error)


def test_the_new_process_announces_itself_on_the_status_pipe_before_it_runs(
    spawner_binary: str,
) -> None:
    """The first thing on the status pipe is the new process's pid (what lets the agent adopt
    a process whose spawner died before answering), then end of file at its exec."""
    status_r, status_w = os.pipe()
    sock, pid, (child, error) = request_by_hand(spawner_binary, ["/bin/true"], status_w)
    try:
        os.close(status_w)
        assert error == 0 and spawner.is_own_child(child)
        assert os.read(status_r, 100) == struct.pack("=i", child)
        assert os.read(status_r, 100) == b""
        os.waitpid(child, 0)
    finally:
        os.close(status_r)
        sock.close()
        os.waitpid(pid, 0)  # end of file on its socket ends the spawner


def test_a_process_that_cannot_announce_itself_exits_without_running(
    spawner_binary: str, tmp_path: Path
) -> None:
    """When the agent has closed the status pipe (it gave up on that request), the new process
    exits with 125 and the command never runs: what makes a retry safe."""
    marker = tmp_path / "ran"
    status_r, status_w = os.pipe()
    os.close(status_r)
    sock, pid, (child, error) = request_by_hand(
        spawner_binary, ["/bin/sh", "-c", f"touch {marker}"], status_w
    )
    try:
        os.close(status_w)
        assert error == 0
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 125
        assert not marker.exists()
    finally:
        sock.close()
        os.waitpid(pid, 0)


def test_a_process_created_by_a_spawner_that_then_dies_is_adopted_not_run_twice(
    tmp_path: Path,
) -> None:
    """A spawner that starts the process and dies before it answers (as `kill -9 -1` at the
    wrong moment would do): the agent finds the pid on the status pipe and returns that
    process; the command runs once, and no second spawner is needed."""
    marker = tmp_path / "ran"
    body = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "child = libc.syscall(56, 0x8000 | 17, 0, 0, 0, 0)  # clone(CLONE_PARENT | SIGCHLD)\n"
        "if child == 0:\n"
        "    os.write(fds[3], struct.pack('=i', os.getpid()))\n"
        f"    os.execv('/bin/sh', ['sh', '-c', 'echo x >> {marker}'])\n"
        "os._exit(0)  # dies without answering"
    )
    sp = spawner.Spawner((), fake_spawner(tmp_path, body), timeout=2.0)
    r, w = os.pipe()
    try:
        pid = sp.spawn(["/bin/sh", "-c", "unused"], {}, "/", (r, w, w))
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
        os.close(w)
        sp.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert marker.read_text() == "x\n"
    assert (sp.started, sp.discarded) == (1, 1)


def test_the_spawner_and_its_processes_get_the_raised_oom_score_adj(spawner_binary: str) -> None:
    """The spawner is started with the user processes' oom_score_adj (they inherit it from it);
    the caller's own is back right after."""
    with open("/proc/self/oom_score_adj") as f:
        before = int(f.read())
    sp = spawner.Spawner((), spawner_binary, oom_score_adj=(before + 300, before))
    try:
        _, out, _ = run(spawn.UserIdentity(spawner=sp), ["/bin/cat", "/proc/self/oom_score_adj"])
        assert out.strip() == str(before + 300)
        with open("/proc/self/oom_score_adj") as f:
            assert int(f.read()) == before
    finally:
        sp.close()


def test_a_request_larger_than_the_socket_buffer_goes_through(client: spawner.Spawner) -> None:
    """A 1 MiB command line (more than a socket buffer holds) reaches the process intact."""
    parts = [f"{i:x}" * (100_000 // len(f"{i:x}")) for i in range(1, 11)]
    _, out, code = run(
        spawn.UserIdentity(spawner=client),
        ["/bin/sh", "-c", 'printf %s "$@" | md5sum', "sh", *parts],
    )
    expected = hashlib.md5("".join(parts).encode()).hexdigest()
    assert (out.split()[0], code) == (expected, 0)


def test_an_unusable_spawner_binary_falls_back_to_the_wrapper(tmp_path: Path) -> None:
    """A spawner that cannot be started at all: start_process starts the command the old way."""
    sp = spawner.Spawner((), str(tmp_path / "absent"))
    _, out, code = run(spawn.UserIdentity(spawner=sp), ["/bin/echo", "old way"])
    assert (out, code) == ("old way\n", 0)


def test_user_identity_has_a_spawner_only_for_another_uid_and_not_when_switched_off(
    spawner_binary: str,
) -> None:
    """On this host commands run as the agent's own uid: no spawner. (With a `sandbox` user of
    another uid, AGENT_SPAWNER=off keeps the wrapper for every command.)"""
    identity, _ = spawn.user_identity({}, spawner_path=spawner_binary)
    try:
        import pwd

        other = pwd.getpwnam(spawn.SANDBOX_USER).pw_uid != os.getuid()
    except KeyError:
        other = False
    assert (identity.spawner is not None) == (other and os.access(spawner_binary, os.X_OK))
    off, _ = spawn.user_identity({"AGENT_SPAWNER": "off"}, spawner_path=spawner_binary)
    assert off.spawner is None


def test_the_spawner_exits_when_its_socket_closes(spawner_binary: str) -> None:
    """End of file on its channel (the agent closed it, or died) ends the spawner."""
    sp = spawner.Spawner((), spawner_binary)
    run(spawn.UserIdentity(spawner=sp), ["/bin/true"])
    assert sp.sock is not None and sp.pid is not None
    pid = sp.pid
    sp.sock.close()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the spawner outlived its socket")


def test_a_spawner_that_keeps_failing_is_rested_and_the_wrapper_used_meanwhile(
    tmp_path: Path,
) -> None:
    """Spawners that die on every request: after MAX_FAILURES in a row no new one is started
    for BACKOFF seconds (each command would otherwise pay two spawner starts), and commands
    still run, the old way."""
    sp = spawner.Spawner((), fake_spawner(tmp_path, "os._exit(0)"), timeout=1.0)
    user = spawn.UserIdentity(spawner=sp)
    for _ in range(3):
        _, out, code = run(user, ["/bin/echo", "ok"])
        assert (out, code) == ("ok\n", 0)
    assert sp.started == spawner.MAX_FAILURES
    assert sp.pid is None


def test_the_spawner_holds_only_its_socket_and_dev_null(client: spawner.Spawner) -> None:
    """User code (same uid) can open the spawner's fds through /proc: they are its socket and
    /dev/null, never the agent's stderr (the container's log) or anything else it inherited."""
    inherited = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    os.set_inheritable(inherited, True)  # an fd the caller forgot to make close-on-exec
    try:
        run(spawn.UserIdentity(spawner=client), ["/bin/true"])
    finally:
        os.close(inherited)
    assert client.pid is not None
    targets = {
        fd: os.readlink(f"/proc/{client.pid}/fd/{fd}")
        for fd in os.listdir(f"/proc/{client.pid}/fd")
    }
    assert set(targets) == {"0", "1", "2"}
    assert targets["0"].startswith("socket:")
    assert targets["1"] == targets["2"] == "/dev/null"


CTTY_PROBE = (
    "import os; fd = os.open('/dev/tty', os.O_RDWR); "  # only with a controlling terminal
    "print(os.ttyname(0), os.tcgetpgrp(fd) == os.getpgrp() == os.getsid(0) == os.getpid())"
)


@pytest.mark.parametrize("how", ["spawner", "fork"])
def test_a_process_started_on_a_terminal_has_it_as_controlling_terminal(
    how: str, request: pytest.FixtureRequest
) -> None:
    """``start_on_terminal``: the PTY slave is stdin/stdout/stderr and the controlling terminal
    of the new session, both through the spawner (TIOCSCTTY in spawner.c) and without it (fork,
    TIOCSCTTY before the exec)."""
    user = (
        spawn.UserIdentity(spawner=request.getfixturevalue("client"))
        if how == "spawner"
        else spawn.UserIdentity()
    )
    master, slave = os.openpty()
    try:
        pid = spawn.start_on_terminal(
            [sys.executable, "-c", CTTY_PROBE], {"PATH": "/usr/bin:/bin"}, "/", slave, user
        )
        slave_name = os.ttyname(slave)
        os.close(slave)
        _, status = os.waitpid(pid, 0)
        out = b""
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: no process holds the slave any more
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert out.decode().split() == [slave_name, "True"]
