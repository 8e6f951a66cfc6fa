"""The agent's side of the persistent spawner (``sandbox-image/spawner.c``).

When user processes run under another uid than the agent, starting each one through an exec'd
wrapper (``runas``) costs an exec per command. Instead the agent starts the spawner ONCE
through that wrapper (as the user, with no capability, with an empty environment) and then
asks it for each process over a socketpair: the process's stdin/stdout/stderr and a status
pipe go over by SCM_RIGHTS, argv/env/cwd as a compact request. The spawner creates the process
as posix_spawn does (``CLONE_VM | CLONE_VFORK``), plus ``CLONE_PARENT``, so it is the agent's
own child (its waitpid, exit status, signals and OOM detection do not change), and answers the
pid once the process has exec'd or failed.

User code runs as the same uid as the spawner, so it can kill, stop or ptrace it. The agent
therefore never trusts it and never waits on it without a deadline:

* the answer is awaited for at most ``timeout`` seconds, and not at all once the spawner is
  seen stopped (``/proc/PID/stat`` state T/t); end of file, a timeout or a wrong answer
  discards the spawner (SIGKILL, reaped) and a new one is started for the next attempt;
* the new process writes its own pid on the status pipe (which only the agent reads) before
  anything else, so after a failed attempt the agent knows whether a process was created: if
  so it adopts it (the command is not started twice), if not it retries once on a fresh
  spawner; a process that comes too late to write it (the agent has closed the pipe) exits
  with status 125 without running anything;
* every pid is checked to be the agent's own child (``waitid`` with WNOWAIT) before it is
  used;
* a chdir or exec failure comes back on the status pipe (close-on-exec) as an errno and is
  raised as the OSError the direct spawn would raise.

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
from dataclasses import dataclass

from agent import log

#: Where the image installs it.
SPAWNER = "/opt/agent/spawner"
#: Longest wait for an answer before the spawner is given up on (seconds).
DEFAULT_TIMEOUT = 2.0
#: How often a wait checks whether the spawner has been stopped (seconds).
STOP_CHECK_INTERVAL = 0.05
#: After this many spawners in a row failed without starting anything, the old way is used for
#: ``BACKOFF`` seconds (a spawner that cannot work must not cost every command two starts).
MAX_FAILURES = 4
BACKOFF = 5.0
#: Larger requests go the old way (the spawner refuses more than 16 MiB).
MAX_REQUEST = 8 << 20
STAGE_CHDIR, STAGE_EXEC = 1, 2

_HEAD = struct.Struct("=III")
_ANSWER = struct.Struct("=ii")
_PID = struct.Struct("=i")


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
        self._failures = 0
        self._resume_at = 0.0

    # lifecycle ------------------------------------------------------------------------------

    def _ensure(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            actions = [
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 0),
                # Not the agent's stderr (the container's log): user code may open the
                # spawner's fds (same uid), and must not be able to write the agent's log.
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
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
        if self._resume_at and time.monotonic() < self._resume_at:
            raise SpawnerUnavailable("the spawner is resting after repeated failures")
        request = encode(argv, env, cwd)
        for _attempt in range(2):
            sock = self._ensure()
            pid = self._request(sock, request, fds, argv[0], cwd)
            if pid is not None:
                self._failures = 0
                self._resume_at = 0.0
                return pid
            self._failures += 1
            log.warn("the spawner failed (%d in a row); starting another", self._failures)
            self.discard()
            if self._failures >= MAX_FAILURES:
                self._resume_at = time.monotonic() + BACKOFF
                break
        raise SpawnerUnavailable("the spawner failed twice in a row")

    def _request(
        self,
        sock: socket.socket,
        request: bytes,
        fds: tuple[int, int, int],
        program: str,
        cwd: str,
    ) -> int | None:
        """One attempt: the pid, or None when this spawner failed and nothing was started."""
        status_r, status_w = os.pipe()
        try:
            deadline = time.monotonic() + self.timeout
            sent = self._send(sock, request, struct.pack("4i", *fds, status_w), deadline)
            os.close(status_w)
            status_w = -1
            answer = self._receive(sock, _ANSWER.size, deadline) if sent else None
            report: StatusReport | None = None
            if answer is not None:
                pid, error = _ANSWER.unpack(answer)
                if error and pid == 0:
                    raise OSError(error, os.strerror(error), program)  # clone failed
                # The new process has exec'd or failed (CLONE_VFORK): its records are there.
                report = _read_status(status_r, 0.0)
                if report.pid != pid or not is_own_child(pid):
                    report = None  # nonsense: this spawner is not trusted any more
            if report is None:
                # Dead, stopped, hung or lying. Once it is gone, the status pipe says whether a
                # process was created (it wrote its pid first) and how its exec went; one that
                # has not written it by the deadline never will (we close the pipe).
                self.discard()
                report = _read_status(status_r, max(deadline - time.monotonic(), 0.1))
                if report.pid is None or not is_own_child(report.pid):
                    return None
            child = report.pid
            if child is None:
                return None
            if report.error is not None:
                _reap(child)
                stage, error = report.error
                raise OSError(error, os.strerror(error), cwd if stage == STAGE_CHDIR else program)
            return child
        finally:
            for fd in (status_r, status_w):
                if fd >= 0:
                    os.close(fd)

    def _send(self, sock: socket.socket, request: bytes, rights: bytes, deadline: float) -> bool:
        """Send the request with its fds; False when the spawner does not take it."""
        try:
            # Non-blocking: a spawner that stopped reading must not block the agent.
            sent = sock.sendmsg(
                [request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], socket.MSG_DONTWAIT
            )
            return sent == len(request) or self._send_rest(sock, request[sent:], deadline)
        except OSError:
            return False

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
    """Whether ``pid`` is a child of this process (waitid without reaping it)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (by a signal, or by a tracer)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] in (b"T", b"t")


@dataclass
class StatusReport:
    """What a new process wrote on its status pipe: its pid, and a failure before its exec."""

    pid: int | None = None
    error: tuple[int, int] | None = None


def _read_status(fd: int, timeout: float) -> StatusReport:
    """Read the status pipe until end of file, 12 bytes, or ``timeout`` (0: what is there)."""
    os.set_blocking(fd, False)
    data = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(data) < _PID.size + _ANSWER.size:
        try:
            chunk = os.read(fd, _PID.size + _ANSWER.size - len(data))
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left > 0 and poller.poll(left * 1000):
                continue
            break
        if not chunk:
            break
        data += chunk
    report = StatusReport()
    if len(data) >= _PID.size:
        report.pid = _PID.unpack_from(data)[0]
    if len(data) == _PID.size + _ANSWER.size:
        stage, error = _ANSWER.unpack_from(data, _PID.size)
        report.error = (stage, error or errno.EIO)
    return report


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
