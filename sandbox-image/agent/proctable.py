"""Process handles: the agent's table of plain commands, their bounded logs, kept results,
attached watchers and the process event log.

The table belongs to the agent, not to a connection, so a command outlives the WebSocket that
started it (and the gateway, which may be killed and restarted): ``attach`` and ``processes``
find it from any connection.

* ``RingLog``: one output stream of one process, the last ``cap`` bytes, addressed by absolute
  byte offsets; ``start`` counts the bytes dropped from the front.
* ``ProcessEntry``: one process (pid, request id, command, state, logs, result, watchers).
* ``Watcher``: one attached connection reading an entry's logs at its own cursors.  A watcher
  never holds the process back: when its connection's send buffer is full it stops sending,
  the log keeps moving, and when it resumes past the kept window it skips ahead and says how
  many bytes it missed (``dropped`` on the next ``output`` chunk).
* ``EventLog``: ``started`` / ``exited`` events with ids ``BOOT-SEQ`` for ``subscribe_events``.
* ``ProcessTable``: all of the above; forgets finished processes after ``result_retention``
  seconds, or sooner (oldest first) when their logs pass ``kept_log_bytes`` in all.
"""

from __future__ import annotations

import codecs
import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any, Protocol

from agent.capture import Timers
from twistedgw import protocol

#: Largest chunk of log a watcher sends in one ``output`` message.
WATCH_CHUNK = 64 * 1024
#: A watcher's new output goes out this long after the first unsent byte (coalescing).
WATCH_DELAY = 0.005
#: The same for a PTY: a keystroke's echo must not wait (what one turn of the loop reads
#: still goes out as one chunk) ...
PTY_WATCH_DELAY = 0.0
#: ... but within this long after a send of at least PTY_BURST_BYTES (a flood, not typing)
#: output is coalesced as other output is (WATCH_DELAY), into fewer and larger messages.
PTY_BURST_WINDOW = 0.005
PTY_BURST_BYTES = 2048
#: Finished processes kept at most, whatever their logs' size.
MAX_KEPT = 1024
#: Process events kept for ``subscribe_events`` replays.
MAX_EVENTS = 1024

RUNNING = "running"
EXITED = "exited"


class RingLog:
    """The last ``cap`` bytes of a stream; offsets count from the stream's first byte."""

    __slots__ = ("buf", "cap", "start")

    def __init__(self, cap: int) -> None:
        self.cap = max(0, cap)
        self.buf = bytearray()
        #: Offset of the oldest kept byte (= bytes dropped so far).
        self.start = 0

    @property
    def end(self) -> int:
        """Offset just past the newest byte (= bytes written so far)."""
        return self.start + len(self.buf)

    @property
    def dropped(self) -> int:
        return self.start

    def write(self, data: bytes) -> None:
        if not data:
            return
        if len(data) >= self.cap:
            self.start += len(self.buf) + len(data) - self.cap
            self.buf[:] = data[len(data) - self.cap :]
            return
        self.buf += data
        excess = len(self.buf) - self.cap
        if excess > 0:
            del self.buf[:excess]  # O(1) at the front of a bytearray
            self.start += excess

    def read(self, since: int, limit: int = WATCH_CHUNK) -> tuple[int, bytes]:
        """``(offset, data)``: up to ``limit`` bytes from ``since``, or from the oldest kept
        byte when ``since`` is before it; ``(end, b"")`` when ``since`` is at or past the end."""
        offset = max(since, self.start)
        if offset >= self.end:
            return self.end, b""
        i = offset - self.start
        return offset, bytes(self.buf[i : i + limit])

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


class WatchOwner(Protocol):
    """The connection a watcher sends on (the dispatcher's Connection)."""

    open: bool
    output_paused: bool

    def send_message(self, message: dict[str, Any]) -> None: ...

    def send_binary(self, payload: bytes) -> None: ...

    def watcher_done(self, watcher: Watcher) -> None: ...


class ProcessEntry:
    """One plain command's process, as the table keeps it."""

    def __init__(
        self,
        table: ProcessTable,
        pid: int,
        request_id: str,
        command: str,
        background: bool,
        log_size: int,
        pty: bool = False,
    ) -> None:
        self.table = table
        self.pid = pid
        self.request_id = request_id
        self.command = command
        self.background = background
        self.started_at = time.time()
        self.state = RUNNING
        self.returncode: int | None = None
        self.finished_at: float | None = None
        #: The result as ``attach`` sends it (output and error are in the logs).
        self.result: dict[str, Any] | None = None
        #: Whether a connection still receives the process's result (its owner).
        self.owned = not background
        self.stdout = RingLog(0 if pty else log_size)
        self.stderr = RingLog(0 if pty else log_size)
        self.logs = {"stdout": self.stdout, "stderr": self.stderr}
        #: A process on a pseudo-terminal has one stream, ``pty`` (its screen's bytes).
        self.pty = pty
        if pty:
            self.logs = {protocol.PTY_STREAM: RingLog(log_size)}
        #: PTYs: the window size, and the connection that took the PTY over (the only one
        #: whose input and resizes are taken; None: any connection's).
        self.size: tuple[int, int] | None = None
        self.writer: Any = None
        self.watchers: set[Watcher] = set()
        #: The run (``runs.CommandRun``) while the process runs: cancel, kill.
        self.run: Any = None

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def log_bytes(self) -> int:
        return sum(len(log.buf) for log in self.logs.values())

    def write(self, stream: str, data: bytes) -> None:
        self.logs[stream].write(data)
        if self.watchers:
            for watcher in self.watchers:
                watcher.schedule()

    def offsets(self) -> dict[str, int]:
        return {name: log.end for name, log in self.logs.items()}

    def dropped(self) -> dict[str, int]:
        return {name: log.dropped for name, log in self.logs.items()}

    def describe(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.pty:
            assert self.size is not None
            extra = {"pty": True, "cols": self.size[0], "rows": self.size[1]}
            extra["taken_over"] = self.writer is not None
        return {
            "pid": self.pid,
            "request_id": self.request_id,
            "command": protocol.shorten(self.command),
            "started_at": self.started_at,
            "state": self.state,
            "returncode": self.returncode,
            "background": self.background,
            "bytes": self.offsets(),
            "dropped": self.dropped(),
            "watchers": len(self.watchers),
            **extra,
        }


class Watcher:
    """One connection attached to one process: replay from a cursor, live output, result."""

    def __init__(
        self,
        entry: ProcessEntry,
        owner: WatchOwner,
        since: dict[str, int],
        timers: Timers,
        binary: bool = False,
    ) -> None:
        self.entry = entry
        self.owner = owner
        self.timers = timers
        #: Output as binary frames (PTYs; ``protocol.binary_output_frame``), not JSON.
        self.binary = binary
        self.cursor: dict[str, int] = {}
        self.text_offset: dict[str, int] = {}
        self.decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in entry.logs
        }
        #: Bytes skipped since the last chunk sent, per stream (reported on the next one).
        self.skipped: dict[str, int] = {}
        for name, log in entry.logs.items():
            # Beyond the end: start at the end. Before the window: the oldest kept byte.
            start = min(max(since.get(name, 0), log.start), log.end)
            self.skipped[name] = max(0, log.start - since.get(name, 0))
            self.cursor[name] = start
            self.text_offset[name] = start
        self._timer: Any = None
        self.done = False
        #: When this watcher's timer last sent output, and whether that was a burst (PTYs:
        #: typing or a flood, see PTY_BURST_WINDOW).
        self.last_sent = float("-inf")
        self.burst = False

    def attached_message(self) -> dict[str, Any]:
        entry = self.entry
        return {
            "type": "attached",
            "request_id": entry.request_id,
            "pid": entry.pid,
            "state": entry.state,
            "since": dict(self.cursor),
            "dropped": dict(self.skipped),
        }

    def schedule(self) -> None:
        if self._timer is None and not self.done:
            delay = WATCH_DELAY
            if self.entry.pty and not (
                self.burst and self.timers.time() - self.last_sent < PTY_BURST_WINDOW
            ):
                delay = PTY_WATCH_DELAY
            self._timer = self.timers.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        before = sum(self.cursor.values())
        self.pump()
        self.last_sent = self.timers.time()
        self.burst = sum(self.cursor.values()) - before >= PTY_BURST_BYTES

    def cancel(self) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pump(self) -> None:
        """Send what the connection has room for; the result once everything is sent."""
        owner = self.owner
        entry = self.entry
        while not self.done and owner.open and not owner.output_paused:
            sent = False
            for name, log in entry.logs.items():
                cursor = self.cursor[name]
                if cursor < log.start:  # fell behind the kept window
                    self.skipped[name] += log.start - cursor
                    self.decoders[name].reset()
                    cursor = self.text_offset[name] = log.start
                offset, data = log.read(cursor)
                if not data:
                    continue
                self.cursor[name] = offset + len(data)
                if self.binary:
                    self.skipped[name] = 0  # the frame's offset tells the gap
                    self.text_offset[name] = self.cursor[name]
                    owner.send_binary(protocol.binary_output_frame(entry.pid, offset, data))
                    sent = True
                    continue
                decoder = self.decoders[name]
                text = decoder.decode(data)
                chunk_offset = self.text_offset[name]
                self.text_offset[name] = self.cursor[name] - len(decoder.getstate()[0])
                if not text:
                    continue
                extra: dict[str, Any] = {"pid": entry.pid}
                if self.skipped[name]:
                    extra["dropped"] = self.skipped[name]
                    self.skipped[name] = 0
                owner.send_message(
                    protocol.output_message(entry.request_id, name, text, chunk_offset, **extra)
                )
                sent = True
            if not sent:
                break
        if self.done or not owner.open or owner.output_paused:
            return
        if entry.result is not None and all(
            self.cursor[name] >= log.end for name, log in entry.logs.items()
        ):
            for name, decoder in self.decoders.items():
                tail = decoder.decode(b"", True)
                if tail:
                    owner.send_message(
                        protocol.output_message(
                            entry.request_id, name, tail, self.text_offset[name], pid=entry.pid
                        )
                    )
            self.cancel()
            entry.watchers.discard(self)
            owner.send_message(dict(entry.result, dropped=entry.dropped()))
            owner.watcher_done(self)


class EventLog:
    """Process events with ids ``BOOT-SEQ`` (``BOOT`` changes when the agent restarts)."""

    def __init__(self, maxlen: int = MAX_EVENTS) -> None:
        self.boot = os.urandom(4).hex()
        self.seq = 0
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=maxlen)
        #: Connections that sent ``subscribe_events``.
        self.subscribers: set[Any] = set()

    def add(self, event: str, **fields: Any) -> None:
        self.seq += 1
        message = {
            "type": "event",
            "id": f"{self.boot}-{self.seq}",
            "event": event,
            "time": time.time(),
            **fields,
        }
        self.events.append((self.seq, message))
        for subscriber in list(self.subscribers):
            subscriber.send_message(message)

    def since(self, last_event_id: str | None) -> Iterator[dict[str, Any]]:
        """The kept events after ``last_event_id`` (all kept ones if it is from another boot
        of the agent, or unknown)."""
        after = 0
        if last_event_id:
            boot, _, number = last_event_id.partition("-")
            if boot == self.boot and number.isdigit():
                after = int(number)
        for seq, message in self.events:
            if seq > after:
                yield message


class ProcessTable:
    """The agent's processes by pid and request id, finished ones kept for a while."""

    def __init__(
        self,
        timers: Timers,
        log_size: int,
        retention: float,
        max_background: int,
        kept_log_bytes: int,
    ) -> None:
        self.timers = timers
        self.log_size = log_size
        self.retention = retention
        self.max_background = max_background
        self.kept_log_bytes = kept_log_bytes
        self.by_pid: dict[int, ProcessEntry] = {}
        self.by_request: dict[str, ProcessEntry] = {}
        #: Finished entries, oldest first.
        self.finished: OrderedDict[int, ProcessEntry] = OrderedDict()
        self.finished_bytes = 0
        self.events = EventLog()
        self._expiry: Any = None

    def add(
        self, pid: int, request_id: str, command: str, background: bool, pty: bool = False
    ) -> ProcessEntry:
        old = self.by_pid.get(pid)
        if old is not None:  # a kept entry of a process whose pid was reused
            self._forget(old)
        entry = ProcessEntry(self, pid, request_id, command, background, self.log_size, pty)
        self.by_pid[pid] = entry
        self.by_request[request_id] = entry
        self.events.add(
            "started",
            pid=pid,
            request_id=request_id,
            command=protocol.shorten(command),
            background=background,
        )
        return entry

    def unowned_running(self) -> int:
        """Running processes no connection waits on (background, yielded, orphaned)."""
        return sum(1 for e in self.by_pid.values() if e.running and not e.owned)

    def running(self) -> int:
        return sum(1 for e in self.by_pid.values() if e.running)

    def find(self, pid: int | None, request_id: str | None) -> ProcessEntry | None:
        if pid is not None:
            entry = self.by_pid.get(pid)
            if entry is not None and (request_id is None or entry.request_id == request_id):
                return entry
            return None
        return self.by_request.get(request_id) if request_id is not None else None

    def exited(self, entry: ProcessEntry, result: dict[str, Any]) -> None:
        """The process ended with ``result``: keep it, tell watchers and subscribers."""
        entry.state = EXITED
        entry.returncode = result.get("returncode")
        entry.finished_at = self.timers.time()
        kept = dict(result, output="", error="", truncated=False, pid=entry.pid)
        entry.result = kept
        entry.run = None
        if self.by_pid.get(entry.pid) is entry:
            self.finished[entry.pid] = entry
            self.finished_bytes += entry.log_bytes
        self.events.add(
            "exited",
            pid=entry.pid,
            request_id=entry.request_id,
            returncode=entry.returncode,
            timed_out=bool(result.get("timed_out")),
            cancelled=bool(result.get("cancelled")),
        )
        for watcher in list(entry.watchers):
            watcher.schedule()
        self.expire()

    def expire(self) -> None:
        """Forget finished entries past their retention, and the oldest past the budgets."""
        now = self.timers.time()
        while self.finished:
            entry = next(iter(self.finished.values()))
            assert entry.finished_at is not None
            over = (
                len(self.finished) > MAX_KEPT
                or self.finished_bytes > self.kept_log_bytes
                or now - entry.finished_at >= self.retention
            )
            if not over:
                break
            self._forget(entry)
        # One timer, for the oldest kept entry (later ones finished later). It is not moved
        # when that entry goes early: firing early just looks again. (Re-arming per command
        # would leave a cancelled handle per command in the loop's heap for the retention.)
        if self._expiry is None and self.finished:
            entry = next(iter(self.finished.values()))
            assert entry.finished_at is not None
            delay = entry.finished_at + self.retention - now
            self._expiry = self.timers.call_later(max(0.0, delay) + 0.01, self._on_expiry)

    def _on_expiry(self) -> None:
        self._expiry = None
        self.expire()

    def _forget(self, entry: ProcessEntry) -> None:
        if self.by_pid.get(entry.pid) is entry:
            del self.by_pid[entry.pid]
        if self.by_request.get(entry.request_id) is entry:
            del self.by_request[entry.request_id]
        if self.finished.get(entry.pid) is entry:
            del self.finished[entry.pid]
            self.finished_bytes -= entry.log_bytes

    def describe(self) -> list[dict[str, Any]]:
        return [e.describe() for e in sorted(self.by_pid.values(), key=lambda e: e.started_at)]
