"""Snapshots: a sandbox's writable state (home, /tmp, /var/tmp) as a tar in ``--snapshot-dir``.

``<id>.tar`` is what the agent's ``GET /files/snapshot`` streams (names relative to ``/``),
written as it arrives (``<id>.tar.part`` until complete); ``<id>.json`` beside it records the
snapshot's id, size, creation time, source sandbox and owner id (a digest of the token that
made it, never the token). Only that owner sees, uses or deletes it (404 for anyone else).
``restore`` streams a snapshot back into a new sandbox through ``PUT /files/snapshot``.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone

from twistedgw.proxy.files import AgentFiles, error_text, read_answer
from twistedgw.sandbox import Sandbox
from twistedgw.web.errors import APIError

SNAPSHOT_ID_LENGTH = 24


def is_valid_snapshot_id(text: str) -> bool:
    return len(text) == SNAPSHOT_ID_LENGTH and all(c in "0123456789abcdef" for c in text)


@frozen
class Snapshot:
    snapshot_id: str
    size: int
    created_at: float
    sandbox_id: str
    owner: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "snapshot_id": self.snapshot_id,
            "size": self.size,
            "created_at": self.created_at,
            "sandbox_id": self.sandbox_id,
        }


class SnapshotNotFound(APIError):
    """No such snapshot (or not the caller's): 404."""

    def __init__(self, snapshot_id: str) -> None:
        super().__init__(404, f"Snapshot {snapshot_id[:64]} not found")


class _ToFile(Protocol):
    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")
        self.size = 0
        self.done: Deferred[int] = Deferred()
        self.error: OSError | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self.file.write(data)
            self.size += len(data)
        except OSError as e:
            self.error = e
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.file.close()
        if self.error is not None:
            self.done.errback(self.error)
        elif reason.check(ResponseDone):
            self.done.callback(self.size)
        else:
            self.done.errback(reason)


class SnapshotStore:
    """The snapshots in one directory."""

    def __init__(self, directory: Path, files: AgentFiles, reactor: Any) -> None:
        self.directory = directory
        self.files = files
        self._reactor = reactor

    def _paths(self, snapshot_id: str) -> tuple[Path, Path]:
        return self.directory / f"{snapshot_id}.tar", self.directory / f"{snapshot_id}.json"

    async def create(self, sandbox: Sandbox, owner: str | None) -> Snapshot:
        """Stream the sandbox's writable state into a new snapshot."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        snapshot_id = secrets.token_hex(SNAPSHOT_ID_LENGTH // 2)
        tar, sidecar = self._paths(snapshot_id)
        partial = tar.with_suffix(".tar.part")
        response = await self.files.request(sandbox, b"GET", b"/files/snapshot")
        if response.code != 200:
            answer = await read_answer(response)
            raise APIError(answer.status, error_text(answer))
        sink = _ToFile(partial)
        response.deliverBody(sink)
        try:
            size = await sink.done
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, tar)
        snapshot = Snapshot(snapshot_id, size, time.time(), sandbox.sandbox_id, owner)
        sidecar_text = json.dumps({**snapshot.to_json(), "owner": owner})
        temp = sidecar.with_suffix(".json.part")
        temp.write_text(sidecar_text)
        os.replace(temp, sidecar)
        return snapshot

    def get(self, snapshot_id: str, owner: str | None) -> Snapshot:
        """The caller's snapshot; ``SnapshotNotFound`` for a missing one or another's."""
        if not is_valid_snapshot_id(snapshot_id):
            raise SnapshotNotFound(snapshot_id)
        tar, sidecar = self._paths(snapshot_id)
        try:
            record = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            raise SnapshotNotFound(snapshot_id) from None
        if record.get("owner") != owner or not tar.exists():
            raise SnapshotNotFound(snapshot_id)
        return Snapshot(
            snapshot_id,
            int(record["size"]),
            float(record["created_at"]),
            str(record.get("sandbox_id", "")),
            owner,
        )

    def visible_to(self, owner: str | None) -> list[Snapshot]:
        found = []
        if not self.directory.is_dir():
            return []
        for sidecar in sorted(self.directory.glob("*.json")):
            try:
                found.append(self.get(sidecar.stem, owner))
            except SnapshotNotFound:
                continue
        return sorted(found, key=lambda s: s.created_at)

    def delete(self, snapshot_id: str, owner: str | None) -> Snapshot:
        snapshot = self.get(snapshot_id, owner)
        tar, sidecar = self._paths(snapshot_id)
        sidecar.unlink(missing_ok=True)
        tar.unlink(missing_ok=True)
        return snapshot

    async def restore(self, snapshot: Snapshot, sandbox: Sandbox) -> None:
        """Stream a snapshot into a (new) sandbox."""
        tar, _ = self._paths(snapshot.snapshot_id)
        try:
            source = tar.open("rb")  # a local file: reads of it do not block for long
        except OSError:
            raise SnapshotNotFound(snapshot.snapshot_id) from None
        try:
            body = FileBodyProducer(source, readSize=256 * 1024)
            response = await self.files.request(sandbox, b"PUT", b"/files/snapshot", {}, body)
            answer = await read_answer(response)
        finally:
            source.close()
        if answer.status >= 400:
            raise APIError(answer.status, f"restoring the snapshot: {error_text(answer)}")
