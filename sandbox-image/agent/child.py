"""A started process on the event loop: its pipes (read, paused, written, force-closed) and
its exit status (SIGCHLD, reaped by pid)."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol

from agent.procs import returncode_of
from agent.spawn import Spawned

#: Bytes read from a command's pipe at a time.
PIPE_READ_SIZE = 64 * 1024


class ChildHandler(Protocol):
    """Who hears about a child: output, exit of the main process, end (exit + pipes closed)."""

    def child_data(self, fd: int, data: bytes) -> None: ...

    def child_exited(self, returncode: int) -> None: ...

    def child_ended(self, returncode: int) -> None: ...


class Reaper:
    """Reaps the agent's children on SIGCHLD and tells each one's callback its exit status."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.waiting: dict[int, Callable[[int], None]] = {}
        loop.add_signal_handler(signal.SIGCHLD, self.poll)

    def watch(self, pid: int, callback: Callable[[int], None]) -> None:
        self.waiting[pid] = callback
        # It may have exited already (its SIGCHLD came before it was registered).
        self.loop.call_soon(self.poll)

    def poll(self) -> None:
        for pid in list(self.waiting):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 255 << 8
            if done:
                callback = self.waiting.pop(pid)
                callback(returncode_of(status))

    def close(self) -> None:
        self.loop.remove_signal_handler(signal.SIGCHLD)


class ChildProcess:
    """The agent's side of one started process."""

    def __init__(
        self,
        loop: Any,
        reaper: Reaper,
        spawned: Spawned,
        handler: ChildHandler,
    ) -> None:
        self.loop = loop
        self.pid = spawned.pid
        self.handler = handler
        #: Output fds by the child fd they stand for (a PTY has no stderr of its own: -1).
        self.readers: dict[int, int] = {
            child_fd: fd for child_fd, fd in ((1, spawned.stdout), (2, spawned.stderr)) if fd >= 0
        }
        self.stdin_fd: int | None = spawned.stdin
        self._stdin_buffer = bytearray()
        self._stdin_closing = False
        self.paused = False
        self.returncode: int | None = None
        self.ended = False
        for child_fd, fd in self.readers.items():
            loop.add_reader(fd, self._read, child_fd)
        reaper.watch(self.pid, self._exited)

    @property
    def stdin_open(self) -> bool:
        """Whether stdin still takes data (not closed, not closing)."""
        return self.stdin_fd is not None and not self._stdin_closing

    @property
    def exited(self) -> bool:
        return self.returncode is not None

    # output ---------------------------------------------------------------------------------

    def _read(self, child_fd: int) -> None:
        fd = self.readers.get(child_fd)
        if fd is None:
            return
        try:
            data = os.read(fd, PIPE_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.handler.child_data(child_fd, data)
        else:
            self._close_reader(child_fd)

    def _close_reader(self, child_fd: int) -> None:
        fd = self.readers.pop(child_fd, None)
        if fd is None:
            return
        self.loop.remove_reader(fd)
        os.close(fd)
        self._maybe_ended()

    def pause_reading(self) -> None:
        if not self.paused:
            self.paused = True
            for fd in self.readers.values():
                self.loop.remove_reader(fd)

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            for child_fd, fd in self.readers.items():
                self.loop.add_reader(fd, self._read, child_fd)

    def close_pipes(self) -> None:
        """Close the agent's ends of the output pipes now (background holders keep theirs)."""
        for child_fd in list(self.readers):
            self._close_reader(child_fd)

    # stdin ----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.stdin_fd is None or self._stdin_closing or not data:
            return
        if not self._stdin_buffer:
            try:
                n = os.write(self.stdin_fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._drop_stdin()
                return
            data = data[n:]
            if not data:
                return
            self.loop.add_writer(self.stdin_fd, self._flush_stdin)
        self._stdin_buffer += data

    def _flush_stdin(self) -> None:
        if self.stdin_fd is None:
            return
        try:
            n = os.write(self.stdin_fd, self._stdin_buffer)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EAGAIN:
                self._drop_stdin()
            return
        del self._stdin_buffer[:n]
        if not self._stdin_buffer:
            self.loop.remove_writer(self.stdin_fd)
            if self._stdin_closing:
                self._drop_stdin()

    def close_stdin(self) -> None:
        """Close stdin once what was written has been delivered."""
        self._stdin_closing = True
        if not self._stdin_buffer:
            self._drop_stdin()

    def _drop_stdin(self) -> None:
        fd, self.stdin_fd = self.stdin_fd, None
        self._stdin_buffer.clear()
        if fd is not None:
            self.loop.remove_writer(fd)
            os.close(fd)

    # exit -----------------------------------------------------------------------------------

    def _exited(self, returncode: int) -> None:
        self.returncode = returncode
        if not self.ended:
            self.handler.child_exited(returncode)
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        if self.ended or self.returncode is None or self.readers:
            return
        self.ended = True
        self._drop_stdin()
        self.handler.child_ended(self.returncode)
