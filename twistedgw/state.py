"""What the gateway remembers across restarts that Docker labels cannot hold.

Labels are fixed when a container is created, so the mutable parts of a sandbox's life (last
activity, whether a client ever attached, a lifetime extended by keepalive) are written to a
small JSON file in the state directory after each sweep and at shutdown. Losing the file loses
nothing important: a restarted gateway then counts idle time from its own start.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from twistedgw.sandbox import Sandbox


@frozen
class SavedSandbox:
    """The mutable facts of one sandbox, as last saved."""

    last_activity: float
    ever_connected: bool
    expires_at: float | None


class StateFile:
    """A JSON file mapping sandbox ids to ``SavedSandbox``; written atomically, off-reactor."""

    _log = Logger()

    def __init__(self, path: Path | None, reactor: Any) -> None:
        self.path = path
        self._reactor = reactor

    def load(self) -> dict[str, SavedSandbox]:
        """Read the file (at start-up, before serving); a missing or bad file is empty."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {
                sandbox_id: SavedSandbox(
                    last_activity=float(entry["last_activity"]),
                    ever_connected=bool(entry.get("ever_connected", False)),
                    expires_at=(
                        None if entry.get("expires_at") is None else float(entry["expires_at"])
                    ),
                )
                for sandbox_id, entry in raw.get("sandboxes", {}).items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self._log.warn(
                "ignoring unreadable state file {path}: {error}", path=self.path, error=e
            )
            return {}

    def save(self, sandboxes: Iterable[Sandbox]) -> Deferred[None]:
        """Write the current facts of ``sandboxes`` (in a thread)."""
        snapshot = {
            s.sandbox_id: {
                "last_activity": s.last_activity,
                "ever_connected": s.ever_connected,
                "expires_at": s.expires_at,
            }
            for s in sandboxes
        }
        if self.path is None:
            return Deferred.fromCoroutine(_nothing())
        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._thd_write, snapshot
        )

    def _thd_write(self, snapshot: Mapping[str, Any]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "sandboxes": snapshot}, f)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


async def _nothing() -> None:
    return None
