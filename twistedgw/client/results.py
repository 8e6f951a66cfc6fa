"""Typed records of what the gateway answers: command results, processes, sandboxes, files.

Each has a ``from_message``/``from_json`` that reads the wire form (PROTOCOL.md, README's REST
section) and tolerates absent optional fields, so a caller never sees a bare dict or a
``KeyError``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _float(value: Any, default: float = 0.0) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _offsets(value: Any) -> dict[str, int]:
    if isinstance(value, Mapping):
        return {str(k): _int(v) for k, v in value.items()}
    return {}


@dataclass(frozen=True)
class CommandResult:
    """How a command ended, and its output.

    ``stdout``/``stderr`` are the whole output as the client received it (streamed and, after a
    redial, resumed from the last offset); ``exit_code`` is the command's exit status (minus the
    signal number when a signal ended it: -9 for timeouts, cancels and the OOM killer)."""

    command: str
    request_id: str
    exit_code: int
    stdout: str = ""
    stderr: str = ""
    success: bool = False
    timed_out: bool = False
    cancelled: bool = False
    truncated: bool = False
    oom_killed: bool = False
    duration_ms: float = 0.0
    pid: int | None = None
    session: str | None = None
    #: Bytes lost from the front of each stream's log (``{"stdout": n, "stderr": m}``).
    dropped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_message(
        cls, message: Mapping[str, Any], stdout: str | None = None, stderr: str | None = None
    ) -> CommandResult:
        """Read a ``result`` message; ``stdout``/``stderr`` replace its ``output``/``error``
        (a streamed result carries them empty)."""
        pid = message.get("pid")
        session = message.get("session")
        return cls(
            command=_str(message.get("command")),
            request_id=_str(message.get("request_id")),
            exit_code=_int(message.get("returncode"), -1),
            stdout=_str(message.get("output")) if stdout is None else stdout,
            stderr=_str(message.get("error")) if stderr is None else stderr,
            success=message.get("success") is True,
            timed_out=message.get("timed_out") is True,
            cancelled=message.get("cancelled") is True,
            truncated=message.get("truncated") is True,
            oom_killed=message.get("oom_killed") is True,
            duration_ms=_float(message.get("duration_ms")),
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            session=session if isinstance(session, str) else None,
            dropped=_offsets(message.get("dropped")),
        )


@dataclass(frozen=True)
class ProcessInfo:
    """One line of ``processes``: a running or recently finished command of the sandbox."""

    pid: int
    request_id: str
    command: str
    state: str
    returncode: int | None
    background: bool
    started_at: float
    bytes: dict[str, int]
    dropped: dict[str, int]
    watchers: int

    @property
    def running(self) -> bool:
        return self.state == "running"

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> ProcessInfo:
        returncode = item.get("returncode")
        return cls(
            pid=_int(item.get("pid")),
            request_id=_str(item.get("request_id")),
            command=_str(item.get("command")),
            state=_str(item.get("state"), "unknown"),
            returncode=returncode if isinstance(returncode, int) else None,
            background=item.get("background") is True,
            started_at=_float(item.get("started_at")),
            bytes=_offsets(item.get("bytes")),
            dropped=_offsets(item.get("dropped")),
            watchers=_int(item.get("watchers")),
        )


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as ``GET /sandboxes/{id}?details=true`` describes it (``raw`` keeps every
    field, including ones added after this client was written)."""

    sandbox_id: str
    status: str
    created_at: float
    ip_address: str = ""
    state: str | None = None
    template: str | None = None
    expires_at: float | None = None
    idle_timeout: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> SandboxInfo:
        expires = item.get("expires_at")
        idle = item.get("idle_timeout")
        metadata = item.get("metadata")
        return cls(
            sandbox_id=_str(item.get("sandbox_id")),
            status=_str(item.get("status"), "unknown"),
            created_at=_float(item.get("created_at")),
            ip_address=_str(item.get("ip_address")),
            state=item.get("state") if isinstance(item.get("state"), str) else None,
            template=item.get("template") if isinstance(item.get("template"), str) else None,
            expires_at=_float(expires) if expires is not None else None,
            idle_timeout=_float(idle) if idle is not None else None,
            metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
            raw=dict(item),
        )


@dataclass(frozen=True)
class FileEntry:
    """One line of a directory listing (``GET /sandboxes/{id}/files/list``)."""

    name: str
    path: str
    type: str
    size: int
    mode: str
    mtime: float

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> FileEntry:
        return cls(
            name=_str(item.get("name")),
            path=_str(item.get("path")),
            type=_str(item.get("type"), "other"),
            size=_int(item.get("size")),
            mode=_str(item.get("mode")),
            mtime=_float(item.get("mtime")),
        )
