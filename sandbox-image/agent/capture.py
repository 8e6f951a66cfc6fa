"""Output capture: a head+tail capped buffer, and coalesced chunks for streamed commands.

Timers go through an injected ``Timers`` object (an asyncio loop in the agent, a fake clock in
tests), so nothing here reads the wall clock.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any, Protocol

#: Streamed output: flush a stream's pending bytes at this size, or this long after the first
#: unsent byte.
STREAM_FLUSH_BYTES = 64 * 1024
STREAM_FLUSH_DELAY = 0.005


class Handle(Protocol):
    """A scheduled call (asyncio.TimerHandle has this shape)."""

    def cancel(self) -> None: ...


class Timers(Protocol):
    """What the agent needs of an event loop's clock (asyncio's loop has this shape)."""

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Any: ...

    def time(self) -> float: ...


class OutputBuffer:
    """Bytes of one output stream, capped at ``cap`` while reading.

    The first ``cap // 2`` bytes are kept as they come (the head); after that only the last
    ``cap - cap // 2`` bytes are kept (the tail, trimmed from the front as data arrives).  At no
    time are more than ``cap`` bytes held.  ``truncated`` tells whether anything was dropped.
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(0, cap)
        self._head_cap = self.cap // 2
        self._tail_cap = self.cap - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def write(self, data: bytes) -> None:
        """Take one chunk of output."""
        if not data:
            return
        self.total += len(data)
        view = memoryview(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += view[:room]
            view = view[room:]
        if not view or self._tail_cap == 0:
            return
        if len(view) >= self._tail_cap:
            self._tail[:] = view[len(view) - self._tail_cap :]
            return
        excess = len(self._tail) + len(view) - self._tail_cap
        if excess > 0:
            del self._tail[:excess]
        self._tail += view

    @property
    def kept(self) -> int:
        """How many bytes are held."""
        return len(self._head) + len(self._tail)

    @property
    def truncated(self) -> bool:
        """Whether some bytes were dropped."""
        return self.total > self.kept

    def getvalue(self) -> bytes:
        """Head and tail, joined (the dropped middle is simply missing)."""
        return bytes(self._head) + bytes(self._tail)

    def text(self) -> str:
        """The kept bytes as text (UTF-8, undecodable bytes become U+FFFD)."""
        return self.getvalue().decode("utf-8", errors="replace")


class ChunkStream:
    """Bytes of one output stream, sent out as text chunks while the command runs.

    Reads are coalesced: pending bytes are decoded and handed to ``emit(name, text)`` when they
    reach STREAM_FLUSH_BYTES, STREAM_FLUSH_DELAY after the first pending byte, or on ``flush``.
    An incremental decoder keeps a multi-byte character split across reads whole.
    While ``emit`` runs, ``chunk_offset`` is the byte offset in the stream of the chunk's first
    byte (bytes held back by the decoder belong to the next chunk).
    """

    def __init__(self, name: str, emit: Callable[[str, str], None], timers: Timers) -> None:
        self.name = name
        self.emit = emit
        self.timers = timers
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = bytearray()
        self._timer: Any = None
        self._fed = 0
        self.chunk_offset = 0

    def write(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= STREAM_FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self.timers.call_later(STREAM_FLUSH_DELAY, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self, final: bool = False) -> None:
        """Send what is pending (and, when ``final``, any incomplete character as U+FFFD)."""
        self.cancel()
        data = bytes(self._pending)
        self._pending.clear()
        text = self._decoder.decode(data, final)
        self._fed += len(data)
        if text:
            self.emit(self.name, text)
        # The next chunk starts after what was decoded (held bytes of a split character).
        self.chunk_offset = self._fed - len(self._decoder.getstate()[0])

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class StreamCapture:
    """One of a command's output streams: capped and buffered, or streamed as chunks.

    ``on_limit`` is called once when the stream passes ``kill_at`` bytes (buffered only;
    0 = never).
    """

    def __init__(
        self,
        name: str,
        max_output: int,
        kill_at: int,
        on_limit: Callable[[], None],
        emit: Callable[[str, str], None] | None = None,
        timers: Timers | None = None,
    ) -> None:
        self.name = name
        self.total = 0
        self._kill_at = kill_at
        self._on_limit = on_limit
        self.limit_hit = False
        self.chunks: ChunkStream | None = None
        self.buffer: OutputBuffer | None = None
        if emit is not None:
            assert timers is not None
            self.chunks = ChunkStream(name, emit, timers)
        else:
            self.buffer = OutputBuffer(max_output)

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        if self.chunks is not None:
            self.chunks.write(data)
            return
        assert self.buffer is not None
        self.buffer.write(data)
        if self._kill_at and self.total > self._kill_at and not self.limit_hit:
            self.limit_hit = True
            self._on_limit()

    def detach(self) -> None:
        """Nobody will read this stream's chunks or result text any more: keep nothing (the
        process table's log has the output), and never kill for the output's size."""
        if self.chunks is not None:
            self.chunks.cancel()
            self.chunks = None
        self.buffer = OutputBuffer(0)
        self._kill_at = 0

    def finish(self) -> None:
        """Send the last chunk (streamed output)."""
        if self.chunks is not None:
            self.chunks.flush(final=True)

    def cancel(self) -> None:
        if self.chunks is not None:
            self.chunks.cancel()

    def text(self) -> str:
        return self.buffer.text() if self.buffer is not None else ""

    @property
    def chunk_offset(self) -> int:
        """While a chunk is emitted: its offset in the stream (see ``ChunkStream``)."""
        return self.chunks.chunk_offset if self.chunks is not None else 0

    @property
    def truncated(self) -> bool:
        return self.buffer.truncated if self.buffer is not None else False
