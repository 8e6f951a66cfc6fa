"""A small single-threaded event loop on ``selectors``: fd readiness, timers, signals, and
stream servers/transports (TCP or Unix) with write-buffer backpressure.

The agent used asyncio first; asyncio (with what it pulls in: threading, logging, traceback,
subprocess, concurrent.futures) costs about 3 MiB of every agent's memory and tens of
milliseconds of its start, for far more than the agent uses.  The method names and
semantics follow asyncio's (``add_reader``, ``call_later``, ``pause_writing``...), so the
other modules would run on an asyncio loop unchanged.
"""

from __future__ import annotations

import heapq
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent import log

#: Bytes read from a socket at a time.
RECV_SIZE = 256 * 1024


class TimerHandle:
    """A scheduled call; ``cancel()`` stops it."""

    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: TimerHandle) -> bool:
        return self.when < other.when


class Loop:
    """The event loop: one selector, a timer heap, a ready queue, signal wake-ups."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[TimerHandle] = []
        self._ready: deque[TimerHandle] = deque()
        self._stopping = False
        self._signal_handlers: dict[int, Callable[[], None]] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)

    # time -----------------------------------------------------------------------------------

    def time(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        handle = TimerHandle(self.time() + max(0.0, delay), callback, args)
        heapq.heappush(self._timers, handle)
        return handle

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        handle = TimerHandle(0.0, callback, args)
        self._ready.append(handle)
        return handle

    # fds ------------------------------------------------------------------------------------

    def _register(self, fd: int, event: int, callback: Callable[[], None]) -> None:
        try:
            key = self.selector.get_key(fd)
        except KeyError:
            self.selector.register(fd, event, {event: callback})
            return
        key.data[event] = callback
        self.selector.modify(fd, key.events | event, key.data)

    def _unregister(self, fd: int, event: int) -> None:
        try:
            key = self.selector.get_key(fd)
        except KeyError:
            return
        key.data.pop(event, None)
        events = key.events & ~event
        if events:
            self.selector.modify(fd, events, key.data)
        else:
            self.selector.unregister(fd)

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self._register(fd, selectors.EVENT_READ, lambda: callback(*args))

    def remove_reader(self, fd: int) -> None:
        self._unregister(fd, selectors.EVENT_READ)

    def add_writer(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self._register(fd, selectors.EVENT_WRITE, lambda: callback(*args))

    def remove_writer(self, fd: int) -> None:
        self._unregister(fd, selectors.EVENT_WRITE)

    # signals --------------------------------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the loop when ``signum`` arrives."""
        self._signal_handlers[signum] = callback
        # A full pipe already holds a wake-up, so dropping more bytes loses nothing.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signum, _note_signal)

    def remove_signal_handler(self, signum: int) -> None:
        if self._signal_handlers.pop(signum, None) is not None:
            signal.signal(signum, signal.SIG_DFL)

    def close(self) -> None:
        """Undo the signal set-up and close the selector (tests run several loops)."""
        for signum in list(self._signal_handlers):
            self.remove_signal_handler(signum)
        signal.set_wakeup_fd(-1)
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _on_wakeup(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            return
        for signum in set(data):
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                self._ready.append(TimerHandle(0.0, handler, ()))

    # running --------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        """Run until ``stop()``."""
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def run_once(self, max_wait: float | None = None) -> None:
        """Wait for events or the next timer (at most ``max_wait`` s) and run what is due."""
        timeout = max_wait
        if self._ready:
            timeout = 0.0
        elif self._timers:
            until = max(0.0, self._timers[0].when - self.time())
            timeout = until if timeout is None else min(timeout, until)
        for key, events in self.selector.select(timeout):
            for event in (selectors.EVENT_READ, selectors.EVENT_WRITE):
                callback = key.data.get(event) if events & event else None
                if callback is not None:
                    self._ready.append(TimerHandle(0.0, callback, ()))
        now = self.time()
        while self._timers and self._timers[0].when <= now:
            self._ready.append(heapq.heappop(self._timers))
        for _ in range(len(self._ready)):
            handle = self._ready.popleft()
            if handle.cancelled:
                continue
            try:
                handle.callback(*handle.args)
            except Exception:
                log.exception("unhandled error in the event loop")
        # Drop cancelled timers at the top so a cancelled near one does not wake us needlessly.
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)

    # servers --------------------------------------------------------------------------------

    def serve(self, sock: socket.socket, factory: Callable[[], Any]) -> None:
        """Accept connections on the listening ``sock``; each gets ``factory()``'s protocol."""
        sock.setblocking(False)

        def accept() -> None:
            for _ in range(64):
                try:
                    conn, _addr = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:  # EMFILE and friends: try again on the next wake-up
                    log.warn("accept failed: %s", e)
                    return
                SocketTransport(self, conn, factory())

        self.add_reader(sock.fileno(), accept)


def _note_signal(signum: int, frame: Any) -> None:
    """The Python-level handler; the wake-up fd carries the signal number to the loop."""


class SocketTransport:
    """A connected stream socket: reads go to the protocol, writes are buffered.

    Like asyncio's transports: ``pause_writing()`` on the protocol when more than ``high``
    bytes wait to be sent, ``resume_writing()`` once at most ``low`` do; ``close()`` sends
    what is buffered first.
    """

    def __init__(self, loop: Loop, sock: socket.socket, protocol: Any) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._paused = False
        self._closing = False
        self.closed = False
        loop.add_reader(self.fd, self._read)
        protocol.connection_made(self)

    def get_extra_info(self, name: str) -> Any:
        if name == "peername":
            try:
                return self.sock.getpeername()
            except OSError:
                return None
        return None

    def set_write_buffer_limits(self, high: int) -> None:
        self._high = high
        self._low = high // 4

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def pause_reading(self) -> None:
        """Stop reading until ``resume_reading`` (a consumer elsewhere is full)."""
        if not self._closing and not self.closed:
            self.loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if not self._closing and not self.closed:
            self.loop.add_reader(self.fd, self._read)

    def _read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        self.protocol.data_received(data)

    def write(self, data: bytes) -> None:
        if self._closing or self.closed or not data:
            return
        if not self._buffer:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._lost()
                return
            if n == len(data):
                return
            data = data[n:]
            self.loop.add_writer(self.fd, self._flush)
        self._buffer += data
        if not self._paused and len(self._buffer) > self._high:
            self._paused = True
            self.protocol.pause_writing()

    def _flush(self) -> None:
        try:
            n = self.sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        del self._buffer[:n]
        if self._paused and len(self._buffer) <= self._low:
            self._paused = False
            self.protocol.resume_writing()
        if not self._buffer:
            self.loop.remove_writer(self.fd)
            if self._closing:
                self._lost()

    def close(self) -> None:
        """Close once the buffer is sent."""
        if self._closing or self.closed:
            return
        self._closing = True
        self.loop.remove_reader(self.fd)
        if not self._buffer:
            self._lost()

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self._buffer.clear()
        self.sock.close()
        self.protocol.connection_lost(None)
