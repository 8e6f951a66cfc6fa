"""Files in and out of a sandbox (issue 15), on the real engine and image, through a token.

Every request here carries token A; a second token (B) must get 404 for A's sandbox on every
file route. Uploads and downloads stream through the gateway and the agent (whose worker runs
as the sandbox user), tars are checked entry by entry, and a full disk answers 507 with
nothing partial left behind.
"""

from __future__ import annotations

import functools
import json
import secrets
import tarfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from websockets.sync.client import connect

from tests.integration.conftest import GatewayProcess, remove_instance_containers
from tests.integration.helpers import recv, rss_kib, run
from tests.scenarios import (
    ESCAPING_ENTRIES,
    single_ranges_are_206,
    tar_after_a_good_entry,
    tar_contents,
    tar_entry,
    tar_of,
)

TOKEN_A = secrets.token_urlsafe(24)
TOKEN_B = secrets.token_urlsafe(24)
A = {"Authorization": f"Bearer {TOKEN_A}"}
B = {"Authorization": f"Bearer {TOKEN_B}"}
#: Every byte value, in every position modulo 256, several times over.
ALL_BYTES = bytes(range(256)) * 4099 + bytes(range(255, -1, -1)) * 17


def make_tokened(tmp: Any, *args: str) -> GatewayProcess:
    tokens = tmp / "tokens"
    tokens.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    gw = GatewayProcess(f"itf-{secrets.token_hex(3)}", "--tokens-file", str(tokens), *args)
    gw.start()
    return gw


@pytest.fixture(scope="module")
def gateway(docker_client: Any, tmp_path_factory: Any) -> Iterator[GatewayProcess]:
    """A token gateway whose sandboxes have a 24 MiB home (a disk that fills quickly)."""
    gw = make_tokened(tmp_path_factory.mktemp("files"), "--home-size", "24m")
    yield gw
    gw.stop()
    remove_instance_containers(docker_client, gw.instance)


@pytest.fixture(scope="module")
def sandbox(gateway: GatewayProcess) -> Iterator[str]:
    sandbox_id = gateway.create(headers=A)
    yield sandbox_id
    requests.delete(f"{gateway.url}/sandboxes/{sandbox_id}", headers=A, timeout=60)


def files_url(gateway: GatewayProcess, sandbox_id: str, route: str = "") -> str:
    return f"{gateway.url}/sandboxes/{sandbox_id}/files{route}"


def put(gateway: GatewayProcess, sandbox_id: str, path: str, data: Any, **params: str) -> Any:
    return requests.put(
        files_url(gateway, sandbox_id),
        params={"path": path, **params},
        data=data,
        headers=A,
        timeout=120,
    )


def get(gateway: GatewayProcess, sandbox_id: str, path: str, **headers: str) -> Any:
    return requests.get(
        files_url(gateway, sandbox_id),
        params={"path": path},
        headers={**A, **headers},
        timeout=120,
    )


def sh(gateway: GatewayProcess, sandbox_id: str, command: str) -> dict[str, Any]:
    with connect(f"{gateway.ws_url}/ws/{sandbox_id}", additional_headers=A) as ws:
        return run(ws, command)


# -- single files ----------------------------------------------------------------------------


def test_binary_round_trip_every_byte_value(gateway: GatewayProcess, sandbox: str) -> None:
    """A body with every byte value comes back identical, owned by the sandbox user, with
    the mode asked for; HEAD gives its size and Last-Modified without a body."""
    response = put(gateway, sandbox, "data/all.bin", ALL_BYTES, mode="0640", mkdirs="true")
    assert response.status_code == 201, response.text
    assert response.json() == {"path": "/home/sandbox/data/all.bin", "size": len(ALL_BYTES)}
    back = get(gateway, sandbox, "data/all.bin")
    assert back.status_code == 200
    assert back.content == ALL_BYTES
    assert back.headers["Content-Length"] == str(len(ALL_BYTES))
    assert back.headers["Last-Modified"].endswith("GMT")
    head = requests.head(
        files_url(gateway, sandbox), params={"path": "data/all.bin"}, headers=A, timeout=30
    )
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(ALL_BYTES))
    assert head.content == b""
    owner = sh(gateway, sandbox, "stat -c '%U %a' /home/sandbox/data/all.bin")
    assert owner["output"] == "sandbox 640\n"
    # Through a chunked request body (no Content-Length) too.
    chunked = put(gateway, sandbox, "/tmp/chunked.bin", iter([ALL_BYTES[:1000], ALL_BYTES[1000:]]))
    assert chunked.status_code == 201, chunked.text
    assert get(gateway, sandbox, "/tmp/chunked.bin").content == ALL_BYTES


def test_range_requests(gateway: GatewayProcess, sandbox: str) -> None:
    """Single byte ranges answer 206 with Content-Range; a range past the end is 416."""
    assert put(gateway, sandbox, "range.bin", ALL_BYTES).status_code == 201
    single_ranges_are_206(functools.partial(get, gateway, sandbox), "range.bin", ALL_BYTES)


def test_status_codes(gateway: GatewayProcess, sandbox: str) -> None:
    """404 for a missing path, 409 for a directory where a file is needed (and the reverse),
    400 for an empty path or one with NUL; all JSON."""
    missing = get(gateway, sandbox, "no/such/file")
    assert missing.status_code == 404 and "no such" in missing.json()["error"]
    assert put(gateway, sandbox, "no/such/dir/f", b"x").status_code == 404
    mkdir = requests.post(
        files_url(gateway, sandbox, "/mkdir"), params={"path": "d1/d2"}, headers=A, timeout=30
    )
    assert mkdir.status_code == 201
    assert get(gateway, sandbox, "d1").status_code == 409
    assert put(gateway, sandbox, "d1", b"x").status_code == 409
    assert put(gateway, sandbox, "plain", b"x").status_code == 201
    listing = requests.get(
        files_url(gateway, sandbox, "/list"), params={"path": "plain"}, headers=A, timeout=30
    )
    assert listing.status_code == 409
    for bad in ("", "a\x00b"):
        response = get(gateway, sandbox, bad)
        assert response.status_code == 400, bad
        assert "error" in response.json()


def test_list_mkdir_delete(gateway: GatewayProcess, sandbox: str) -> None:
    """A listing gives name, path, type, size, mode and mtime, to ``depth``; DELETE removes a
    file, refuses a non-empty directory without ``recursive`` and removes it with it."""
    assert put(gateway, sandbox, "tree/a/b/file.txt", b"hello", mkdirs="true").status_code == 201
    sh(gateway, sandbox, "ln -s a /home/sandbox/tree/link")
    url = files_url(gateway, sandbox, "/list")
    top = requests.get(url, params={"path": "tree"}, headers=A, timeout=30).json()
    assert [(e["name"], e["type"]) for e in top] == [("a", "dir"), ("link", "symlink")]
    deep = requests.get(url, params={"path": "tree", "depth": "3"}, headers=A, timeout=30).json()
    by_path = {e["path"]: e for e in deep}
    leaf = by_path["/home/sandbox/tree/a/b/file.txt"]
    assert leaf["type"] == "file" and leaf["size"] == 5 and leaf["mode"] == "0644"
    assert leaf["mtime"] > 0
    delete = files_url(gateway, sandbox)
    assert (
        requests.delete(
            delete, params={"path": "tree/a/b/file.txt"}, headers=A, timeout=30
        ).status_code
        == 200
    )
    assert get(gateway, sandbox, "tree/a/b/file.txt").status_code == 404
    refused = requests.delete(delete, params={"path": "tree"}, headers=A, timeout=30)
    assert refused.status_code == 409
    removed = requests.delete(
        delete, params={"path": "tree", "recursive": "true"}, headers=A, timeout=30
    )
    assert removed.status_code == 200
    assert get(gateway, sandbox, "tree").status_code == 404


def test_disk_full_is_507_and_leaves_nothing(gateway: GatewayProcess, sandbox: str) -> None:
    """An upload bigger than the sandbox's 24 MiB home answers 507, and neither the file nor
    a temporary file is left; the disk's space is back."""
    big = b"\xa5" * (40 * 1024 * 1024)
    response = put(gateway, sandbox, "full/big.bin", big, mkdirs="true")
    assert response.status_code == 507, response.text
    assert "space" in response.json()["error"]
    listing = requests.get(
        files_url(gateway, sandbox, "/list"), params={"path": "full"}, headers=A, timeout=30
    )
    assert listing.json() == []
    used = sh(gateway, sandbox, "du -sk /home/sandbox/full | cut -f1")["output"]
    assert int(used) < 64
    # The sandbox still takes files afterwards.
    assert put(gateway, sandbox, "full/small.bin", b"ok").status_code == 201


def test_max_upload_is_413(make_gateway: Any) -> None:
    """Over --max-upload, by Content-Length or along a chunked body: 413."""
    gateway = make_gateway("--max-upload", "1000")
    sandbox_id = gateway.create()
    url = files_url(gateway, sandbox_id)
    big = requests.put(url, params={"path": "x"}, data=b"x" * 2000, timeout=30)
    assert big.status_code == 413
    chunked = requests.put(url, params={"path": "y"}, data=iter([b"y" * 600] * 4), timeout=30)
    assert chunked.status_code == 413
    ok = requests.put(url, params={"path": "z"}, data=b"z" * 1000, timeout=30)
    assert ok.status_code == 201
    listing = requests.get(f"{url}/list", params={"path": "."}, timeout=30).json()
    assert [e["name"] for e in listing] == ["z"]


# -- tars ------------------------------------------------------------------------------------


def test_archive_round_trip(gateway: GatewayProcess, sandbox: str) -> None:
    """A tar uploaded into a directory lands there (files, dirs, links inside it), and the
    directory comes back as a tar (and as tar.gz) with the same contents."""
    body = tar_of(
        (tar_entry("top", tarfile.DIRTYPE, mode=0o755), None),
        (tar_entry("top/one.bin"), ALL_BYTES),
        (tar_entry("top/sub", tarfile.DIRTYPE, mode=0o700), None),
        (tar_entry("top/sub/two.txt", mode=0o600), b"two"),
        (tar_entry("top/sub/ln", tarfile.SYMTYPE, linkname="two.txt"), None),
        (tar_entry("top/hard", tarfile.LNKTYPE, linkname="top/one.bin"), None),
    )
    url = files_url(gateway, sandbox, "/archive")
    response = requests.put(url, params={"path": "unpacked"}, data=body, headers=A, timeout=60)
    assert response.status_code == 201, response.text
    assert get(gateway, sandbox, "unpacked/top/one.bin").content == ALL_BYTES
    assert get(gateway, sandbox, "unpacked/top/sub/ln").content == b"two"
    assert get(gateway, sandbox, "unpacked/top/hard").content == ALL_BYTES
    for fmt, mode in (("tar", "r|"), ("tar.gz", "r|gz")):
        back = requests.get(
            url, params={"path": "unpacked", "format": fmt}, headers=A, timeout=60, stream=True
        )
        assert back.status_code == 200
        contents = tar_contents(back.raw, mode)
        # The two names of one inode: the first in the walk is the file, then a hard link.
        assert contents["top/hard"] == ALL_BYTES
        assert contents["top/one.bin"] == "=>top/hard"
        assert contents["top/sub/two.txt"] == b"two"
        assert contents["top/sub/ln"] == "->two.txt"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        *ESCAPING_ENTRIES,
        (tar_entry("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
        (tar_entry("blk", tarfile.BLKTYPE, devmajor=8, devminor=0), "device"),
        (tar_entry("suid", mode=0o4755), "setuid"),
        (tar_entry("sgid", mode=0o2755), "setgid"),
    ],
    ids=[
        "absolute",
        "dotdot",
        "symlink-out",
        "symlink-abs",
        "hardlink-out",
        "chr",
        "blk",
        "setuid",
        "setgid",
    ],
)
def test_refused_tar_entries(
    gateway: GatewayProcess, sandbox: str, bad: tarfile.TarInfo, why: str
) -> None:
    """A tar with a dangerous entry (after a good one) is refused with that entry named, and
    nothing of it is extracted, not even the good entry before it."""
    body = tar_after_a_good_entry(bad)
    target = f"refused-{secrets.token_hex(3)}"
    response = requests.put(
        files_url(gateway, sandbox, "/archive"),
        params={"path": target},
        data=body,
        headers=A,
        timeout=60,
    )
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["entry"] == bad.name
    assert why in answer["error"]
    listing = requests.get(
        files_url(gateway, sandbox, "/list"), params={"path": target}, headers=A, timeout=30
    )
    assert listing.json() == []


# -- tokens ----------------------------------------------------------------------------------


def test_other_tokens_sandbox_is_404_on_every_file_route(
    gateway: GatewayProcess, sandbox: str
) -> None:
    """Token B gets 404 for token A's sandbox on every file route, uploads included (and
    401 without a token); A's file is untouched."""
    assert put(gateway, sandbox, "mine.txt", b"mine").status_code == 201
    base = files_url(gateway, sandbox)
    calls = [
        ("GET", base, {"path": "mine.txt"}),
        ("HEAD", base, {"path": "mine.txt"}),
        ("PUT", base, {"path": "mine.txt"}),
        ("DELETE", base, {"path": "mine.txt"}),
        ("GET", base + "/list", {"path": "."}),
        ("POST", base + "/mkdir", {"path": "x"}),
        ("GET", base + "/archive", {"path": "."}),
        ("PUT", base + "/archive", {"path": "."}),
    ]
    for method, url, params in calls:
        body = b"theirs" if method == "PUT" else None
        response = requests.request(method, url, params=params, headers=B, data=body, timeout=30)
        assert response.status_code == 404, (method, url, response.status_code)
        anonymous = requests.request(method, url, params=params, data=body, timeout=30)
        assert anonymous.status_code == 401, (method, url)
    assert get(gateway, sandbox, "mine.txt").content == b"mine"


# -- network none ----------------------------------------------------------------------------


def test_files_without_a_network(gateway: GatewayProcess) -> None:
    """A sandbox with ``network: none`` (agent on a Unix socket) moves files the same way."""
    sandbox_id = gateway.create(headers=A, json={"network": "none"})
    try:
        assert put(gateway, sandbox_id, "n.bin", ALL_BYTES).status_code == 201
        assert get(gateway, sandbox_id, "n.bin").content == ALL_BYTES
    finally:
        requests.delete(f"{gateway.url}/sandboxes/{sandbox_id}", headers=A, timeout=60)


# -- pause -----------------------------------------------------------------------------------


def test_pause_refuses_commands_until_resume(gateway: GatewayProcess, sandbox: str) -> None:
    """Paused: a command gets the ``paused`` error and file routes 409; resumed: both work."""
    base = f"{gateway.url}/sandboxes/{sandbox}"
    with connect(f"{gateway.ws_url}/ws/{sandbox}", additional_headers=A) as ws:
        assert run(ws, "echo before")["output"] == "before\n"
        paused = requests.post(base + "/pause", headers=A, timeout=30)
        assert paused.status_code == 200 and paused.json()["paused"] is True
        refused = run(ws, "echo during")
        assert refused["error_code"] == "paused"
        assert get(gateway, sandbox, "mine.txt").status_code == 409
        assert requests.post(base + "/pause", headers=B, timeout=30).status_code == 404
        resumed = requests.post(base + "/resume", headers=A, timeout=30)
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
        assert run(ws, "echo after")["output"] == "after\n"


# -- a slow 1 GiB upload ---------------------------------------------------------------------


def test_slow_1gib_upload_keeps_gateway_memory_flat(docker_client: Any, tmp_path: Any) -> None:
    """1 GiB sent slowly (paced, about 40 s) arrives whole, and the gateway's RSS grows by
    less than 32 MiB meanwhile: the body streams, it is never held."""
    gateway = make_tokened(tmp_path, "--home-size", "1100m", "--memory", "1600m")
    try:
        sandbox_id = gateway.create(headers=A)
        piece = bytes(range(256)) * 4096  # 1 MiB
        total = 1024
        samples: list[int] = []
        before = rss_kib(gateway.pid)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(rss_kib(gateway.pid))
                time.sleep(0.2)

        class SlowBody:
            """A file-like body of ``total`` MiB (so it has a Content-Length), read at about
            25 MiB/s: a slow client, for a gateway on loopback."""

            def __init__(self) -> None:
                self.sent = 0
                self.start = time.monotonic()

            def __len__(self) -> int:
                return total * len(piece)

            def read(self, size: int = -1) -> bytes:
                if self.sent >= total:
                    return b""
                lag = self.start + self.sent / 25.0 - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
                self.sent += 1
                return piece

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        response = requests.put(
            files_url(gateway, sandbox_id),
            params={"path": "big.bin"},
            data=SlowBody(),
            headers=A,
            timeout=600,
        )
        done.set()
        watcher.join()
        assert response.status_code == 201, response.text
        assert response.json()["size"] == total * len(piece)
        growth_mib = (max(samples) - before) / 1024
        assert growth_mib < 32, f"gateway RSS grew by {growth_mib:.1f} MiB"
        check = sh(gateway, sandbox_id, "stat -c %s /home/sandbox/big.bin")
        assert check["output"] == f"{total * len(piece)}\n"
    finally:
        gateway.stop()
        remove_instance_containers(docker_client, gateway.instance)


# -- snapshots -------------------------------------------------------------------------------


def test_snapshot_then_create_from_it(gateway: GatewayProcess, sandbox: str) -> None:
    """A snapshot holds home and /tmp; a sandbox created from it has those files; the
    snapshot is listed, used and deleted by its owner only (404 for another token)."""
    assert put(gateway, sandbox, "snap/keep.bin", ALL_BYTES, mkdirs="true").status_code == 201
    sh(gateway, sandbox, "echo scratch > /tmp/scratch.txt")
    made = requests.post(f"{gateway.url}/sandboxes/{sandbox}/snapshots", headers=A, timeout=60)
    assert made.status_code == 201, made.text
    snapshot = made.json()
    assert set(snapshot) >= {"snapshot_id", "size", "created_at"}
    assert snapshot["size"] > len(ALL_BYTES)
    sid = snapshot["snapshot_id"]
    mine = requests.get(f"{gateway.url}/snapshots", headers=A, timeout=30).json()
    assert sid in [s["snapshot_id"] for s in mine]
    assert requests.get(f"{gateway.url}/snapshots", headers=B, timeout=30).json() == []
    theirs = requests.post(
        f"{gateway.url}/sandboxes", json={"from_snapshot": sid}, headers=B, timeout=60
    )
    assert theirs.status_code == 404
    restored = gateway.create(headers=A, json={"from_snapshot": sid})
    try:
        assert get(gateway, restored, "snap/keep.bin").content == ALL_BYTES
        assert get(gateway, restored, "/tmp/scratch.txt").content == b"scratch\n"
        owner = sh(gateway, restored, "stat -c %U /home/sandbox/snap/keep.bin")["output"]
        assert owner == "sandbox\n"
    finally:
        requests.delete(f"{gateway.url}/sandboxes/{restored}", headers=A, timeout=60)
    url = f"{gateway.url}/snapshots/{sid}"
    assert requests.delete(url, headers=B, timeout=30).status_code == 404
    assert requests.delete(url, headers=A, timeout=30).status_code == 200
    assert requests.get(f"{gateway.url}/snapshots", headers=A, timeout=30).json() == []


# -- watching --------------------------------------------------------------------------------


def test_watch_sees_a_touch(gateway: GatewayProcess, sandbox: str) -> None:
    """A watch on a directory answers ``watching``, then reports a ``touch`` (created) and an
    append (modified) of a file in it, and a file in a subdirectory when recursive, until
    ``unwatch``."""
    sh(gateway, sandbox, "mkdir -p /home/sandbox/watched/sub")
    with connect(f"{gateway.ws_url}/ws/{sandbox}", additional_headers=A) as ws:
        ws.send(
            json.dumps({"type": "watch", "path": "watched", "recursive": True, "request_id": "w1"})
        )
        assert recv(ws) == {"type": "watching", "request_id": "w1", "path": "/home/sandbox/watched"}
        events: list[tuple[str, str]] = []

        def note(message: dict[str, Any]) -> None:
            if message.get("type") == "fs_event":
                assert message["request_id"] == "w1"
                events.append((message["event"], message["path"]))

        command = "touch watched/new.txt && echo x >> watched/new.txt && touch watched/sub/deep.txt"
        ws.send(json.dumps({"command": command, "request_id": "c1"}))
        while "returncode" not in (message := recv(ws)):
            note(message)
        assert message["returncode"] == 0
        deadline = time.monotonic() + 10
        wanted = {
            ("created", "/home/sandbox/watched/new.txt"),
            ("modified", "/home/sandbox/watched/new.txt"),
            ("created", "/home/sandbox/watched/sub/deep.txt"),
        }
        while not wanted <= set(events) and time.monotonic() < deadline:
            note(recv(ws, 10))
        assert wanted <= set(events), events
        ws.send(json.dumps({"type": "unwatch", "request_id": "w1"}))
        while (message := recv(ws))["type"] == "fs_event":
            pass
        assert message == {"type": "unwatched", "request_id": "w1"}
        # Nothing more comes for that watch: the next message is the command's result.
        ws.send(json.dumps({"command": "touch watched/after.txt", "request_id": "c2"}))
        assert recv(ws)["returncode"] == 0
        ws.send(json.dumps({"type": "watch", "path": "no/such/dir", "request_id": "w2"}))
        failed = recv(ws)
        assert failed["error_code"] == "watch_failed" and failed["request_id"] == "w2"
