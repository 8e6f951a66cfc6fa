"""``--log-format json``: one JSON object per line, from a twisted.logger observer.

Each line has ``time`` (ISO 8601, UTC), ``level``, ``namespace`` and ``message`` (the event
formatted as the text log would show it), plus the stable structured fields an event carries
(``STABLE_FIELDS``: ``sandbox_id``, ``request_id``, ``owner``, ``event``, ``duration_ms``,
``status``, ...). ``owner`` is the owner id, a digest of the token (``web.auth.owner_id``),
never the token. A failure adds ``traceback``. Debug events (where command text may be logged)
are dropped unless the observer is made with ``min_level=LogLevel.debug``.

twistd picks its log observer from the application's ``ILogObserver`` component
(``twisted.application.app.AppLogger``); ``LoggingRoot``, the root service
``tap.makeService`` returns, sets that component when twistd makes it a child of the
application, so ``twistd sandboxgw --log-format json`` needs no twistd option of its own.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from twisted.python.components import Componentized
from zope.interface import implementer

#: Log formats ``--log-format`` accepts.
LOG_FORMATS = ("text", "json")

#: Event keys copied into a JSON line when an event has them (what logs are searched by).
STABLE_FIELDS = (
    "sandbox_id",
    "request_id",
    "owner",
    "event",
    "duration_ms",
    "status",
    "reason",
    "code",
    "method",
    "path",
    "peer",
    "pid",
    "template",
    "error",
)
#: Older events say ``ms``; it is ``duration_ms`` in a JSON line.
_RENAMED = {"ms": "duration_ms"}


def _plain(value: Any) -> Any:
    """A JSON-encodable form of a field's value."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def event_as_json(event: LogEvent) -> dict[str, Any]:
    """The JSON object of one log event."""
    level = event.get("log_level") or LogLevel.info
    stamp = event.get("log_time")
    when = datetime.fromtimestamp(stamp if stamp is not None else 0.0, UTC)
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name,
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event) or "",
    }
    for key, value in event.items():
        name = _RENAMED.get(key, key)
        if name in STABLE_FIELDS and not key.startswith("log_"):
            record.setdefault(name, _plain(value))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot print itself must not lose the line
            record["traceback"] = repr(failure)
    return record


@implementer(ILogObserver)
class JsonLogObserver:
    """Writes each event at ``min_level`` or above as one JSON line to ``out``."""

    def __init__(self, out: IO[str] | None = None, min_level: LogLevel = LogLevel.info) -> None:
        # Taken now: once twistd begins logging, sys.stdout is redirected into the log
        # system, and writing there from an observer would loop.
        self._out = out if out is not None else sys.stdout
        self._min_level = min_level

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level") or LogLevel.info
        if level < self._min_level:
            return
        try:
            line = json.dumps(event_as_json(event), ensure_ascii=False)
        except Exception:
            line = json.dumps({"level": "error", "message": "unprintable log event"})
        self._out.write(line + "\n")
        self._out.flush()


class LoggingRoot(MultiService):
    """The gateway's root service; with an ``observer``, twistd logs through it."""

    def __init__(self, observer: ILogObserver | None = None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> Any:
        if self.observer is not None and isinstance(parent, Componentized):
            # twistd's Application: AppLogger.start reads this component.
            parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)
