"""Starting user processes: the ONE place where the agent creates a process.

Every command and every session shell is started by ``start_process``: in a new session (and
so its own process group, pgid == pid, so the whole tree it starts can be killed with one
killpg), with exactly the environment and working directory given, stdin/stdout/stderr on
fresh pipes and no other inherited descriptor (every fd the agent opens is close-on-exec,
PEP 446).  By default it uses ``posix_spawn`` (``setsid`` flag), which does not copy the
agent's memory the way fork() does; ``AGENT_SPAWN=fork`` selects fork+exec instead.

Changes to how user processes start (another uid, ``oom_score_adj``, ...) belong here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: How processes are started: "posix_spawn" (default) or "fork" (AGENT_SPAWN=fork).
SPAWN_METHODS = ("posix_spawn", "fork")


@dataclass
class Spawned:
    """A started process and the agent's ends of its pipes (non-blocking, close-on-exec)."""

    pid: int
    stdin: int
    stdout: int
    stderr: int


def start_process(
    argv: list[str], env: dict[str, str], cwd: str, method: str = "posix_spawn"
) -> Spawned:
    """Start ``argv`` in a new session with the given environment and cwd.

    Raises OSError when the process cannot be started (then no fd is left open).
    """
    pipes: list[int] = []
    try:
        in_r, in_w = os.pipe()
        pipes += [in_r, in_w]
        out_r, out_w = os.pipe()
        pipes += [out_r, out_w]
        err_r, err_w = os.pipe()
        pipes += [err_r, err_w]
        if method == "fork":
            pid = _fork_exec(argv, env, cwd, in_r, out_w, err_w)
        else:
            pid = _posix_spawn(argv, env, cwd, in_r, out_w, err_w)
    except BaseException:
        for fd in pipes:
            os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    for fd in (in_w, out_r, err_r):
        os.set_blocking(fd, False)
    return Spawned(pid=pid, stdin=in_w, stdout=out_r, stderr=err_r)


def _posix_spawn(argv: list[str], env: dict[str, str], cwd: str, i: int, o: int, e: int) -> int:
    actions = [
        (os.POSIX_SPAWN_DUP2, i, 0),
        (os.POSIX_SPAWN_DUP2, o, 1),
        (os.POSIX_SPAWN_DUP2, e, 2),
    ]
    # posix_spawn has no chdir action before Python 3.13: change ours around the call (the
    # agent is single-threaded, so nothing else sees it).  The argv[0] lookup below uses no
    # PATH search, so a relative cwd change cannot redirect it.
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    finally:
        os.chdir(previous)


def _fork_exec(argv: list[str], env: dict[str, str], cwd: str, i: int, o: int, e: int) -> int:
    # Check what would fail in the child first, so that errors reach the caller.
    if not os.path.isdir(cwd):
        raise FileNotFoundError(2, "no such directory", cwd)
    if not os.access(argv[0], os.X_OK):
        raise PermissionError(13, "not executable", argv[0])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setsid()
            os.chdir(cwd)
            os.dup2(i, 0)
            os.dup2(o, 1)
            os.dup2(e, 2)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid
