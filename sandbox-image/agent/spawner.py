"""The agent's side of the persistent spawner (``sandbox-image/spawner.c``).

When user processes run under another uid than the agent, starting each one through an exec'd
wrapper (``runas``) costs an exec per command. Instead the agent starts the spawner ONCE
through that wrapper (as the user, with no capability, with an empty environment) and then
asks it for each process over a socketpair: the process's stdin/stdout/stderr and two control
pipes go over by SCM_RIGHTS, argv/env/cwd as a compact request. The spawner forks with
``clone(CLONE_PARENT)``, so the process is the agent's own child (its waitpid, exit status,
signals and OOM detection do not change), and answers the pid.

User code runs as the same uid as the spawner, so it can kill, stop or ptrace it. The agent
therefore never trusts it and never waits on it without a deadline:

* the answer is awaited for at most ``timeout`` seconds, and not at all once the spawner is
  seen stopped (``/proc/PID/stat`` state T/t); end of file, a timeout or a malformed answer
  discards the spawner (SIGKILL, reaped) and a new one is started for the next attempt;
* the new process waits on a "go" pipe that only the agent writes, after it has checked that
  the pid is its own child (``/proc/PID/stat``'s ppid): when the agent gives up on a request,
  it closes that pipe and a process the spawner may have created exits (status 125) without
  running anything, so the request is retried once on a fresh spawner, never run twice;
* a chdir or exec failure comes back on a close-on-exec status pipe as an errno and is raised
  as the OSError the direct spawn would raise.

``SpawnerUnavailable`` tells the caller (``agent.spawn``) to start the process the old way.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
import time

#: Where the image installs it.
SPAWNER = "/opt/agent/spawner"
#: Longest wait for an answer before the spawner is given up on (seconds).
DEFAULT_TIMEOUT = 2.0
#: How often a wait checks whether the spawner has been stopped (seconds).
STOP_CHECK_INTERVAL = 0.05
#: Larger requests go the old way (the spawner refuses more than 16 MiB).
MAX_REQUEST = 8 << 20
STAGE_CHDIR, STAGE_EXEC = 1, 2

_HEAD = struct.Struct("=III")
_ANSWER = struct.Struct("=ii")


class SpawnerUnavailable(Exception):
    """The spawner cannot start this process (it died, hung, or cannot be started)."""


class Spawner:
    """A persistent spawner process and the agent's end of its socket, started on first use.

    ``prefix`` is the argv prefix that execs a program as the user without capabilities (the
    image's runas); empty when the user is the agent's own uid.
    """

    def __init__(
        self,
        prefix: tuple[str, ...] = (),
        path: str = SPAWNER,
        timeout: float = DEFAULT_TIMEOUT,
        oom_score_adj: tuple[int, int] | None = None,
    ) -> None:
        self.prefix = prefix
        #: (the spawner's oom_score_adj, the agent's own): raised for the moment of its start,
        #: so that it and every process it starts inherit the first.
        self.oom_score_adj = oom_score_adj
        self.path = path
        self.timeout = timeout
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        #: How many spawners were started, and given up on (for tests and logs).
        self.started = 0
        self.discarded = 0

    # lifecycle ------------------------------------------------------------------------------

    def _ensure(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            actions = [
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            ]
            argv = [*self.prefix, self.path, str(os.getpid())]
            raised = self.oom_score_adj is not None and _write_oom(self.oom_score_adj[0])
            try:
                self.pid = os.posix_spawn(argv[0], argv, {}, file_actions=actions, setpgroup=0)
            finally:
                if raised and self.oom_score_adj is not None:
                    _write_oom(self.oom_score_adj[1])
        except OSError as e:
            ours.close()
            raise SpawnerUnavailable(f"cannot start {self.path}: {e}") from None
        finally:
            theirs.close()
        self.sock = ours
        self.started += 1
        return ours

    def discard(self) -> None:
        """Kill the spawner (if any) and reap it; the next request starts a new one."""
        sock, pid, self.sock, self.pid = self.sock, self.pid, None, None
        if sock is not None:
            sock.close()
        if pid is not None:
            self.discarded += 1
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(pid, 0)  # SIGKILL ends it even when stopped or traced
            except ChildProcessError:
                pass

    close = discard

    # requests -------------------------------------------------------------------------------

    def spawn(
        self, argv: list[str], env: dict[str, str], cwd: str, fds: tuple[int, int, int]
    ) -> int:
        """Start ``argv`` with stdin/stdout/stderr on ``fds`` (the caller keeps and closes its
        own copies) in a new session; return its pid.

        Raises OSError as a direct spawn would (chdir or exec failed: the process is reaped),
        SpawnerUnavailable when two spawners in a row could not start it (then it was not
        started), ValueError/SpawnerUnavailable for requests it cannot carry.
        """
        request = encode(argv, env, cwd)
        for _attempt in range(2):
            sock = self._ensure()
            pid = self._request(sock, request, fds, argv[0], cwd)
            if pid is not None:
                return pid
            self.discard()
        raise SpawnerUnavailable("the spawner did not answer twice in a row")

    def _request(
        self, sock: socket.socket, request: bytes, fds: tuple[int, int, int], program: str, cwd: str
    ) -> int | None:
        """One attempt: the pid, or None when this spawner is unusable (nothing was run)."""
        go_r, go_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            deadline = time.monotonic() + self.timeout
            rights = struct.pack("5i", *fds, go_r, status_w)
            try:
                # Non-blocking: a spawner that stopped reading must not block the agent.
                sent = sock.sendmsg(
                    [request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], socket.MSG_DONTWAIT
                )
                if sent < len(request) and not self._send_rest(sock, request[sent:], deadline):
                    return None
            except OSError:
                return None
            os.close(go_r)
            os.close(status_w)
            go_r = status_w = -1
            answer = self._receive(sock, _ANSWER.size, deadline)
            if answer is None:
                return None
            pid, error = _ANSWER.unpack(answer)
            if error:
                raise OSError(error, os.strerror(error), program)
            if pid <= 0 or not is_own_child(pid):
                return None  # nonsense: closing go stops whatever it started
            os.write(go_w, b"\0")
            report = _read_status(status_r, deadline)
            if report is not None:
                stage, error = report
                _reap(pid)
                where = cwd if stage == STAGE_CHDIR else program
                raise OSError(error, os.strerror(error), where)
            return pid
        finally:
            for fd in (go_r, go_w, status_r, status_w):
                if fd >= 0:
                    os.close(fd)

    def _send_rest(self, sock: socket.socket, data: bytes, deadline: float) -> bool:
        view = memoryview(data)
        while view:
            if not self._wait(sock.fileno(), select.POLLOUT, deadline):
                return False
            try:
                n = sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            view = view[n:]
        return True

    def _receive(self, sock: socket.socket, size: int, deadline: float) -> bytes | None:
        data = b""
        while len(data) < size:
            if not self._wait(sock.fileno(), select.POLLIN, deadline):
                return None
            try:
                chunk = sock.recv(size - len(data), socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def _wait(self, fd: int, events: int, deadline: float) -> bool:
        """Wait until ``fd`` is ready, at most until ``deadline`` and only while the spawner is
        not stopped."""
        poller = select.poll()
        poller.register(fd, events)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller.poll(min(left, STOP_CHECK_INTERVAL) * 1000):
                return True
            if self.pid is None or is_stopped(self.pid):
                return False


def encode(argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    """The request: a head (length, argc, envc) and NUL-terminated cwd, argv, env."""
    if not argv:
        raise ValueError("empty argv")
    strings = [cwd, *argv, *(f"{k}={v}" for k, v in env.items())]
    encoded = [os.fsencode(s) for s in strings]
    if any(b"\0" in s for s in encoded):
        raise ValueError("embedded null byte")
    body = b"\0".join(encoded) + b"\0"
    if len(body) > MAX_REQUEST:
        raise SpawnerUnavailable("request too large for the spawner")
    return _HEAD.pack(len(body), len(argv), len(env)) + body


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def is_own_child(pid: int) -> bool:
    """Whether ``pid`` is a child of this process (its ppid in /proc is ours)."""
    fields = _proc_stat(pid)
    return fields is not None and len(fields) > 1 and fields[1] == str(os.getpid()).encode()


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (by a signal, or by a tracer)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] in (b"T", b"t")


def _read_status(fd: int, deadline: float) -> tuple[int, int] | None:
    """A failure report from the new process, or None: it exec'd (end of file), or did not get
    there before the deadline (then it is left to run or fail like any command)."""
    data = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(data) < _ANSWER.size:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return None
        try:
            chunk = os.read(fd, _ANSWER.size - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    stage, error = _ANSWER.unpack(data)
    return stage, error or errno.EIO


def _reap(pid: int) -> None:
    """Reap a new process that failed before its exec (it exits at once; SIGKILL bounds it)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass


def _write_oom(value: int) -> bool:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
        return True
    except OSError:
        return False
