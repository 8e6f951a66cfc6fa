"""Starting user processes: the ONE place where the agent creates a process.

Every command and every session shell is started by ``start_process``: in a new session (and
so its own process group, pgid == pid, so the whole tree it starts can be killed with one
killpg), with exactly the environment and working directory given, stdin/stdout/stderr on
fresh pipes and no other inherited descriptor (every fd the agent opens is close-on-exec,
PEP 446).  By default it uses ``posix_spawn`` (``setsid`` flag), which does not copy the
agent's memory the way fork() does; ``AGENT_SPAWN=fork`` selects fork+exec instead.

Changes to how user processes start (another uid, ``oom_score_adj``, ...) belong here.

Identity: when the agent has a uid of its own (the image's ``agent``, started with the SETUID,
SETGID and KILL capabilities), every user process is started through the image's ``runas``
(``sandbox-image/runas.c``, a small static binary; ``setpriv`` where it is missing), which
changes to the ``sandbox`` user's uid and gid, drops the supplementary groups and clears every
capability set before it execs the command: user code runs with no capability at all and
cannot signal, ptrace or read the /proc entries of the agent.

The exec of that wrapper costs every command about 0.8 ms of CPU, so the wrapper runs once
instead: it starts the persistent spawner (``agent.spawner``, ``sandbox-image/spawner.c``) as
``sandbox`` with no capability, which forks every later user process as the agent's own child
(``clone(CLONE_PARENT)``) and execs it directly. When the spawner cannot be used (it was killed
or stopped by user code twice in a row, or is missing) the process is started through the
wrapper as before; ``AGENT_SPAWNER=off`` always uses the wrapper. ``AGENT_SPAWN`` (the method)
applies to the wrapper and same-uid paths.

And every user process gets ``oom_score_adj`` ``USER_OOM_SCORE_ADJ`` (the agent keeps its own,
normally 0), so that at the sandbox's memory limit the kernel's OOM killer picks user
code, not the agent: the agent raises its own value for the moment of the spawn (raising needs
no capability, nor does going back down to where it started) and the child inherits it.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import termios
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.spawner import SPAWNER, Spawner, SpawnerUnavailable

#: The user that runs commands and session shells.
SANDBOX_USER = "sandbox"
#: The image's exec wrapper (runas UID GID PROGRAM ARG...): a static binary, cheaper to exec
#: than setpriv, which is the fallback.
RUNAS = "/opt/agent/runas"
SETPRIV_CANDIDATES = ("/usr/bin/setpriv", "/bin/setpriv")
#: oom_score_adj of user processes.
USER_OOM_SCORE_ADJ = 500
OOM_SCORE_ADJ_PATH = "/proc/self/oom_score_adj"
#: Capability bits (linux/capability.h) needed to start processes as another user.
CAP_SETGID, CAP_SETUID = 6, 7


class IdentityError(Exception):
    """The agent runs under another uid than the sandbox user but cannot change to it."""


@dataclass(frozen=True)
class UserIdentity:
    """How user processes are started: as whom (an argv prefix) and how OOM-killable."""

    #: ``setpriv ... --`` when user processes change uid; empty when they run as the agent's.
    prefix: tuple[str, ...] = ()
    #: Given to user processes (None: left alone).
    oom_score_adj: int | None = None
    #: The agent's own value, restored after each spawn.
    agent_oom_score_adj: int = 0
    #: The user's uid and gid, when they are not the agent's.
    uid: int | None = None
    gid: int | None = None
    #: The persistent spawner that starts user processes without the wrapper (None: none).
    spawner: Spawner | None = field(default=None, compare=False, repr=False)

    def readlink(self, path: str) -> str:
        """``os.readlink`` with the user's filesystem uid and gid, for the /proc links of user
        processes (``/proc/PID/cwd``), which another uid may not read (SETUID allows it)."""
        if self.uid is None or self.gid is None:
            return os.readlink(path)
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        old_gid = libc.setfsgid(self.gid)
        old_uid = libc.setfsuid(self.uid)
        try:
            return os.readlink(path)
        finally:
            libc.setfsuid(old_uid)
            libc.setfsgid(old_gid)


def user_identity(
    environ: Mapping[str, str] | None = None, spawner_path: str = SPAWNER
) -> tuple[UserIdentity, pwd.struct_passwd | None]:
    """How this agent starts user processes, and the user they run as (its passwd entry).

    Raises IdentityError when the agent runs under another uid than ``sandbox`` but cannot
    change to it (no setpriv, or no SETUID/SETGID capability).
    """
    environ = os.environ if environ is None else environ
    oom = _read_oom_score_adj()
    raised = None if oom is None else max(USER_OOM_SCORE_ADJ, oom)
    try:
        sandbox = pwd.getpwnam(SANDBOX_USER)
    except KeyError:
        sandbox = None
    if sandbox is None or sandbox.pw_uid == os.getuid():
        try:
            own = pwd.getpwuid(os.getuid())
        except KeyError:
            own = None
        return UserIdentity(oom_score_adj=raised, agent_oom_score_adj=oom or 0), own
    if not _has_capabilities(CAP_SETUID, CAP_SETGID):
        raise IdentityError(
            f"the agent (uid {os.getuid()}) lacks CAP_SETUID/CAP_SETGID to start processes as "
            f"{SANDBOX_USER}; start the image as root (its supervisor drops privileges)"
        )
    prefix = wrapper_prefix(sandbox.pw_uid, sandbox.pw_gid)
    spawner = None
    if environ.get("AGENT_SPAWNER", "on") != "off" and os.access(spawner_path, os.X_OK):
        oom_pair = None if raised is None else (raised, oom or 0)
        spawner = Spawner(prefix, spawner_path, oom_score_adj=oom_pair)
    identity = UserIdentity(prefix, raised, oom or 0, sandbox.pw_uid, sandbox.pw_gid, spawner)
    return identity, sandbox


def wrapper_prefix(uid: int, gid: int, runas: str = RUNAS) -> tuple[str, ...]:
    """The argv prefix that execs a command as ``uid``/``gid`` without capabilities: the
    image's runas, else setpriv."""
    if os.access(runas, os.X_OK):
        return (runas, str(uid), str(gid))
    setpriv = next((p for p in SETPRIV_CANDIDATES if os.access(p, os.X_OK)), None)
    if setpriv is None:
        raise IdentityError(f"neither runas nor setpriv: cannot start processes as uid {uid}")
    return (
        setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--",
    )


def _read_oom_score_adj() -> int | None:
    try:
        with open(OOM_SCORE_ADJ_PATH) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _write_oom_score_adj(value: int) -> bool:
    try:
        with open(OOM_SCORE_ADJ_PATH, "w") as f:
            f.write(str(value))
        return True
    except OSError:
        return False


def _has_capabilities(*bits: int) -> bool:
    """Whether this process has these capabilities in its effective set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    effective = int(line.split()[1], 16)
                    return all(effective & (1 << bit) for bit in bits)
    except (OSError, ValueError, IndexError):
        pass
    return False


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
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    method: str = "posix_spawn",
    user: UserIdentity | None = None,
) -> Spawned:
    """Start ``argv`` in a new session with the given environment and cwd, as ``user`` (see
    UserIdentity: which uid, which oom_score_adj).

    Raises OSError when the process cannot be started (then no fd is left open).
    """
    user = user or UserIdentity()
    if user.spawner is not None:
        spawner = user.spawner
        try:
            return _start(lambda i, o, e: spawner.spawn(argv, env, cwd, (i, o, e)))
        except SpawnerUnavailable:
            pass  # it did not start the process: the wrapper does
    if user.prefix:
        argv = [*user.prefix, *argv]
    raised = user.oom_score_adj is not None and _write_oom_score_adj(user.oom_score_adj)
    launch = _fork_exec if method == "fork" else _posix_spawn
    try:
        return _start(lambda i, o, e: launch(argv, env, cwd, i, o, e))
    finally:
        if raised:
            _write_oom_score_adj(user.agent_oom_score_adj)


def start_on_terminal(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    terminal: int,
    user: UserIdentity | None = None,
) -> int:
    """Start ``argv`` as ``start_process`` does (same user, oom_score_adj, new session), but
    with stdin, stdout and stderr on ``terminal`` (a PTY's slave end, which the caller keeps
    and closes), made the new session's controlling terminal; return its pid.

    The spawner makes a terminal on fd 0 the controlling terminal (TIOCSCTTY) after its
    setsid; without the spawner the process is forked (posix_spawn has no TIOCSCTTY action)
    and does the same before it execs (the wrapper, when there is one: the terminal stays).
    """
    user = user or UserIdentity()
    if user.spawner is not None:
        try:
            return user.spawner.spawn(argv, env, cwd, (terminal, terminal, terminal))
        except SpawnerUnavailable:
            pass
    if user.prefix:
        argv = [*user.prefix, *argv]
    raised = user.oom_score_adj is not None and _write_oom_score_adj(user.oom_score_adj)
    try:
        return _fork_exec(argv, env, cwd, terminal, terminal, terminal, controlling=True)
    finally:
        if raised:
            _write_oom_score_adj(user.agent_oom_score_adj)


def _start(launch: Callable[[int, int, int], int]) -> Spawned:
    """New pipes for stdin/stdout/stderr, and ``launch(stdin, stdout, stderr)`` -> pid."""
    pipes: list[int] = []
    try:
        in_r, in_w = os.pipe()
        pipes += [in_r, in_w]
        out_r, out_w = os.pipe()
        pipes += [out_r, out_w]
        err_r, err_w = os.pipe()
        pipes += [err_r, err_w]
        pid = launch(in_r, out_w, err_w)
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


def _fork_exec(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    i: int,
    o: int,
    e: int,
    controlling: bool = False,
) -> int:
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
            if controlling:  # stdin is a terminal: make it this session's
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid
