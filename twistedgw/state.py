"""What the gateway remembers across restarts that Docker labels cannot hold.

Labels are fixed when a container is created, so the mutable parts of a sandbox's life (last
activity, whether a client ever attached, a lifetime extended by keepalive) are written to a
small JSON file in the state directory after each sweep and at shutdown. Losing the file loses
nothing that stops a sandbox from serving: a restarted gateway then counts idle time from its own
start. Each write is durable (flushed, fsynced, renamed over the old file, directory fsynced), so
a crash or power loss leaves the old state or the new one. A file that cannot be read at start-up
(corrupt, empty, not JSON) is logged as an error and renamed aside, ``<name>.corrupt-<time>``,
for an operator to look at: it is never silently taken for "no state", nor overwritten.

Under the Swarm backend there is no file: ``ClusterState`` keeps the same facts in a label on
each sandbox's service, so no gateway holds state of its own (``StateStore`` is what both
offer the lifecycle).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

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


class StateStore(Protocol):
    """Where the gateway keeps what labels fixed at creation cannot hold: ``StateFile`` on
    one host, ``ClusterState`` (service labels) in Swarm mode."""

    def load(self) -> dict[str, SavedSandbox]:
        """What was saved, read once at start-up (before serving)."""

    def seen(self, sandbox_id: str, saved: SavedSandbox) -> None:
        """A listing brought ``saved`` for ``sandbox_id`` from the runtime."""

    def save(self, sandboxes: Iterable[Sandbox]) -> Deferred[None]:
        """Persist the current facts of ``sandboxes``."""


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

    def seen(self, sandbox_id: str, saved: SavedSandbox) -> None:
        """A listing brought ``saved`` from the cluster (``ClusterState``); nothing here."""

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


class ClusterState:
    """The state file's job in Swarm mode: each sandbox's mutable facts are a label on its
    service (``LABEL_STATE``, via ``IClusterLabels``), so any gateway can be killed and
    replaced and two gateways see one truth. ``load`` has nothing to read at start-up: the
    listing brings each sandbox's saved facts (``ContainerInfo.saved``) and reconciliation
    merges them (``LifecycleCore._merge_saved``).

    ``save`` writes a sandbox's label only when its facts changed (its last activity by at
    least ``resolution`` seconds): one service update per active sandbox per sweep at most.
    An attached client counts as activity now (another gateway cannot see it). A write that
    loses a race with another gateway is retried once on the new version, keeping the later
    activity and the later expiry of the two.
    """

    _log = Logger()

    def __init__(self, labels: Any, reactor: Any, resolution: float = 1.0) -> None:
        self._labels = labels
        self._reactor = reactor
        self._resolution = resolution
        #: Sandbox id -> what was last written (or seen) for it.
        self._written: dict[str, SavedSandbox] = {}
        self._lock = DeferredLock()

    def load(self) -> dict[str, SavedSandbox]:
        return {}

    def seen(self, sandbox_id: str, saved: SavedSandbox) -> None:
        """What the cluster holds for ``sandbox_id`` now (from a listing): not rewritten."""
        self._written[sandbox_id] = saved

    def save(self, sandboxes: Iterable[Sandbox]) -> Deferred[None]:
        now = float(self._reactor.seconds())
        wanted = [(s.sandbox_id, s.container_id, self._facts(s, now)) for s in sandboxes]
        return self._lock.run(lambda: Deferred.fromCoroutine(self._save(wanted)))

    @staticmethod
    def _facts(sandbox: Sandbox, now: float) -> SavedSandbox:
        return SavedSandbox(
            last_activity=now if sandbox.clients else sandbox.last_activity,
            ever_connected=sandbox.ever_connected,
            expires_at=sandbox.expires_at,
        )

    def _changed(self, sandbox_id: str, facts: SavedSandbox) -> bool:
        before = self._written.get(sandbox_id)
        return (
            before is None
            or facts.last_activity - before.last_activity >= self._resolution
            or facts.ever_connected != before.ever_connected
            or facts.expires_at != before.expires_at
        )

    async def _save(self, wanted: list[tuple[str, str, SavedSandbox]]) -> None:
        from twistedgw.runtime.labels import LABEL_STATE, saved_from_label, state_label

        keep = {sandbox_id for sandbox_id, _, _ in wanted}
        for sandbox_id in list(self._written):
            if sandbox_id not in keep:
                del self._written[sandbox_id]
        failures = 0
        for sandbox_id, container_id, facts in wanted:
            if not self._changed(sandbox_id, facts):
                continue
            try:
                for _ in range(2):
                    version, labels = await self._labels.read_labels(container_id)
                    theirs = saved_from_label(labels)
                    if theirs is not None:
                        facts = merge_saved(facts, theirs)
                    if await self._labels.write_labels(
                        container_id, version, {LABEL_STATE: state_label(facts)}
                    ):
                        self._written[sandbox_id] = facts
                        break
            except Exception as e:
                failures += 1
                self._log.debug(
                    "could not save {sandbox_id}'s state in the cluster: {error}",
                    sandbox_id=sandbox_id,
                    error=str(e),
                )
        if failures:
            self._log.warn("could not save the state of {n} sandboxes in the cluster", n=failures)


def merge_saved(ours: SavedSandbox, theirs: SavedSandbox) -> SavedSandbox:
    """Two gateways' views of one sandbox: the later activity, connected if either saw a
    client, the later expiry (a keepalive through either counts)."""
    expires_at = ours.expires_at
    if theirs.expires_at is not None:
        expires_at = theirs.expires_at if expires_at is None else max(expires_at, theirs.expires_at)
    return SavedSandbox(
        last_activity=max(ours.last_activity, theirs.last_activity),
        ever_connected=ours.ever_connected or theirs.ever_connected,
        expires_at=expires_at,
        assigned=ours.assigned,
        created_at=ours.created_at,
    )
