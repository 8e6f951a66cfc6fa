"""What the gateway remembers across restarts that Docker labels cannot hold.

Labels are fixed when a container is created, so the mutable parts of a sandbox's life (last
activity, whether a client ever attached, a lifetime extended by keepalive) are written to a
small JSON file in the state directory after each sweep and at shutdown. Losing the file loses
nothing that stops a sandbox from serving: a restarted gateway then counts idle time from its own
start. Each write is durable (flushed, fsynced, renamed over the old file, directory fsynced), so
a crash or power loss leaves the old state or the new one. A file that cannot be read at start-up
(corrupt, empty, not JSON) is logged as an error and renamed aside, ``<name>.corrupt-<time>``,
for an operator to look at: it is never silently taken for "no state", nor overwritten.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from twistedgw.sandbox import Sandbox, SandboxSettings


@frozen
class SavedSandbox:
    """The mutable facts of one sandbox, as last saved."""

    last_activity: float
    ever_connected: bool
    expires_at: float | None
    #: For a sandbox handed out from the warm pool: what its labels do not say.
    assigned: SandboxSettings | None = None
    created_at: float | None = None


def _settings_json(settings: SandboxSettings) -> dict[str, Any]:
    return {
        "idle_timeout": settings.idle_timeout,
        "max_lifetime": settings.max_lifetime,
        "idempotency_key": settings.idempotency_key,
        "owner": settings.owner,
        "template": settings.template,
    }


def _settings_from_json(raw: Mapping[str, Any]) -> SandboxSettings:
    return SandboxSettings(
        idle_timeout=float(raw["idle_timeout"]),
        max_lifetime=None if raw.get("max_lifetime") is None else float(raw["max_lifetime"]),
        idempotency_key=raw.get("idempotency_key"),
        owner=raw.get("owner"),
        template=str(raw.get("template") or "default"),
    )


class StateFile:
    """A JSON file mapping sandbox ids to ``SavedSandbox``; written atomically, off-reactor."""

    _log = Logger()

    def __init__(self, path: Path | None, reactor: Any, in_thread: bool = True) -> None:
        self.path = path
        self._reactor = reactor
        # Tests driving a Clock (no thread pool) write synchronously.
        self._in_thread = in_thread
        # One write at a time, each with a snapshot taken when its turn comes: a slower
        # earlier write never overwrites a newer one.
        self._lock = DeferredLock()

    def load(self) -> dict[str, SavedSandbox]:
        """Read the file (at start-up, before serving). A missing file is no state; a file
        that cannot be read is logged, set aside (``<name>.corrupt-<time>``) and no state."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            return self._parse(self.path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            self._set_aside(error)
            return {}

    def _set_aside(self, error: Exception) -> None:
        assert self.path is not None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._reactor.seconds()))
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            self.path.rename(aside)
        except OSError as rename_error:
            self._log.critical(
                "state file {path} is unreadable ({error}) and could not be set aside "
                "({rename_error}): idle clocks, lifetime extensions and pool hand-outs are lost",
                path=str(self.path),
                error=error,
                rename_error=rename_error,
            )
            return
        self._log.critical(
            "state file {path} is unreadable ({error}); kept as {aside}. Starting without "
            "saved state: idle clocks restart now, lifetime extensions and pool hand-outs "
            "are lost",
            path=str(self.path),
            error=error,
            aside=str(aside),
        )

    @staticmethod
    def _parse(content: bytes) -> dict[str, SavedSandbox]:
        raw = json.loads(content)
        if not isinstance(raw, dict) or not isinstance(raw.get("sandboxes"), dict):
            raise ValueError("not a state file (no 'sandboxes' object)")
        return {
            sandbox_id: SavedSandbox(
                last_activity=float(entry["last_activity"]),
                ever_connected=bool(entry.get("ever_connected", False)),
                expires_at=(
                    None if entry.get("expires_at") is None else float(entry["expires_at"])
                ),
                assigned=(
                    _settings_from_json(entry["assigned"]) if entry.get("assigned") else None
                ),
                created_at=entry.get("created_at"),
            )
            for sandbox_id, entry in raw["sandboxes"].items()
        }

    def save(self, sandboxes: Iterable[Sandbox]) -> Deferred[None]:
        """Write the current facts of ``sandboxes`` (in a thread, one write at a time)."""
        if self.path is None:
            return succeed(None)
        return self._lock.run(self._save, sandboxes)

    def _save(self, sandboxes: Iterable[Sandbox]) -> Deferred[None]:
        snapshot: dict[str, dict[str, Any]] = {}
        for s in sandboxes:
            entry: dict[str, Any] = {
                "last_activity": s.last_activity,
                "ever_connected": s.ever_connected,
                "expires_at": s.expires_at,
            }
            if s.from_pool:
                entry["assigned"] = _settings_json(s.settings)
                entry["created_at"] = s.created_at
            snapshot[s.sandbox_id] = entry
        if not self._in_thread:
            self._thd_write(snapshot)
            return succeed(None)
        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._thd_write, snapshot
        )

    def _thd_write(self, snapshot: Mapping[str, Any]) -> None:
        """Write a temporary sibling, fsync it, rename it over the file, fsync the directory:
        after a crash or power loss the file holds the old or the new state, never a mix."""
        assert self.path is not None
        target = FilePath(str(self.path))
        directory = target.parent()
        if not directory.isdir():
            directory.makedirs(ignoreExistingDirectory=True)
        content = json.dumps({"version": 1, "sandboxes": snapshot}).encode("utf-8")
        temporary = target.temporarySibling(".tmp")
        try:
            with temporary.open("w") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            temporary.moveTo(target)
        except BaseException:
            if temporary.exists():
                temporary.remove()
            raise
        fd = os.open(directory.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
