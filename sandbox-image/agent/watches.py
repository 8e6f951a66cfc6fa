"""``watch`` / ``unwatch``: inotify watches, each in a worker process run as the sandbox user.

A watch starts ``agent.fileworker`` in its ``watch`` mode through ``spawn.start_process`` (so
only what the sandbox user may read can be watched), reads the JSON lines it prints and sends
them to the connection as ``watching`` (once the watch is set), ``fs_event`` (each change)
and ``unwatched`` (asked for, or the watched path went away). A watch lives as long as its
connection: closing it kills the worker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from agent import log
from agent.config import SAFE_PATH
from agent.files import AGENT_ROOT, WORKER_BOOT
from agent.spawn import start_process
from twistedgw import protocol

#: Most watches one connection may hold.
MAX_WATCHES = 16


class WatchRun:
    """One watch: its worker process and the lines it prints."""

    def __init__(self, conn: Any, message: protocol.Watch, path: str) -> None:
        self.conn = conn
        self.request_id = message.request_id
        self.path = path
        agent = conn.agent
        config = agent.config
        self.loop = agent.loop
        env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": _home(config)}
        argv = [
            sys.executable,
            "-I",
            "-B",
            "-c",
            WORKER_BOOT.format(root=AGENT_ROOT),
            "watch",
            path,
            "recursive" if message.recursive else "single",
        ]
        spawned = start_process(argv, env, "/", config.spawn_method, config.user)
        os.close(spawned.stdin)
        os.close(spawned.stderr)
        self.pid: int | None = spawned.pid
        self.stdout: int | None = spawned.stdout
        self.buffer = bytearray()
        self.ready = False
        self.loop.add_reader(self.stdout, self._read)
        agent.reaper.watch(spawned.pid, self._exited)

    def _read(self) -> None:
        if self.stdout is None:
            return
        try:
            data = os.read(self.stdout, 64 * 1024)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close()
            return
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, rest = bytes(self.buffer).partition(b"\n")
            self.buffer = bytearray(rest)
            self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            item = json.loads(line)
        except ValueError:
            return
        if not isinstance(item, dict):
            return
        rid = self.request_id
        if "ready" in item:
            self.ready = True
            self.conn.send_message(protocol.watching_message(rid, self.path))
        elif "error" in item:
            self.conn.send_message(protocol.control_error(rid, str(item["error"]), "watch_failed"))
            self.stop(announce=False)
        elif "gone" in item:
            self.stop()
        elif item.get("event") in protocol.FS_EVENTS and isinstance(item.get("path"), str):
            self.conn.send_message(protocol.fs_event_message(rid, item["event"], item["path"]))

    def _close(self) -> None:
        fd, self.stdout = self.stdout, None
        if fd is not None:
            self.loop.remove_reader(fd)
            os.close(fd)

    def _exited(self, returncode: int) -> None:
        self.pid = None
        if self.conn.watches.get(self.request_id) is self:
            # It died by itself (its path went away, or it failed before saying why).
            self._read()
            self.stop(announce=self.ready)

    def stop(self, announce: bool = True) -> None:
        """End the watch (kill the worker); ``unwatched`` to the client if ``announce``."""
        if self.conn.watches.get(self.request_id) is self:
            del self.conn.watches[self.request_id]
            if announce:
                self.conn.send_message(protocol.unwatched_message(self.request_id))
        self._close()
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass


def _home(config: Any) -> str:
    return str(config.child_env.get("HOME") or "/home/sandbox")


def handle(conn: Any, message: protocol.Watch | protocol.Unwatch) -> None:
    """A ``watch`` or ``unwatch`` message on ``conn`` (a ``dispatch.Connection``)."""
    watches: dict[str, WatchRun] = conn.__dict__.setdefault("watches", {})
    rid = message.request_id
    if isinstance(message, protocol.Unwatch):
        run = watches.get(rid)
        if run is None:
            raise message.error("unknown_watch", f"no watch with request_id {rid!r}")
        run.stop()
        return
    if rid in watches or rid in conn.runs:
        raise message.error("duplicate_request_id", f"request_id {rid!r} is already in use")
    if len(watches) >= MAX_WATCHES:
        raise message.error(
            "too_many_watches", f"too many watches on this connection (limit {MAX_WATCHES})"
        )
    path = os.path.normpath(os.path.join(_home(conn.agent.config), message.path))
    try:
        watches[rid] = WatchRun(conn, message, path)
    except OSError as e:
        raise message.error("watch_failed", f"could not start the watch: {e}") from None
    log.debug("watching %s for %s", path, rid)


def drop(conn: Any) -> None:
    """The connection closed: end its watches."""
    for run in list(getattr(conn, "watches", {}).values()):
        run.stop(announce=False)
