"""Runs: what a command has in common, plain or in a session, and the plain command."""

from __future__ import annotations

import os
from typing import Any, Protocol

from agent import log
from agent.capture import StreamCapture, Timers
from agent.child import ChildProcess, Reaper
from agent.config import AgentConfig
from agent.procs import KILLED_RETURNCODE, kill_group, oom_kill_count
from agent.proctable import ProcessEntry, ProcessTable
from agent.spawn import start_process
from twistedgw import protocol

#: After the main process exits, how long background holders may keep the pipes open.
PIPE_GRACE = 0.5
OOM_NOTE = "\n[killed: out of memory (sandbox memory limit)]\n"


class RunOwner(Protocol):
    """What a run needs from its connection (the dispatcher implements it)."""

    output_paused: bool

    def send_message(self, message: dict[str, Any]) -> None: ...

    def run_done(self, run: RunBase, message: dict[str, Any]) -> None: ...


class RunBase:
    """One request: its options, output capture, timers and final result."""

    def __init__(
        self, spec: protocol.Command, owner: RunOwner, timers: Timers, config: AgentConfig
    ) -> None:
        self.spec = spec
        self.request_id = spec.request_id
        self.command = spec.command
        self.owner: RunOwner | None = owner
        self.timers = timers
        self.config = config
        emit = self._emit_chunk if spec.stream and not spec.background else None
        # A background command's output lives only in its process log (see ``proctable``).
        max_output = 0 if spec.background else config.max_output
        kill_output = 0 if spec.background else config.kill_output
        for name in ("stdout", "stderr"):
            capture = StreamCapture(name, max_output, kill_output, self._output_limit, emit, timers)
            setattr(self, name, capture)
        self.stdout: StreamCapture
        self.stderr: StreamCapture
        self.started = timers.time()
        self.finished = False
        self.killed = False
        self.timed_out = False
        self.cancelled = False
        self.output_limit_exceeded = False
        self.session_restarted = False
        self._timeout_call: Any = None
        self._oom_kills_before: int | None = None
        #: The process table's entry (plain commands only, once started).
        self.entry: ProcessEntry | None = None
        self.pid: int | None = None
        self._yield_call: Any = None

    # lifecycle ------------------------------------------------------------------------------

    def _begin(self) -> None:
        """The command starts now: start its clock and its timeout."""
        self.started = self.timers.time()
        self._oom_kills_before = oom_kill_count()
        self._timeout_call = self.timers.call_later(self.spec.timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timeout_call = None
        if not self.finished:
            self.timed_out = True
            self.interrupt()

    def _output_limit(self) -> None:
        if not self.finished:
            self.output_limit_exceeded = True
            self.interrupt()

    def cancel(self) -> None:
        """The client asked to cancel."""
        if not self.finished:
            self.cancelled = True
            self.interrupt()

    def interrupt(self) -> None:
        """Kill the command (timeout, cancel, output limit)."""
        raise NotImplementedError

    def set_paused(self, paused: bool) -> None:
        """The connection's send buffer is full (True) or drained (False)."""

    def detach(self) -> None:
        """The connection closed: drop output and result from now on."""
        self.owner = None
        self.set_paused(False)

    # output ---------------------------------------------------------------------------------

    def capture(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.stdout.write(data)
            if self.entry is not None:
                self.entry.write("stdout", data)
        elif fd == 2:
            self.stderr.write(data)
            if self.entry is not None:
                self.entry.write("stderr", data)

    def _emit_chunk(self, stream: str, text: str) -> None:
        if self.owner is not None:
            offset = getattr(self, stream).chunk_offset
            self.owner.send_message(protocol.output_message(self.request_id, stream, text, offset))

    def stop_timers(self) -> None:
        if self._timeout_call is not None:
            self._timeout_call.cancel()
            self._timeout_call = None
        if self._yield_call is not None:
            self._yield_call.cancel()
            self._yield_call = None

    def finish(self, returncode: int) -> None:
        """Build the result (flushing streamed output first) and hand it to the owner."""
        if self.finished:
            return
        self.finished = True
        self.stop_timers()
        self.stdout.finish()
        self.stderr.finish()
        if self.killed:
            returncode = KILLED_RETURNCODE
        extra: dict[str, Any] = {}
        error = self.stderr.text()
        if self.output_limit_exceeded:
            extra["output_limit_exceeded"] = True
        if not self.killed and returncode == KILLED_RETURNCODE:
            # SIGKILL that we did not send: the kernel's OOM killer if its count went up.
            after = oom_kill_count()
            before = self._oom_kills_before
            if after is not None and before is not None and after > before:
                extra["oom_killed"] = True
                error += OOM_NOTE
        if self.spec.session is not None:
            extra["session"] = self.spec.session
        if self.session_restarted:
            extra["session_restarted"] = True
        entry = self.entry
        if entry is not None:
            extra["pid"] = entry.pid
            if any(entry.dropped().values()):
                extra["dropped"] = entry.dropped()
        result = protocol.result_message(
            self.request_id,
            self.command,
            returncode,
            output=self.stdout.text(),
            error=error,
            duration_ms=round((self.timers.time() - self.started) * 1000.0, 3),
            truncated=self.stdout.truncated or self.stderr.truncated or self.output_limit_exceeded,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
            **extra,
        )
        log.debug(
            "finished %s rc=%s in %.1f ms", self.request_id, returncode, result["duration_ms"]
        )
        if entry is not None:
            entry.table.exited(entry, result)
        self._hand_over(result)

    def fail(self, message: str, code: str) -> None:
        """The command could not be started: reply an error instead of a result."""
        if self.finished:
            return
        self.finished = True
        self.stop_timers()
        self.stdout.cancel()
        self.stderr.cancel()
        reply = protocol.command_error(self.request_id, self.command, message, code)
        if self.spec.session is not None:
            reply["session"] = self.spec.session
        self._hand_over(reply)

    def _hand_over(self, message: dict[str, Any]) -> None:
        owner = self.owner
        if owner is None:
            return
        try:
            owner.run_done(self, message)
        except Exception:
            log.exception("result handler failed for %s", self.request_id)


class CommandRun(RunBase):
    """A shell command in its own process group, and its captured output.

    The result is handed over once the process has exited and its pipes are closed, or
    PIPE_GRACE after it exited while background processes still hold the pipes.
    """

    def __init__(
        self,
        spec: protocol.Command,
        owner: RunOwner,
        timers: Timers,
        config: AgentConfig,
        reaper: Reaper,
        cwd: str,
    ) -> None:
        super().__init__(spec, owner, timers, config)
        self.reaper = reaper
        self.cwd = cwd
        self.child: ChildProcess | None = None
        self._reading_paused = False
        self._grace_call: Any = None

    def start(self, loop: Any, table: ProcessTable | None = None) -> None:
        """Spawn the process (raises OSError if it cannot be started) and, given the agent's
        process ``table``, enter it there."""
        env = dict(self.config.child_env)
        env.update(self.spec.env or {})
        self._begin()
        config = self.config
        spawned = start_process(
            config.argv_for(self.command), env, self.cwd, config.spawn_method, config.user
        )
        self.pid = spawned.pid
        if table is not None:
            spec = self.spec
            self.entry = table.add(spawned.pid, self.request_id, self.command, spec.background)
            self.entry.run = self
            if spec.yield_after is not None and not spec.background:
                self._yield_call = self.timers.call_later(spec.yield_after, self._yield)
        self.child = ChildProcess(loop, self.reaper, spawned, self)
        if self.spec.stdin:
            self.child.write(self.spec.stdin.encode("utf-8"))
        if not self.spec.interactive:
            self.child.close_stdin()
        if self.owner is not None and self.owner.output_paused:
            self.set_paused(True)

    @property
    def stdin_open(self) -> bool:
        return self.child is not None and self.child.stdin_open

    # ownership ------------------------------------------------------------------------------

    def orphan(self) -> None:
        """No connection waits on this command any more (background, yielded, or its
        connection closed): it runs on into its process log, its result is kept."""
        self.detach()
        self.stdout.detach()
        self.stderr.detach()
        if self.entry is not None:
            self.entry.owned = False
        if self._yield_call is not None:
            self._yield_call.cancel()
            self._yield_call = None

    def _yield(self) -> None:
        """``yield_after`` passed: answer with the output so far; the command runs on."""
        self._yield_call = None
        owner, entry = self.owner, self.entry
        if self.finished or owner is None or entry is None:
            return
        message = protocol.yielded_message(
            self.request_id,
            entry.pid,
            entry.logs["stdout"].text(),
            entry.logs["stderr"].text(),
            entry.offsets(),
        )
        self.orphan()
        try:
            owner.run_done(self, message)
        except Exception:
            log.exception("yield handler failed for %s", self.request_id)

    # ChildHandler ---------------------------------------------------------------------------

    def child_data(self, fd: int, data: bytes) -> None:
        self.capture(fd, data)

    def child_exited(self, returncode: int) -> None:
        """The main process is gone; give holders of its pipes PIPE_GRACE to let go."""
        if not self.finished and self._grace_call is None:
            self._grace_call = self.timers.call_later(PIPE_GRACE, self._grace_expired)

    def _grace_expired(self) -> None:
        self._grace_call = None
        if self.finished or self.child is None:
            return
        if self._reading_paused:  # the gateway is not reading: do not drop unread output
            self._grace_call = self.timers.call_later(PIPE_GRACE, self._grace_expired)
            return
        log.debug("%s: pipes still open after exit, closing", self.request_id)
        self.child.close_pipes()

    def child_ended(self, returncode: int) -> None:
        if self._grace_call is not None:
            self._grace_call.cancel()
            self._grace_call = None
        self.finish(returncode)

    # control --------------------------------------------------------------------------------

    def write_stdin(self, data: bytes) -> None:
        if self.child is not None:
            self.child.write(data)

    def close_stdin(self) -> None:
        if self.child is not None:
            self.child.close_stdin()

    def set_paused(self, paused: bool) -> None:
        want = paused and self.spec.stream and not self.killed and not self.finished
        if want == self._reading_paused or self.child is None:
            return
        self._reading_paused = want
        if want:
            self.child.pause_reading()
        else:
            self.child.resume_reading()

    def interrupt(self) -> None:
        self.kill()

    def kill(self) -> None:
        """SIGKILL the command's whole process group (no-op once it has ended)."""
        if self.finished or self.pid is None or self.child is None:
            return
        self.killed = True
        kill_group(self.pid, leader_alive=not self.child.exited)
        # Read what is left (at most a pipe buffer each) so that the result comes promptly.
        self.set_paused(False)


def resolve_cwd(config: AgentConfig, cwd: str | None) -> str:
    """The directory a command runs in; raises ValueError with the reason when unusable."""
    if cwd is None:
        return config.cwd
    path = os.path.normpath(os.path.join(config.home, cwd))
    if not os.path.isdir(path):
        raise ValueError(f"cwd {cwd!r} is not an existing directory")
    if not os.access(path, os.X_OK):
        raise ValueError(f"cwd {cwd!r} is not accessible")
    return path
