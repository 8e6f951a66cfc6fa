"""``StateFile`` itself: what a save puts on disk (durably), what a load gives back, and what
happens to a file that cannot be read. The manager-level restart is in ``test_lifecycle``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from twistedgw.sandbox import Sandbox, SandboxSettings
from twistedgw.state import SavedSandbox, StateFile

NOW = 1_700_000_000.0


def sandbox(sandbox_id: str, **changes: Any) -> Sandbox:
    base = Sandbox(
        sandbox_id=sandbox_id,
        container_id="c-" + sandbox_id,
        created_at=NOW - 100,
        ip_address="172.17.0.2",
        agent_host="127.0.0.1",
        agent_port=1,
        agent_secret="s",
        settings=SandboxSettings(idle_timeout=60),
        last_activity=NOW - 10,
    )
    return attrs.evolve(base, **changes)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


@pytest.fixture
def critical(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Critical log events emitted while the test runs."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.critical:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events  # type: ignore[misc]
    globalLogPublisher.removeObserver(observe)


def test_save_then_load_gives_back_every_field(tmp_path: Path, clock: Clock) -> None:
    """What a save writes, a load reads back: activity, attachment, expiry, and for a pool
    hand-out its assigned settings and creation time."""
    state = StateFile(tmp_path / "state.json", clock, in_thread=False)
    plain = sandbox("a" * 32, ever_connected=True, expires_at=NOW + 500)
    assigned = SandboxSettings(
        idle_timeout=30, max_lifetime=90, idempotency_key="k" * 40, owner="o1"
    )
    pooled = sandbox(
        "b" * 32, from_pool=True, settings=assigned, created_at=NOW - 5, expires_at=NOW + 85
    )
    state.save([plain, pooled])
    loaded = StateFile(tmp_path / "state.json", clock).load()
    assert loaded == {
        plain.sandbox_id: SavedSandbox(
            last_activity=NOW - 10, ever_connected=True, expires_at=NOW + 500
        ),
        pooled.sandbox_id: SavedSandbox(
            last_activity=NOW - 10,
            ever_connected=False,
            expires_at=NOW + 85,
            assigned=SandboxSettings(
                idle_timeout=30, max_lifetime=90, idempotency_key="k" * 40, owner="o1"
            ),
            created_at=NOW - 5,
        ),
    }


def test_a_sandbox_without_expiry_is_saved_as_such(tmp_path: Path, clock: Clock) -> None:
    """``expires_at`` is always written, ``null`` when the sandbox has no lifetime."""
    path = tmp_path / "state.json"
    StateFile(path, clock, in_thread=False).save([sandbox("c" * 32)])
    entry = json.loads(path.read_text())["sandboxes"]["c" * 32]
    assert entry == {"last_activity": NOW - 10, "ever_connected": False, "expires_at": None}
    assert StateFile(path, clock).load()["c" * 32].expires_at is None


def test_each_save_is_complete_on_disk_and_durable(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every save leaves the whole new content on disk: the bytes are flushed and fsynced in a
    temporary sibling, renamed over the file, then the directory is fsynced; no temporary is
    left behind, and each later save replaces the earlier content."""
    path = tmp_path / "dir" / "state.json"
    steps: list[tuple[str, Any]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        kind = "file" if stat.S_ISREG(info.st_mode) else "dir"
        steps.append(("fsync", kind, info.st_size if kind == "file" else None))
        real_fsync(fd)

    def rename(source: Any, target: Any) -> None:
        steps.append(("rename", Path(target).name, Path(source).stat().st_size))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    state = StateFile(path, clock, in_thread=False)
    for count in (1, 3, 0):
        steps.clear()
        sandboxes = [sandbox(f"{n:032x}", ever_connected=bool(n % 2)) for n in range(count)]
        state.save(sandboxes)
        content = path.read_bytes()
        size = len(content)
        assert steps == [
            ("fsync", "file", size),  # flushed before the fsync: all bytes reached the file
            ("rename", "state.json", size),
            ("fsync", "dir", None),
        ]
        assert set(json.loads(content)["sandboxes"]) == {s.sandbox_id for s in sandboxes}
        assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails part-way (here: the fsync) leaves the previous state file as it was
    and no temporary file."""
    path = tmp_path / "state.json"
    state = StateFile(path, clock, in_thread=False)
    state.save([sandbox("d" * 32)])
    before = path.read_bytes()

    def broken(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    failures: list[Any] = []
    state.save([sandbox("e" * 32)]).addErrback(failures.append)
    assert [f.type for f in failures] == [OSError]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_no_path_means_nothing_is_written_or_read(tmp_path: Path, clock: Clock) -> None:
    """A gateway without a state directory keeps nothing (and fails nothing)."""
    state = StateFile(None, clock, in_thread=False)
    state.save([sandbox("f" * 32)])
    assert state.load() == {}
    assert StateFile(tmp_path / "missing.json", clock).load() == {}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b'{"version": 1, "sandboxes": {"' + b"a" * 32 + b'": {"ever_connected": true}}}',
        b'{"version": 1}',
        b"[1, 2]",
        b"\xff\xfe",
    ],
    ids=["empty", "truncated", "entry-without-activity", "no-sandboxes", "not-an-object", "binary"],
)
def test_unreadable_state_file_is_logged_and_set_aside(
    tmp_path: Path, clock: Clock, critical: list[dict[str, Any]], content: bytes
) -> None:
    """A corrupt or empty state file at start-up is logged as critical and renamed aside
    (``state.json.corrupt-<UTC time>``, bytes intact), never silently taken for no state; the
    next save writes a fresh file beside it."""
    path = tmp_path / "state.json"
    path.write_bytes(content)
    state = StateFile(path, clock, in_thread=False)
    assert state.load() == {}
    aside = tmp_path / "state.json.corrupt-20231114T221320Z"
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name]
    assert aside.read_bytes() == content
    assert len(critical) == 1 and critical[0]["aside"] == str(aside)
    assert "unreadable" in critical[0]["log_format"]
    state.save([sandbox("a" * 32)])
    assert set(StateFile(path, clock).load()) == {"a" * 32}
    assert aside.read_bytes() == content


def test_a_second_corrupt_file_does_not_overwrite_the_first(
    tmp_path: Path, clock: Clock, critical: list[dict[str, Any]]
) -> None:
    """Two unreadable files set aside at the same second are both kept."""
    path = tmp_path / "state.json"
    for content in (b"first", b"second"):
        path.write_bytes(content)
        assert StateFile(path, clock).load() == {}
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert kept == {
        "state.json.corrupt-20231114T221320Z": b"first",
        "state.json.corrupt-20231114T221320Z-2": b"second",
    }
    assert len(critical) == 2


def test_a_state_file_that_cannot_be_set_aside_is_still_reported(
    tmp_path: Path, clock: Clock, critical: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the unreadable file cannot be renamed, that is logged as critical too."""
    path = tmp_path / "state.json"
    path.write_bytes(b"{")

    def refuse(self: Path, target: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", refuse)
    assert StateFile(path, clock).load() == {}
    assert len(critical) == 1 and "could not be set aside" in critical[0]["log_format"]
    assert path.read_bytes() == b"{"


@pytest_twisted.ensureDeferred
async def test_the_gateway_saves_in_a_thread_and_in_turn(tmp_path: Path) -> None:
    """With the real reactor, saves run in its thread pool, one at a time: the file on disk
    after both is the later save, whole."""
    from twisted.internet import reactor

    path = tmp_path / "state.json"
    state = StateFile(path, reactor)
    first = state.save([sandbox("a" * 32)])
    second = state.save([sandbox("b" * 32), sandbox("c" * 32, ever_connected=True)])
    await first
    await second
    assert json.loads(path.read_bytes()) == {
        "version": 1,
        "sandboxes": {
            "b" * 32: {"last_activity": NOW - 10, "ever_connected": False, "expires_at": None},
            "c" * 32: {"last_activity": NOW - 10, "ever_connected": True, "expires_at": None},
        },
    }


def test_an_entry_without_optional_fields_loads_with_their_defaults(
    tmp_path: Path, clock: Clock
) -> None:
    """Only ``last_activity`` is required: no attachment, expiry, assignment or creation time
    are read as never attached, no expiry, not from the pool, unknown."""
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "sandboxes": {"a" * 32: {"last_activity": 5}}}))
    assert StateFile(path, clock).load() == {
        "a" * 32: SavedSandbox(last_activity=5.0, ever_connected=False, expires_at=None)
    }


def test_the_operator_is_told_which_file_why_where_it_went_and_what_is_lost(
    tmp_path: Path, clock: Clock, log_messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The critical line names the state file, the parse error, the name it was kept under
    and what starting without it costs; if it cannot be set aside, the rename error instead."""
    path = tmp_path / "state.json"
    path.write_bytes(b"{")
    StateFile(path, clock, in_thread=False).load()
    aside = tmp_path / "state.json.corrupt-20231114T221320Z"
    (line,) = [m for m in log_messages if m.startswith("state file")]
    assert line.startswith(f"state file {path} is unreadable (Expecting property name")
    assert line.endswith(
        f"; kept as {aside}. Starting without saved state: idle clocks restart now, "
        "lifetime extensions and pool hand-outs are lost"
    )

    log_messages.clear()
    path.write_bytes(b"{")

    def refuse(self: Path, target: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", refuse)
    StateFile(path, clock, in_thread=False).load()
    (line,) = [m for m in log_messages if m.startswith("state file")]
    assert line.startswith(f"state file {path} is unreadable (Expecting property name")
    assert line.endswith(
        "and could not be set aside ([Errno 13] Permission denied): idle clocks, lifetime "
        "extensions and pool hand-outs are lost"
    )


@pytest.mark.parametrize("content", [b"[]", b'{"version": 1, "sandboxes": []}', b"{}"])
def test_json_that_is_not_a_state_file_is_set_aside_and_named_so(
    content: bytes, tmp_path: Path, clock: Clock, log_messages: list[str]
) -> None:
    """Valid JSON of another shape (a list, a ``sandboxes`` that is not an object, none at
    all) is an unreadable state file like any: set aside, and the log says why."""
    path = tmp_path / "state.json"
    path.write_bytes(content)
    assert StateFile(path, clock, in_thread=False).load() == {}
    assert not path.exists()
    (line,) = [m for m in log_messages if m.startswith("state file")]
    assert line.startswith(
        f"state file {path} is unreadable (not a state file (no 'sandboxes' object)); kept as"
    )
