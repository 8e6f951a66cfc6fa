"""Sessions: named persistent shells that run their commands one at a time, with markers."""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

from agent import log
from agent.capture import Timers
from agent.child import ChildProcess, Reaper
from agent.config import AgentConfig
from agent.procs import (
    KILLED_RETURNCODE,
    kill_group,
    kill_shell_descendants,
    process_cwd,
    shell_quote,
)
from agent.runs import PIPE_GRACE, RunBase, RunOwner
from agent.spawn import start_process
from twistedgw import protocol

#: Session kill procedure: kill the shell's children every KILL_TICK s, for KILL_WINDOW s.
SESSION_KILL_TICK = 0.1
SESSION_KILL_WINDOW = 1.0


class MarkerScanner:
    """Finds and strips the end-of-command marker in one of a session shell's streams.

    The marker is ``prefix`` (``\\x1eTGW:NONCE\\x1e`` on stderr), or ``prefix`` + digits +
    ``\\x1e`` (``prefix`` = ``\\x1eTGW:NONCE:``) on stdout.  A marker may be split across reads,
    so a tail that could be its beginning is held back until the next read.
    """

    MAX_CODE_CHARS = 12

    def __init__(self, prefix: bytes, with_code: bool) -> None:
        self.prefix = prefix
        self.with_code = with_code
        self.held = b""
        self.found = False
        self.code: int | None = None

    def feed(self, data: bytes) -> bytes:
        """Take one read; return the bytes that belong to the command's output."""
        if self.found:
            return b""  # after the marker: output of background jobs, between commands
        buf = self.held + data if self.held else data
        self.held = b""
        i = buf.find(self.prefix)
        if i >= 0:
            if not self.with_code:
                self.found = True
                return buf[:i]
            start = i + len(self.prefix)
            j = buf.find(b"\x1e", start)
            if j < 0 and len(buf) - start <= self.MAX_CODE_CHARS:
                self.held = buf[i:]
                return buf[:i]
            try:
                self.code = int(buf[start:j]) if j >= 0 else -1
            except ValueError:
                self.code = -1
            self.found = True
            return buf[:i]
        k = buf.find(b"\x1e", max(0, len(buf) - len(self.prefix) + 1))
        while k >= 0:
            if self.prefix.startswith(buf[k:]):
                self.held = buf[k:]
                return buf[:k]
            k = buf.find(b"\x1e", k + 1)
        return buf

    def take_held(self) -> bytes:
        held, self.held = self.held, b""
        return held


class SessionRun(RunBase):
    """A command run by a session's shell; finished when both end markers have been seen."""

    def __init__(
        self,
        spec: protocol.Command,
        owner: RunOwner,
        timers: Timers,
        config: AgentConfig,
        cwd: str | None,
    ) -> None:
        super().__init__(spec, owner, timers, config)
        self.cwd = cwd
        self.session: Session | None = None
        self.nonce = os.urandom(12).hex().encode("ascii")
        self.out_scan = MarkerScanner(b"\x1eTGW:" + self.nonce + b":", with_code=True)
        self.err_scan = MarkerScanner(b"\x1eTGW:" + self.nonce + b"\x1e", with_code=False)
        self.stdin_path: str | None = None
        self.running = False

    def script(self) -> bytes:
        """What is written to the shell's stdin to run this command (writes the stdin file)."""
        if self.spec.stdin is not None:
            import tempfile  # only here: it costs ~1 MiB of the agent's idle memory

            fd, path = tempfile.mkstemp(prefix=".agent-stdin-")
            self.stdin_path = path
            # The shell reads it as the sandbox user (the agent may have a uid of its own).
            os.fchmod(fd, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self.spec.stdin.encode("utf-8"))
            except BaseException:
                self._remove_stdin_file()
                raise
        steps = []
        if self.cwd is not None:
            steps.append(f"builtin cd -- {shell_quote(self.cwd)}")
        for key, value in (self.spec.env or {}).items():
            steps.append(f"builtin export {key}={shell_quote(value)}")
        steps.append(f"builtin eval {shell_quote(self.command)}")
        source = shell_quote(self.stdin_path) if self.stdin_path else "/dev/null"
        nonce = self.nonce.decode("ascii")
        text = (
            "{ " + " &&\n".join(steps) + f"\n}} < {source}\n"
            f"__tgw_rc=$?; builtin printf '\\036TGW:{nonce}:%d\\036' \"$__tgw_rc\"; "
            f"builtin printf '\\036TGW:{nonce}\\036' >&2\n"
        )
        return text.encode("utf-8")

    def begin(self) -> None:
        self.running = True
        self._begin()

    def on_shell_data(self, fd: int, data: bytes) -> bool:
        """Output of the shell while this command runs; True once both markers were seen."""
        if fd == 1:
            self.capture(1, self.out_scan.feed(data))
        elif fd == 2:
            self.capture(2, self.err_scan.feed(data))
        return self.out_scan.found and self.err_scan.found

    @property
    def marker_code(self) -> int:
        code = self.out_scan.code
        return code if code is not None else -1

    def complete(self, returncode: int, restarted: bool = False) -> None:
        """The command is over (markers seen, shell gone, session closed...)."""
        if self.finished:
            return
        # Bytes held back as a possible marker beginning were output after all.
        self.capture(1, self.out_scan.take_held())
        self.capture(2, self.err_scan.take_held())
        self.session_restarted = restarted
        self._remove_stdin_file()
        self.finish(returncode)

    def fail(self, message: str, code: str) -> None:
        self._remove_stdin_file()
        super().fail(message, code)

    def _remove_stdin_file(self) -> None:
        if self.stdin_path:
            try:
                os.unlink(self.stdin_path)
            except OSError:
                pass
            self.stdin_path = None

    def interrupt(self) -> None:
        if self.session is not None:
            self.session.interrupt(self)
        else:
            self.complete(KILLED_RETURNCODE)

    def set_paused(self, paused: bool) -> None:
        if self.session is not None and self.spec.stream:
            self.session.run_paused(self, paused)


class Session:
    """A named persistent shell and the queue of commands it runs one at a time."""

    def __init__(self, name: str, manager: SessionManager) -> None:
        self.name = name
        self.manager = manager
        self.timers = manager.timers
        self.config = manager.config
        self.shell: ChildProcess | None = None
        self.pid: int | None = None
        self.created_at = time.time()
        self.queue: deque[SessionRun] = deque()
        self.current: SessionRun | None = None
        self.closed = False
        self._kill_call: Any = None
        self._kill_deadline = 0.0
        self._exit_grace_call: Any = None

    # shell ----------------------------------------------------------------------------------

    def _spawn(self) -> None:
        config = self.config
        spawned = start_process(
            config.session_argv(),
            dict(config.child_env),
            config.cwd,
            config.spawn_method,
            config.user,
        )
        self.shell = ChildProcess(
            self.manager.loop, self.manager.reaper, spawned, _ShellHandler(self, spawned.pid)
        )
        self.pid = spawned.pid
        self.created_at = time.time()
        log.info("session %s: shell started, pid %s", self.name, self.pid)

    def _discard_shell(self) -> None:
        """Kill the shell's whole process group and forget it (its late events are ignored)."""
        shell, self.shell, self.pid = self.shell, None, None
        self._cancel_exit_grace()
        if shell is not None:
            kill_group(shell.pid, leader_alive=not shell.exited)
            shell.close_pipes()

    def shell_data(self, pid: int, fd: int, data: bytes) -> None:
        if self.shell is None or pid != self.shell.pid or self.current is None:
            return  # an old shell, or background output between commands
        run = self.current
        if run.on_shell_data(fd, data) and self.current is run:
            self._complete_current(run.marker_code)

    def shell_exited(self, pid: int, returncode: int) -> None:
        if self.shell is None or pid != self.shell.pid:
            return
        log.info("session %s: shell %s exited (%s)", self.name, pid, returncode)
        if self._exit_grace_call is None:
            self._exit_grace_call = self.timers.call_later(PIPE_GRACE, self._exit_grace, pid)

    def _exit_grace(self, pid: int) -> None:
        self._exit_grace_call = None
        if self.shell is None or pid != self.shell.pid:
            return
        if self.shell.paused:
            self._exit_grace_call = self.timers.call_later(PIPE_GRACE, self._exit_grace, pid)
            return
        self.shell.close_pipes()

    def _cancel_exit_grace(self) -> None:
        if self._exit_grace_call is not None:
            self._exit_grace_call.cancel()
            self._exit_grace_call = None

    def shell_ended(self, pid: int, returncode: int) -> None:
        """The shell is gone and its pipes are closed: finish the current command with its
        exit status; later commands get a new shell."""
        if self.shell is None or pid != self.shell.pid:
            return
        self._cancel_exit_grace()
        self.shell = None
        self.pid = None
        if self.current is not None:
            self._complete_current(returncode)
        else:
            self._advance()

    # commands -------------------------------------------------------------------------------

    def submit(self, run: SessionRun) -> None:
        run.session = self
        self.queue.append(run)
        self._advance()

    def _advance(self) -> None:
        """Start the next queued command if the shell is free."""
        if self.shell is not None and self.shell.exited:
            return  # shell_ended() comes next and starts a new shell
        while self.current is None and self.queue and not self.closed:
            run = self.queue.popleft()
            if run.finished:
                continue
            try:
                if self.shell is None:
                    self._spawn()
                script = run.script()
            except Exception as e:
                log.exception("session %s: could not start a command", self.name)
                run.fail(f"could not start the session command: {e}", "spawn_failed")
                continue
            assert self.shell is not None
            self.current = run
            run.begin()
            self.shell.write(script)
            if run.spec.stream and run.owner is not None and run.owner.output_paused:
                self.shell.pause_reading()
        if self.current is None and not self.queue and self.shell is None:
            self.manager.forget(self)

    def _complete_current(self, returncode: int, restarted: bool = False) -> None:
        run = self.current
        self.current = None
        self._stop_kill_loop()
        if self.shell is not None:
            self.shell.resume_reading()
        if run is not None:
            run.complete(returncode, restarted)
        self._advance()

    def interrupt(self, run: SessionRun) -> None:
        """Timeout / cancel / output limit of ``run``."""
        if run is not self.current:
            if run in self.queue:
                self.queue.remove(run)
                run.complete(-1)  # never started
            return
        run.killed = True
        if self.shell is not None:
            self.shell.resume_reading()  # the markers must get through
        if self._kill_call is None:
            self._kill_deadline = self.timers.time() + SESSION_KILL_WINDOW
            self._kill_tick()

    def _kill_tick(self) -> None:
        self._kill_call = None
        if self.current is None or self.shell is None:
            return
        n = kill_shell_descendants(self.pid)
        log.debug("session %s: killed %d processes", self.name, n)
        if self.timers.time() >= self._kill_deadline:
            self._restart()
            return
        self._kill_call = self.timers.call_later(SESSION_KILL_TICK, self._kill_tick)

    def _stop_kill_loop(self) -> None:
        if self._kill_call is not None:
            self._kill_call.cancel()
            self._kill_call = None

    def _restart(self) -> None:
        """The shell did not come back: replace it with a fresh one under the same name."""
        log.info("session %s: shell %s unresponsive, restarting", self.name, self.pid)
        self._discard_shell()
        try:
            self._spawn()
        except Exception:
            log.exception("session %s: could not restart the shell", self.name)
        self._complete_current(KILLED_RETURNCODE, restarted=True)

    def close(self) -> None:
        """close_session: kill the shell, cancel the running and queued commands."""
        self.closed = True
        self._stop_kill_loop()
        self._discard_shell()
        runs = ([self.current] if self.current is not None else []) + list(self.queue)
        self.current = None
        self.queue.clear()
        for run in runs:
            run.cancelled = True
            if run.running:
                run.killed = True
            run.complete(KILLED_RETURNCODE if run.running else -1)
        self.manager.forget(self)

    # backpressure ---------------------------------------------------------------------------

    def run_paused(self, run: SessionRun, paused: bool) -> None:
        if run is self.current and not run.killed and self.shell is not None:
            if paused:
                self.shell.pause_reading()
            else:
                self.shell.resume_reading()

    def describe(self) -> dict[str, Any]:
        return {
            "session": self.name,
            "busy": self.current is not None,
            "queued": len(self.queue),
            "pid": self.pid,
            "created_at": self.created_at,
            "cwd": process_cwd(self.pid, self.config.user.readlink),
        }


class _ShellHandler:
    """The process side of a session's shell; everything goes to the Session with the pid."""

    def __init__(self, session: Session, pid: int) -> None:
        self.session = session
        self.pid = pid

    def child_data(self, fd: int, data: bytes) -> None:
        self.session.shell_data(self.pid, fd, data)

    def child_exited(self, returncode: int) -> None:
        self.session.shell_exited(self.pid, returncode)

    def child_ended(self, returncode: int) -> None:
        self.session.shell_ended(self.pid, returncode)


class SessionManager:
    """The agent's sessions by name (shared by all connections)."""

    def __init__(self, config: AgentConfig, loop: Any, reaper: Reaper) -> None:
        self.config = config
        self.loop = loop
        self.timers: Timers = loop
        self.reaper = reaper
        self.sessions: dict[str, Session] = {}

    def submit(self, name: str, run: SessionRun) -> bool:
        """Queue ``run`` in session ``name`` (created on first use); False if too many."""
        session = self.sessions.get(name)
        if session is None:
            if len(self.sessions) >= self.config.max_sessions:
                return False
            session = Session(name, self)
            self.sessions[name] = session
        session.submit(run)
        return True

    def forget(self, session: Session) -> None:
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]

    def close(self, name: str) -> bool:
        session = self.sessions.get(name)
        if session is None:
            return False
        session.close()
        return True

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in sorted(self.sessions.values(), key=lambda s: s.name)]

    def kill_all(self) -> None:
        for session in list(self.sessions.values()):
            kill_group(session.pid)
