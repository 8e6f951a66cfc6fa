"""The protocol over the process model: one Connection per WebSocket, no socket in sight.

``Connection.handle(payload, is_binary)`` takes one WebSocket message and answers through the
``send`` callable it was given (encoded JSON text); ``set_output_paused`` is backpressure from
the socket, ``lost`` is the end of the connection.  ``Agent`` holds what connections share.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from agent import log, watches
from agent.child import Reaper
from agent.config import AgentConfig
from agent.proctable import ProcessEntry, ProcessTable, Watcher
from agent.pty import PtyRun
from agent.runs import CommandRun, RunBase, resolve_cwd
from agent.sessions import SessionManager, SessionRun
from twistedgw import protocol


class Agent:
    """What all connections share: config, loop, reaper, sessions, open connections."""

    def __init__(self, config: AgentConfig, loop: Any, reaper: Reaper | None = None) -> None:
        self.config = config
        self.loop = loop
        self.reaper = reaper if reaper is not None else Reaper(loop)
        self.limits = protocol.Limits(
            default_timeout=config.default_timeout, max_timeout=config.max_timeout
        )
        self.sessions = SessionManager(config, loop, self.reaper)
        self.connections: set[Connection] = set()
        self.table = ProcessTable(
            loop,
            config.log_size,
            config.result_retention,
            config.max_background,
            config.kept_log_bytes,
        )

    def connect(
        self,
        send: Callable[[bytes], None],
        peer: str = "?",
        send_binary: Callable[[bytes], None] | None = None,
    ) -> Connection:
        conn = Connection(self, send, peer, send_binary)
        self.connections.add(conn)
        return conn

    def kill_all(self) -> None:
        """Kill every running command and every session shell (at shutdown)."""
        for conn in list(self.connections):
            for run in list(conn.runs.values()):
                if isinstance(run, CommandRun):
                    run.kill()
        for entry in list(self.table.by_pid.values()):
            if entry.run is not None:
                entry.run.kill()
        self.sessions.kill_all()


class Connection:
    """One gateway connection: runs the commands it sends, replies with their results."""

    def __init__(
        self,
        agent: Agent,
        send: Callable[[bytes], None],
        peer: str,
        send_binary: Callable[[bytes], None] | None = None,
    ) -> None:
        self.agent = agent
        self._send = send
        #: Sends one binary frame (PTY output for clients that asked for it).
        self._send_binary = send_binary
        self.peer = peer
        self.runs: dict[str, RunBase] = {}
        self.open = True
        self.output_paused = False
        self.watchers: set[Watcher] = set()

    # from the socket ------------------------------------------------------------------------

    def handle(self, payload: bytes, is_binary: bool) -> None:
        """Handle one message; never raises, always answers what it cannot run."""
        try:
            message = protocol.parse_message(payload, is_binary, self.agent.limits)
        except protocol.ProtocolError as e:
            self.send_message(e.reply())
            return
        try:
            if isinstance(message, protocol.Command):
                self._command(message)
            elif isinstance(message, protocol.Cancel):
                self._cancel(message)
            elif isinstance(message, protocol.Stdin):
                self._stdin(message)
            elif isinstance(message, protocol.ListSessions):
                self.send_message(
                    protocol.sessions_message(message.request_id, self.agent.sessions.describe())
                )
            elif isinstance(message, protocol.Watch | protocol.Unwatch):
                watches.handle(self, message)
            elif isinstance(message, protocol.CloseSession):
                self._close_session(message)
            elif isinstance(message, protocol.Pty):
                self._pty(message)
            elif isinstance(message, protocol.Resize | protocol.TerminalInput):
                self._terminal(message)
            else:
                self._process_message(message)
        except protocol.ProtocolError as e:
            self.send_message(e.reply())
        except Exception:
            log.exception("error while handling a message from %s", self.peer)
            self.send_message(
                protocol.command_error(
                    getattr(message, "request_id", None),
                    getattr(message, "command", None),
                    "internal agent error handling the message",
                    "internal_error",
                )
            )

    def set_output_paused(self, paused: bool) -> None:
        """Backpressure: the socket's send buffer is full (True) or drained (False)."""
        if paused == self.output_paused:
            return
        self.output_paused = paused
        for run in list(self.runs.values()):
            run.set_paused(paused)
        if not paused:
            for watcher in list(self.watchers):
                watcher.pump()
        self._update_pty_reading()

    def _update_pty_reading(self) -> None:
        for watcher in list(self.watchers):
            if isinstance(watcher.entry.run, PtyRun):
                watcher.entry.run.update_reading()

    def lost(self) -> None:
        """The connection closed: its plain commands run on (their results are kept), but
        those sent with ``on_disconnect: kill``; its session commands run on unreported."""
        if not self.open:
            return
        self.open = False
        watches.drop(self)
        self.agent.connections.discard(self)
        self.agent.table.events.subscribers.discard(self)
        for watcher in list(self.watchers):
            watcher.cancel()
            watcher.entry.watchers.discard(watcher)
            if isinstance(watcher.entry.run, PtyRun):
                watcher.entry.run.update_reading()
        self.watchers.clear()
        for entry in self.agent.table.by_pid.values():
            if entry.writer is self:  # its takeover ends: any connection may write again
                entry.writer = None
        runs = list(self.runs.values())
        self.runs.clear()
        killed = 0
        for run in runs:
            if not isinstance(run, CommandRun):
                run.detach()
            elif run.spec.on_disconnect == protocol.ON_DISCONNECT_KILL:
                run.detach()
                run.kill()
                killed += 1
            else:
                run.orphan()
        log.info(
            "connection closed from %s, killed %d, left %d running",
            self.peer,
            killed,
            len(runs) - killed,
        )

    # messages -------------------------------------------------------------------------------

    def _command(self, spec: protocol.Command) -> None:
        config = self.agent.config
        rid = spec.request_id
        if rid in self.runs:
            raise spec.error("duplicate_request_id", f"request_id {rid!r} is already running")
        if len(self.runs) >= config.max_running:
            raise spec.error(
                "too_many_commands",
                f"too many commands on this connection (limit {config.max_running})",
            )
        table = self.agent.table
        if spec.background and table.unowned_running() >= config.max_background:
            raise spec.error(
                "too_many_commands",
                f"too many background processes (limit {config.max_background})",
            )
        try:
            cwd = resolve_cwd(config, spec.cwd)
        except ValueError as e:
            raise spec.error("invalid_cwd", str(e)) from None
        if spec.session is not None:
            run = SessionRun(spec, self, self.agent.loop, config, cwd if spec.cwd else None)
            self.runs[rid] = run
            if not self.agent.sessions.submit(spec.session, run):
                self.runs.pop(rid, None)
                raise spec.error(
                    "too_many_sessions", f"too many sessions (limit {config.max_sessions})"
                )
            return
        command = CommandRun(spec, self, self.agent.loop, config, self.agent.reaper, cwd)
        if not spec.background:
            self.runs[rid] = command
        try:
            command.start(self.agent.loop, table)
        except OSError as e:
            command.owner = None
            command.finished = True
            command.stop_timers()
            self.runs.pop(rid, None)
            raise spec.error("spawn_failed", f"could not start command: {e}") from None
        log.debug("started %s pid=%s", rid, command.pid)
        if spec.ack or spec.background:
            assert command.pid is not None
            extra = {"background": True} if spec.background else {}
            self.send_message(protocol.started_message(rid, command.pid, **extra))
        if spec.background:
            command.orphan()

    def _find(self, message: protocol.Cancel | protocol.Stdin) -> RunBase:
        run = self.runs.get(message.request_id)
        if run is None and isinstance(message, protocol.Cancel):
            # Any connection may cancel a running process by its request id.
            entry = self.agent.table.find(None, message.request_id)
            if entry is not None and entry.run is not None:
                run = entry.run
        if run is None:
            raise message.error(
                "unknown_request", f"no running command with request_id {message.request_id!r}"
            )
        return run

    def _cancel(self, message: protocol.Cancel) -> None:
        self._find(message).cancel()

    def _stdin(self, message: protocol.Stdin) -> None:
        if message.request_id not in self.runs:
            entry = self.agent.table.find(None, message.request_id)
            if entry is not None and entry.pty:
                if message.eof:
                    raise message.error(
                        "unsupported", "a PTY has no end of input; send Ctrl-D (byte 4) instead"
                    )
                self._pty_run(message, entry).write_stdin(message.data.encode("utf-8"))
                return
        run = self._find(message)
        if not isinstance(run, CommandRun) or not run.spec.interactive:
            raise message.error("not_interactive", "the command was not started with 'interactive'")
        if not run.stdin_open:
            if message.data or not message.eof:
                raise message.error("stdin_closed", "stdin is already closed")
            return
        if message.data:
            run.write_stdin(message.data.encode("utf-8"))
        if message.eof:
            run.close_stdin()

    def _close_session(self, message: protocol.CloseSession) -> None:
        if not self.agent.sessions.close(message.session):
            raise message.error("unknown_session", f"no session {message.session!r}")
        log.info("session %s closed by %s", message.session, self.peer)
        self.send_message(protocol.session_closed_message(message.request_id, message.session))

    # pseudo-terminals -----------------------------------------------------------------------

    def _pty(self, spec: protocol.Pty) -> None:
        agent = self.agent
        config, table = agent.config, agent.table
        rid = spec.request_id
        running = table.find(None, rid)
        if rid in self.runs or (running is not None and running.running):
            raise spec.error("duplicate_request_id", f"request_id {rid!r} is already running")
        if table.unowned_running() >= config.max_background:
            raise spec.error(
                "too_many_commands",
                f"too many background processes and PTYs (limit {config.max_background})",
            )
        if spec.binary and self._send_binary is None:
            raise spec.error("invalid_binary", "this connection cannot carry binary frames")
        try:
            cwd = resolve_cwd(config, spec.cwd)
        except ValueError as e:
            raise spec.error("invalid_cwd", str(e)) from None
        run = PtyRun(spec, self, agent.loop, config, agent.reaper, cwd)
        try:
            run.start(agent.loop, table)
        except OSError as e:
            run.owner = None
            run.finished = True
            raise spec.error("spawn_failed", f"could not start the PTY: {e}") from None
        entry = run.entry
        assert entry is not None and run.pid is not None
        log.debug("started PTY %s pid=%s", rid, run.pid)
        self.send_message(
            protocol.started_message(rid, run.pid, pty=True, cols=spec.cols, rows=spec.rows)
        )
        run.orphan()
        self._watch(entry, {protocol.PTY_STREAM: 0}, spec.binary)

    def _pty_run(
        self,
        message: protocol.Stdin | protocol.Resize | protocol.TerminalInput,
        entry: ProcessEntry,
    ) -> PtyRun:
        """The running PTY of ``entry``, if this connection may write to it."""
        if not entry.pty:
            raise message.error("not_a_pty", f"process {entry.pid} is not on a pseudo-terminal")
        if not entry.running or not isinstance(entry.run, PtyRun):
            raise message.error("not_running", f"process {entry.pid} has already exited")
        if entry.writer is not None and entry.writer is not self:
            raise message.error(
                "not_writer",
                f"another client took PTY {entry.pid} over; attach with 'takeover' to write",
            )
        return entry.run

    def _terminal(self, message: protocol.Resize | protocol.TerminalInput) -> None:
        entry = self.agent.table.find(message.pid, message.request_id)
        if entry is None:
            raise message.error(
                "unknown_process", f"no process with pid {message.pid} (running or kept)"
            )
        run = self._pty_run(message, entry)
        if isinstance(message, protocol.TerminalInput):
            run.write_stdin(message.data)
            return
        run.resize(message.cols, message.rows)
        self.send_message(
            {
                "type": "resized",
                "request_id": entry.request_id,
                "pid": entry.pid,
                "cols": message.cols,
                "rows": message.rows,
            }
        )

    def _watch(
        self,
        entry: ProcessEntry,
        since: dict[str, int],
        binary: bool,
        attached: dict[str, Any] | None = None,
    ) -> None:
        """Attach this connection to ``entry`` (after an ``attached`` reply with the fields
        of ``attached``, when given) and send what it has from ``since``."""
        watcher = Watcher(entry, self, since, self.agent.loop, binary)
        if attached is not None:
            self.send_message({**watcher.attached_message(), **attached})
        entry.watchers.add(watcher)
        self.watchers.add(watcher)
        if isinstance(entry.run, PtyRun):
            entry.run.update_reading()
        watcher.pump()

    # process handles ------------------------------------------------------------------------

    def _process_message(
        self,
        message: protocol.Attach | protocol.Processes | protocol.Signal | protocol.SubscribeEvents,
    ) -> None:
        table = self.agent.table
        if isinstance(message, protocol.Processes):
            self.send_message(protocol.processes_message(message.request_id, table.describe()))
            return
        if isinstance(message, protocol.SubscribeEvents):
            events = table.events
            for event in events.since(message.last_event_id):
                self.send_message(event)
            events.subscribers.add(self)
            return
        entry = table.find(message.pid, message.request_id)
        if entry is None:
            named = f"pid {message.pid}" if message.pid is not None else "request_id"
            raise message.error(
                "unknown_process",
                f"no process with {named} {message.request_id or ''}".rstrip()
                + " (running or kept)",
            )
        if isinstance(message, protocol.Signal):
            self._signal(message, entry)
            return
        if (message.takeover or message.binary) and not entry.pty:
            raise message.error(
                "not_a_pty",
                f"'takeover' and 'binary' are for PTYs; process {entry.pid} is not on one",
            )
        if message.binary and self._send_binary is None:
            raise message.error("invalid_binary", "this connection cannot carry binary frames")
        attached: dict[str, Any] = {}
        if message.takeover and entry.running:
            previous, entry.writer = entry.writer, self
            attached["takeover"] = True
            # Everyone else watching (and the previous writer) hears that its input now fails.
            others = {w.owner for w in entry.watchers} | ({previous} if previous else set())
            others.discard(self)
            for other in others:
                other.send_message(
                    {"type": "taken_over", "request_id": entry.request_id, "pid": entry.pid}
                )
        self._watch(entry, dict(message.since), message.binary, attached)

    def _signal(self, message: protocol.Signal, entry: ProcessEntry) -> None:
        if not entry.running:
            raise message.error("not_running", f"process {entry.pid} has already exited")
        try:
            os.killpg(entry.pid, protocol.SIGNALS[message.signal])
            delivered = True
        except OSError:
            delivered = False
        log.info("signal %s to process group %s by %s", message.signal, entry.pid, self.peer)
        self.send_message(
            {
                "type": "signalled",
                "request_id": entry.request_id,
                "pid": entry.pid,
                "signal": message.signal,
                "delivered": delivered,
            }
        )

    def watcher_done(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def send_binary(self, payload: bytes) -> None:
        """Send one binary frame, if the connection is still open."""
        if self.open and self._send_binary is not None:
            self._send_binary(payload)

    # RunOwner -------------------------------------------------------------------------------

    def run_done(self, run: RunBase, message: dict[str, Any]) -> None:
        if self.runs.get(run.request_id) is run:
            del self.runs[run.request_id]
        self.send_message(message)

    def send_message(self, message: dict[str, Any]) -> None:
        """Send one JSON text message, if the connection is still open."""
        if self.open:
            self._send(protocol.encode(message))
