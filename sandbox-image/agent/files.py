"""The ``/files`` HTTP routes of the agent: one worker process per request, bytes shovelled.

``server.AgentHTTP`` hands an authenticated ``/files...`` request here. A ``FileRequest``
starts ``agent.fileworker`` through ``spawn.start_process`` (as the sandbox user, exactly like
a command), writes it a JSON line describing the request (never the secret), then joins the
socket and the worker's pipes: what the gateway sends after the request head goes to the
worker's stdin, what the worker writes on stdout (a complete HTTP response) goes to the
socket. Backpressure both ways: a full stdin pipe stops reading from the socket, a full
socket send buffer stops reading the worker's stdout. The connection closes when the worker's
stdout ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
from collections import deque
from typing import Any

from agent import log
from agent.config import SAFE_PATH
from agent.spawn import start_process

#: Where the ``agent`` package lives (its parent directory goes on the worker's sys.path).
AGENT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The worker's command line: isolated mode (no user site-packages, no environment
#: variables), with the agent's directory on its path.
WORKER_BOOT = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from agent import fileworker; sys.exit(fileworker.main())"
)
#: Headers passed to the worker (the Authorization header, with the secret, never is).
PASSED_HEADERS = ("content-length", "transfer-encoding", "range", "content-type")
#: Stop reading the socket when this much waits for the worker's stdin.
STDIN_HIGH = 1024 * 1024
READ_SIZE = 256 * 1024
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031
#: How long an answered connection stays open for the gateway to close it first.
LINGER_SECONDS = 5.0


class FileRequest:
    """One ``/files`` request: its worker and the joined pipes."""

    def __init__(self, http: Any, method: str, target: str, headers: dict[str, str]) -> None:
        self.http = http
        self.transport = http.transport
        agent = http.agent
        config = agent.config
        self.loop = agent.loop
        home = config.child_env.get("HOME") or "/home/sandbox"
        meta = {
            "method": method,
            "target": target,
            "headers": {k: headers[k] for k in PASSED_HEADERS if k in headers},
            "home": home,
        }
        env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": home}
        argv = [sys.executable, "-I", "-B", "-c", WORKER_BOOT.format(root=AGENT_ROOT)]
        spawned = start_process(argv, env, "/", config.spawn_method, config.user)
        self.pid: int | None = spawned.pid
        self.stdin: int | None = spawned.stdin
        try:
            # Bigger pipe, fewer wake-ups per MiB (any user may go up to 1 MiB).
            fcntl.fcntl(spawned.stdin, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        self.stdout: int | None = spawned.stdout
        self.stderr: int | None = spawned.stderr
        # Bytes for the worker's stdin: chunks as they came, and how much of the first is sent.
        self.pending: deque[bytes] = deque([json.dumps(meta).encode("utf-8") + b"\n"])
        self.pending_size = len(self.pending[0])
        self.sent = 0
        self.input_done = False
        self.reading_paused = False
        self.output_paused = False
        self.returncode: int | None = None
        self.loop.add_reader(self.stdout, self._read_stdout)
        self.loop.add_reader(self.stderr, self._read_stderr)
        agent.reaper.watch(spawned.pid, self._exited)
        self._flush_stdin()

    # socket -> worker -----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the socket (the request body, as framed by the gateway)."""
        if self.stdin is None or not data:
            return
        self.pending.append(data)
        self.pending_size += len(data)
        self._flush_stdin()

    def _flush_stdin(self) -> None:
        if self.stdin is None:
            return
        while self.pending:
            first = self.pending[0]
            try:
                n = os.write(self.stdin, memoryview(first)[self.sent :])
            except BlockingIOError:
                break
            except OSError:
                # The worker stopped reading (it answered early, or died): drop the rest.
                self._close_stdin()
                self._resume_socket()
                return
            self.sent += n
            self.pending_size -= n
            if self.sent == len(first):
                self.pending.popleft()
                self.sent = 0
        if self.pending:
            self.loop.add_writer(self.stdin, self._flush_stdin)
            if self.pending_size >= STDIN_HIGH and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
        else:
            self.loop.remove_writer(self.stdin)
            self._resume_socket()
            if self.input_done:
                self._close_stdin()

    def _resume_socket(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def _close_stdin(self) -> None:
        fd, self.stdin = self.stdin, None
        self.pending.clear()
        self.pending_size = self.sent = 0
        if fd is not None:
            self.loop.remove_writer(fd)
            os.close(fd)

    # worker -> socket -----------------------------------------------------------------------

    def _read_stdout(self) -> None:
        if self.stdout is None:
            return
        try:
            data = os.read(self.stdout, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.transport.write(data)
            return
        self._close_fd("stdout")
        # The answer is complete. The gateway may still be sending a body the worker no
        # longer wants (an early 404 or 507): read and drop it for a moment rather than
        # close at once, which would reset the connection and could destroy the answer in
        # flight. The gateway closes as soon as it has the answer.
        self._close_stdin()
        self._resume_socket()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _read_stderr(self) -> None:
        if self.stderr is None:
            return
        try:
            data = os.read(self.stderr, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            log.debug("file worker %s: %s", self.pid, data[:300].decode("utf-8", "replace"))
        else:
            self._close_fd("stderr")

    def _close_fd(self, name: str) -> None:
        fd = getattr(self, name)
        setattr(self, name, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            os.close(fd)

    def pause_writing(self) -> None:
        if not self.output_paused and self.stdout is not None:
            self.output_paused = True
            self.loop.remove_reader(self.stdout)

    def resume_writing(self) -> None:
        if self.output_paused:
            self.output_paused = False
            if self.stdout is not None:
                self.loop.add_reader(self.stdout, self._read_stdout)

    # ends -----------------------------------------------------------------------------------

    def _exited(self, returncode: int) -> None:
        self.returncode = returncode
        self.pid = None
        if returncode not in (0,):
            log.info("file worker exited with status %s", returncode)

    def lost(self) -> None:
        """The socket closed: the worker sees its stdin end (an upload is dropped, with its
        temp file) and its stdout closed (a download stops on EPIPE)."""
        self._close_stdin()
        self._close_fd("stdout")
        self._close_fd("stderr")
        if self.pid is not None and self.returncode is None:
            try:
                # Not the group: the worker is a single process.
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass
