"""Process helpers: exit status, killing process groups, /proc scans, the OOM kill counter."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

KILLED_RETURNCODE = -int(signal.SIGKILL)

#: Where the kernel counts OOM kills in this container's memory cgroup (v1, then v2).
OOM_COUNTERS = ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events")


def oom_kill_count(paths: tuple[str, ...] = OOM_COUNTERS) -> int | None:
    """How many processes the kernel has OOM-killed in this container so far (None: unknown)."""
    for path in paths:
        try:
            with open(path) as counters:
                for line in counters:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def returncode_of(status: int) -> int:
    """A wait status as subprocess reports it: the exit code, or minus the signal number."""
    try:
        return os.waitstatus_to_exitcode(status)
    except ValueError:
        return -1


def kill_group(pgid: int | None, leader_alive: bool = True) -> None:
    """SIGKILL a process group and its leader (quietly, if they are gone).

    Once the leader has been reaped (``leader_alive`` false) only the group is signalled: its
    pid may belong to another process by now, but not while the group still has members.
    """
    if not pgid or pgid <= 1:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    if not leader_alive:
        return
    try:
        os.kill(pgid, signal.SIGKILL)
    except OSError:
        pass


def read_proc_stat(pid: str, proc: str = "/proc") -> tuple[int, int, int] | None:
    """(ppid, pgrp, session) of a process, from /proc/PID/stat."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return int(fields[1]), int(fields[2]), int(fields[3])
    except (OSError, ValueError, IndexError):
        return None


def descendants_in(procs: dict[int, tuple[int, int, int]], shell_pid: int) -> set[int]:
    """Every process of the shell's session/process group, or below the shell, but the shell
    (``procs``: pid -> (ppid, pgrp, session))."""
    found = {
        pid
        for pid, (_ppid, pgrp, sid) in procs.items()
        if pid != shell_pid and (pgrp == shell_pid or sid == shell_pid)
    }
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pgrp, _sid) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen = {shell_pid}
    todo = [shell_pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                found.add(child)
                todo.append(child)
    return found


def shell_descendants(shell_pid: int, proc: str = "/proc") -> set[int]:
    """``descendants_in`` over a scan of /proc/*/stat.

    /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN, which some kernels lack, so
    /proc is scanned (a container has few processes).  Orphans re-parented to tini are still
    found through their process group / session.
    """
    procs: dict[int, tuple[int, int, int]] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return set()
    for name in names:
        if name.isdigit():
            stat = read_proc_stat(name, proc)
            if stat is not None:
                procs[int(name)] = stat
    return descendants_in(procs, shell_pid)


def kill_shell_descendants(shell_pid: int | None) -> int:
    """SIGKILL all of ``shell_descendants``; returns how many were signalled."""
    if not shell_pid:
        return 0
    count = 0
    for pid in shell_descendants(shell_pid):
        try:
            os.kill(pid, signal.SIGKILL)
            count += 1
        except OSError:
            pass
    return count


def process_cwd(pid: int | None, readlink: Callable[[str], str] = os.readlink) -> str | None:
    """A process's working directory from /proc (None when unknown); ``readlink`` may read it
    with the process owner's filesystem uid (agent.spawn.UserIdentity.readlink)."""
    if not pid:
        return None
    try:
        return readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def shell_quote(text: str) -> str:
    """Single-quote ``text`` for bash/sh."""
    return "'" + text.replace("'", "'\\''") + "'"
