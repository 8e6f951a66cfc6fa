"""``SnapshotStore`` without an agent: snapshots are tars streamed from the agent's
``GET /files/snapshot`` into ``<id>.tar`` (``.tar.part`` until complete) with a ``<id>.json``
sidecar; only their owner sees, uses or deletes them; ``restore`` streams one back with
``PUT /files/snapshot``. The agent is a recording stand-in for ``AgentFiles.request``
answering with in-memory responses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed

from twistedgw import snapshots as snapshots_module
from twistedgw.sandbox import Sandbox, SandboxSettings
from twistedgw.snapshots import (
    SNAPSHOT_ID_LENGTH,
    Snapshot,
    SnapshotNotFound,
    SnapshotStore,
    _ToFile,
    is_valid_snapshot_id,
)
from twistedgw.web.errors import APIError

SANDBOX = "d" * 32


class FakeTransport:
    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    """An ``IResponse`` whose body is delivered at once, in ``chunks``, then ends with
    ``end`` (``ResponseDone``: complete)."""

    def __init__(self, code: int, chunks: list[bytes], end: Exception | None = None) -> None:
        self.code = code
        self.chunks = chunks
        self.end = end or ResponseDone()
        self.transport = FakeTransport()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        protocol.connectionLost(Failure(self.end))


class Collect:
    """An ``IConsumer`` for a request body."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class FakeFiles:
    """``AgentFiles.request``'s shape, recording each request and reading request bodies."""

    def __init__(self, *responses: FakeResponse) -> None:
        self.responses = list(responses)
        self.requests: list[tuple[Any, ...]] = []
        self.bodies: list[bytes] = []

    def request(
        self,
        sandbox: Sandbox,
        method: bytes,
        target: bytes,
        headers: dict[bytes, bytes] | None = None,
        body: Any = None,
    ) -> Deferred[Any]:
        self.requests.append((sandbox.sandbox_id, method, target, headers))
        response = self.responses.pop(0)
        if body is None:
            return succeed(response)
        consumer = Collect()
        d = body.startProducing(consumer)

        def sent(_: object) -> Any:
            self.bodies.append(consumer.data)
            return response

        return d.addCallback(sent)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        self.now += 1
        return self.now


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def sandbox(sandbox_id: str = SANDBOX) -> Sandbox:
    return Sandbox(sandbox_id, "cid", 0.0, "", "", 0, "s", 0.0, SandboxSettings(idle_timeout=9))


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(snapshots_module, "time", fake)
    return fake


def store(directory: Path, *responses: FakeResponse) -> tuple[SnapshotStore, FakeFiles]:
    files = FakeFiles(*responses)
    return SnapshotStore(directory, files, None), files  # type: ignore[arg-type]


def test_snapshot_ids_are_24_lowercase_hex_digits() -> None:
    """Only 24 lowercase hex digits are an id (anything else could name another file)."""
    assert SNAPSHOT_ID_LENGTH == 24
    assert is_valid_snapshot_id("0123456789abcdef01234567")
    for bad in ("0123456789abcdef0123456", "0123456789abcdef012345678", "A" * 24, "../" * 8):
        assert not is_valid_snapshot_id(bad), bad


@pytest_twisted.ensureDeferred
async def test_create_streams_the_tar_and_writes_its_record(
    tmp_path: Path, fake_time: FakeTime
) -> None:
    """``GET /files/snapshot`` of the sandbox, its chunks written to ``<id>.tar`` (nothing left
    as ``.part``), the size counted, and the sidecar holding id, size, time, sandbox and owner;
    the directory is made private; ``to_json`` leaves the owner out."""
    directory = tmp_path / "snaps"
    snapshots, files = store(directory, FakeResponse(200, [b"abc", b"defg"]))
    made = await snapshots.create(sandbox(), "owner-1")
    assert files.requests == [(SANDBOX, b"GET", b"/files/snapshot", None)]
    assert is_valid_snapshot_id(made.snapshot_id)
    assert made == Snapshot(made.snapshot_id, 7, 1001.0, SANDBOX, "owner-1")
    assert (directory / f"{made.snapshot_id}.tar").read_bytes() == b"abcdefg"
    assert json.loads((directory / f"{made.snapshot_id}.json").read_text()) == {
        "snapshot_id": made.snapshot_id,
        "size": 7,
        "created_at": 1001.0,
        "sandbox_id": SANDBOX,
        "owner": "owner-1",
    }
    assert listing(directory) == [
        f"{made.snapshot_id}.json",
        f"{made.snapshot_id}.tar",
    ]
    assert directory.stat().st_mode & 0o777 == 0o700
    assert "owner" not in made.to_json()


@pytest_twisted.ensureDeferred
async def test_an_agent_error_on_create_is_its_status_and_message(tmp_path: Path) -> None:
    """A non-200 answer: ``APIError`` with the agent's status and ``error``; no file left."""
    body = json.dumps({"error": "disk full"}).encode()
    snapshots, _ = store(tmp_path, FakeResponse(507, [body]))
    with pytest.raises(APIError) as caught:
        await snapshots.create(sandbox(), None)
    assert (caught.value.status, caught.value.message) == (507, "disk full")
    assert listing(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_a_body_cut_short_leaves_no_snapshot(tmp_path: Path) -> None:
    """The agent's stream failing midway: the failure is raised and the ``.part`` file is
    removed; no tar, no record."""
    cut = ResponseFailed([Failure(ConnectionError("agent went away"))])
    snapshots, _ = store(tmp_path, FakeResponse(200, [b"partial"], end=cut))
    with pytest.raises(ResponseFailed):
        await snapshots.create(sandbox(), None)
    assert listing(tmp_path) == []


def test_a_write_error_stops_the_stream_and_fails_the_sink(tmp_path: Path) -> None:
    """A failing write (disk full): the producer is stopped, later data is ignored, and the
    sink fails with the ``OSError`` even though the response completed."""

    class Full:
        writes = 0

        def write(self, data: bytes) -> None:
            self.writes += 1
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    sink = _ToFile(tmp_path / "x.part")
    sink.file.close()
    full = Full()
    sink.file = full  # type: ignore[assignment]
    transport = FakeTransport()
    sink.makeConnection(transport)  # type: ignore[arg-type]
    sink.dataReceived(b"a")
    sink.dataReceived(b"b")
    assert transport.stopped and full.writes == 1 and sink.size == 0
    failures: list[Failure] = []
    sink.done.addErrback(failures.append)
    sink.connectionLost(Failure(ResponseDone()))
    [failure] = failures
    assert failure.check(OSError) and "No space" in str(failure.value)


@pytest_twisted.ensureDeferred
async def test_only_the_owner_gets_lists_and_deletes_a_snapshot(
    tmp_path: Path, fake_time: FakeTime
) -> None:
    """``get``/``visible_to``/``delete`` by owner: another owner (or none) sees 404
    ``SnapshotNotFound``; the listing is oldest first; delete removes tar and record."""
    snapshots, _ = store(
        tmp_path,
        FakeResponse(200, [b"1"]),
        FakeResponse(200, [b"22"]),
        FakeResponse(200, [b"333"]),
    )
    first = await snapshots.create(sandbox(), "alice")
    second = await snapshots.create(sandbox(), "alice")
    bobs = await snapshots.create(sandbox(), "bob")
    assert snapshots.get(first.snapshot_id, "alice") == first
    assert [s.snapshot_id for s in snapshots.visible_to("alice")] == [
        first.snapshot_id,
        second.snapshot_id,
    ]
    assert snapshots.visible_to("bob") == [bobs]
    assert snapshots.visible_to(None) == []
    with pytest.raises(SnapshotNotFound) as caught:
        snapshots.get(first.snapshot_id, "bob")
    assert caught.value.status == 404
    assert caught.value.message == f"Snapshot {first.snapshot_id} not found"
    with pytest.raises(SnapshotNotFound):
        snapshots.delete(first.snapshot_id, "bob")
    assert snapshots.delete(first.snapshot_id, "alice") == first
    assert not (tmp_path / f"{first.snapshot_id}.tar").exists()
    assert not (tmp_path / f"{first.snapshot_id}.json").exists()
    assert snapshots.visible_to("alice") == [second]


def test_unowned_snapshots_are_seen_only_without_a_token(tmp_path: Path) -> None:
    """A record whose owner is ``None`` (a gateway without tokens) is seen with owner
    ``None`` only."""
    snapshot_id = "b" * 24
    (tmp_path / f"{snapshot_id}.tar").write_bytes(b"x")
    record = {"snapshot_id": snapshot_id, "size": 1, "created_at": 5, "sandbox_id": SANDBOX}
    (tmp_path / f"{snapshot_id}.json").write_text(json.dumps({**record, "owner": None}))
    snapshots, _ = store(tmp_path)
    assert snapshots.get(snapshot_id, None) == Snapshot(snapshot_id, 1, 5.0, SANDBOX, None)
    with pytest.raises(SnapshotNotFound):
        snapshots.get(snapshot_id, "someone")


def test_broken_missing_or_foreign_files_are_not_snapshots(tmp_path: Path) -> None:
    """Not found: a bad id (never a path), a record without its tar, an unreadable record,
    a ``.json`` whose name is no id; a missing directory lists nothing."""
    snapshots, _ = store(tmp_path / "none-yet")
    assert snapshots.visible_to("o") == []
    snapshots, _ = store(tmp_path)
    no_tar, garbled, long_id = "c" * 24, "e" * 24, "f" * 64
    (tmp_path / f"{no_tar}.json").write_text(json.dumps({"owner": "o", "size": 1}))
    (tmp_path / f"{garbled}.json").write_text("{not json")
    (tmp_path / f"{garbled}.tar").write_bytes(b"")
    (tmp_path / f"{long_id}.json").write_text(json.dumps({"owner": "o", "size": 1}))
    (tmp_path / f"{long_id}.tar").write_bytes(b"")
    for snapshot_id in (no_tar, garbled, long_id, "../../etc/passwd"):
        with pytest.raises(SnapshotNotFound):
            snapshots.get(snapshot_id, "o")
    assert snapshots.visible_to("o") == []
    with pytest.raises(SnapshotNotFound, match=r"\ASnapshot f{64} not found\Z"):
        snapshots.get("f" * 100, "o")


@pytest_twisted.ensureDeferred
async def test_restore_streams_the_tar_into_the_sandbox(
    tmp_path: Path, fake_time: FakeTime
) -> None:
    """``PUT /files/snapshot`` to the new sandbox with the tar's bytes as the body."""
    snapshots, files = store(
        tmp_path, FakeResponse(200, [b"tar-", b"bytes"]), FakeResponse(200, [b"{}"])
    )
    made = await snapshots.create(sandbox(), "o")
    await snapshots.restore(made, sandbox("9" * 32))
    assert files.requests[1] == ("9" * 32, b"PUT", b"/files/snapshot", {})
    assert files.bodies == [b"tar-bytes"]


@pytest_twisted.ensureDeferred
async def test_restore_errors_name_the_agent_message_and_a_missing_tar(tmp_path: Path) -> None:
    """The agent refusing: ``APIError`` with its status and "restoring the snapshot: ...";
    a tar gone meanwhile: ``SnapshotNotFound`` and nothing is sent."""
    snapshot_id = "a" * 24
    (tmp_path / f"{snapshot_id}.tar").write_bytes(b"x")
    answer = json.dumps({"error": "bad tar entry"}).encode()
    snapshots, files = store(tmp_path, FakeResponse(400, [answer]))
    snapshot = Snapshot(snapshot_id, 1, 1.0, SANDBOX, None)
    with pytest.raises(APIError) as caught:
        await snapshots.restore(snapshot, sandbox())
    assert caught.value.status == 400
    assert caught.value.message == "restoring the snapshot: bad tar entry"
    (tmp_path / f"{snapshot_id}.tar").unlink()
    with pytest.raises(SnapshotNotFound):
        await snapshots.restore(snapshot, sandbox())
    assert len(files.requests) == 1


def test_the_listing_is_oldest_first_not_by_name(tmp_path: Path) -> None:
    """``visible_to`` sorts by creation time, whatever the ids' order."""
    for snapshot_id, created_at in (("a" * 24, 9.0), ("b" * 24, 3.0), ("c" * 24, 5.0)):
        (tmp_path / f"{snapshot_id}.tar").write_bytes(b"x")
        record = {"size": 1, "created_at": created_at, "sandbox_id": SANDBOX, "owner": "o"}
        (tmp_path / f"{snapshot_id}.json").write_text(json.dumps(record))
    snapshots, _ = store(tmp_path)
    assert [s.snapshot_id[0] for s in snapshots.visible_to("o")] == ["b", "c", "a"]
