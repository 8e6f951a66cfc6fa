"""Processes on a pseudo-terminal (``pty`` messages; issue 16).

A PTY is a process in the agent's process table like a background command (``proctable``):
it outlives the connection that started it, ``attach`` replays it from an offset and several
connections may watch it. What differs:

* its stdin, stdout and stderr are the slave end of a new pseudo-terminal, which is also its
  session's controlling terminal (``agent.spawn.start_on_terminal``: the same user, limits,
  environment and cwd rules as every user process), so line discipline, job control, Ctrl-C
  and window sizes work; ``TERM`` is ``xterm-256color``;
* the agent reads and writes the master end on its loop, like a pipe; what it reads is the
  one output stream ``pty`` of the process's log (raw bytes: a watcher decodes them with a
  carry-over of incomplete UTF-8 sequences, or sends them as binary frames);
* it has no timeout (it runs until it exits, is cancelled or signalled);
* reading pauses while every attached connection's send buffer is full (and at least one is
  attached): a terminal that nobody can keep up with blocks its writer, as a real one does;
  with nobody attached the log keeps moving.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from typing import Any

from agent.child import ChildProcess, Reaper
from agent.config import AgentConfig
from agent.procs import oom_kill_count
from agent.proctable import ProcessTable
from agent.runs import CommandRun, RunOwner
from agent.spawn import Spawned, start_on_terminal
from twistedgw import protocol

#: The terminal type user processes are told.
TERM = "xterm-256color"
#: The shell a PTY runs when its message names no command (started as a login shell).
LOGIN_SHELL = "/bin/bash"


def set_window_size(fd: int, cols: int, rows: int) -> None:
    """Set a terminal's size (the kernel sends SIGWINCH to its foreground process group)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def window_size(fd: int) -> tuple[int, int]:
    """A terminal's ``(cols, rows)``."""
    rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return cols, rows


def pty_argv(config: AgentConfig, command: str | None) -> tuple[list[str], str]:
    """The argv of a PTY's process and the command as listings show it."""
    if command is not None:
        return config.argv_for(command), command
    shell = LOGIN_SHELL if os.access(LOGIN_SHELL, os.X_OK) else config.shell
    return [shell, "-l"], f"{os.path.basename(shell)} -l"


class PtyRun(CommandRun):
    """A process on a new pseudo-terminal; its output goes to its process log only."""

    def __init__(
        self,
        spec: protocol.Pty,
        owner: RunOwner,
        timers: Any,
        config: AgentConfig,
        reaper: Reaper,
        cwd: str,
    ) -> None:
        self.argv, shown = pty_argv(config, spec.command)
        # As a background command: no output of its own kept, no result handed to a caller.
        command = protocol.Command(
            request_id=spec.request_id,
            command=shown,
            timeout=config.max_timeout,
            cwd=spec.cwd,
            env=spec.env,
            interactive=True,
            background=True,
        )
        super().__init__(command, owner, timers, config, reaper, cwd)
        self.pty_spec = spec
        self.master: int | None = None

    def _begin(self) -> None:
        """Its clock starts now; a PTY has no timeout."""
        self.started = self.timers.time()
        self._oom_kills_before = oom_kill_count()

    def start(self, loop: Any, table: ProcessTable | None = None) -> None:
        """Open the pseudo-terminal and start the process on it (raises OSError if it cannot
        be started), entered in the agent's process ``table``."""
        assert table is not None
        spec = self.pty_spec
        env = dict(self.config.child_env)
        env["TERM"] = TERM
        env.update(spec.env or {})
        self._begin()
        master, slave = os.openpty()  # both close-on-exec (PEP 446)
        try:
            set_window_size(master, spec.cols, spec.rows)
            pid = start_on_terminal(self.argv, env, self.cwd, slave, self.config.user)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        self.pid = pid
        entry = self.entry = table.add(pid, self.request_id, self.command, True, pty=True)
        entry.size = (spec.cols, spec.rows)
        entry.run = self
        # The master is read (as "stdout") and written (as "stdin") through a copy of its
        # fd each, so the loop's reader and writer are independent.
        writer = os.dup(master)
        os.set_blocking(writer, False)
        spawned = Spawned(pid=pid, stdin=writer, stdout=master, stderr=-1)
        self.child = ChildProcess(loop, self.reaper, spawned, self)

    # output ---------------------------------------------------------------------------------

    def capture(self, fd: int, data: bytes) -> None:
        if self.entry is not None:
            self.entry.write(protocol.PTY_STREAM, data)

    def update_reading(self) -> None:
        """Pause reading while every attached connection is paused (see the module doc)."""
        entry = self.entry
        if entry is None or self.child is None or self.finished or self.killed:
            return
        want = bool(entry.watchers) and all(w.owner.output_paused for w in entry.watchers)
        if want == self._reading_paused:
            return
        self._reading_paused = want
        if want:
            self.child.pause_reading()
        else:
            self.child.resume_reading()

    # control --------------------------------------------------------------------------------

    def resize(self, cols: int, rows: int) -> None:
        if self.child is not None and self.child.stdin_fd is not None:
            set_window_size(self.child.stdin_fd, cols, rows)
        if self.entry is not None:
            self.entry.size = (cols, rows)
