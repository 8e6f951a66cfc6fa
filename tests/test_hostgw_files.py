"""The REST file routes (``/sandboxes/{id}/files...``: ``twistedgw.web.files`` and
``twistedgw.proxy.files``) end to end against an in-process gateway whose sandboxes are real
agent processes on the host (``tests.hostgw``): the fast counterpart of
``tests/integration/test_files.py``.

Relative paths land in the sandbox's temp home (``HostAgent.home``). What needs the image
(files owned by the ``sandbox`` user, a full tmpfs answering 507) stays with the integration
suite.
"""

from __future__ import annotations

import functools
import io
import tarfile
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import requests

from tests.hostgw import HostGateway, host_gateway, in_thread
from tests.scenarios import (
    ESCAPING_ENTRIES,
    single_ranges_are_206,
    tar_after_a_good_entry,
    tar_contents,
    tar_entry,
    tar_of,
)

#: Every byte value, in every position modulo 256, several times over (about 1 MiB less a bit).
ALL_BYTES = bytes(range(256)) * 4000 + bytes(range(255, -1, -1)) * 17


def _create(gw: HostGateway) -> str:
    answer = gw.request("POST", "/sandboxes", json={})
    assert answer.status_code in (200, 201), answer.text
    return str(answer.json()["sandbox_id"])


async def _with_sandbox(
    scenario: Callable[[HostGateway, str], None], **gateway: Any
) -> HostGateway:
    """Run ``scenario(gw, sandbox_id)`` in a thread, against a fresh gateway and sandbox."""
    async with host_gateway(**gateway) as gw:

        def body() -> None:
            scenario(gw, _create(gw))

        await in_thread(body)
        return gw


def _files(gw: HostGateway, sandbox_id: str, route: str = "") -> str:
    return f"/sandboxes/{sandbox_id}/files{route}"


def _put(gw: HostGateway, sandbox_id: str, path: str, data: Any, **params: str) -> Any:
    return gw.request("PUT", _files(gw, sandbox_id), params={"path": path, **params}, data=data)


def _get(gw: HostGateway, sandbox_id: str, path: str, **headers: str) -> Any:
    return gw.request("GET", _files(gw, sandbox_id), params={"path": path}, headers=headers)


@pytest_twisted.ensureDeferred
async def test_every_byte_value_round_trips_with_size_mode_and_head_headers() -> None:
    """A body with every byte value is written with the mode asked for and read back
    identical, with ``Content-Length`` and ``Last-Modified``; HEAD gives the same headers and
    no body; a chunked upload (no ``Content-Length``) lands whole too."""

    def scenario(gw: HostGateway, sandbox_id: str) -> None:
        home = gw.runtime.agent_for(sandbox_id).home
        response = _put(gw, sandbox_id, "data/all.bin", ALL_BYTES, mode="0640", mkdirs="true")
        assert response.status_code == 201, response.text
        assert response.json() == {"path": f"{home}/data/all.bin", "size": len(ALL_BYTES)}
        assert (home / "data" / "all.bin").read_bytes() == ALL_BYTES
        assert (home / "data" / "all.bin").stat().st_mode & 0o777 == 0o640
        back = _get(gw, sandbox_id, "data/all.bin")
        assert back.status_code == 200
        assert back.content == ALL_BYTES
        assert back.headers["Content-Length"] == str(len(ALL_BYTES))
        assert back.headers["Last-Modified"].endswith("GMT")
        assert back.headers["Accept-Ranges"] == "bytes"
        head = gw.request("HEAD", _files(gw, sandbox_id), params={"path": "data/all.bin"})
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(len(ALL_BYTES))
        chunks = iter([ALL_BYTES[:1000], ALL_BYTES[1000:]])
        chunked = _put(gw, sandbox_id, f"{home}/chunked.bin", chunks)
        assert chunked.status_code == 201, chunked.text
        assert _get(gw, sandbox_id, f"{home}/chunked.bin").content == ALL_BYTES

    await _with_sandbox(scenario)


@pytest_twisted.ensureDeferred
async def test_single_ranges_are_206_with_content_range_and_past_the_end_is_416() -> None:
    """``Range: bytes=a-b``, a suffix and an open-ended range each answer 206 with exactly
    those bytes and ``Content-Range``; several ranges get the whole file (200); a range
    starting at the size is 416 with a JSON error."""

    def scenario(gw: HostGateway, sandbox_id: str) -> None:
        assert _put(gw, sandbox_id, "range.bin", ALL_BYTES).status_code == 201
        size = len(ALL_BYTES)
        get = functools.partial(_get, gw, sandbox_id)
        answers = single_ranges_are_206(get, "range.bin", ALL_BYTES)
        assert answers["part"].headers["Content-Length"] == "256"
        tail = answers["tail"]
        assert tail.headers["Content-Range"] == f"bytes {size - 10}-{size - 1}/{size}"
        assert answers["beyond"].headers["Content-Type"].startswith("application/json")
        several = get("range.bin", Range="bytes=0-1,5-6")
        assert several.status_code == 200 and several.content == ALL_BYTES

    await _with_sandbox(scenario)


@pytest_twisted.ensureDeferred
async def test_uploads_over_max_upload_are_413_json_by_length_and_along_a_chunked_body() -> None:
    """With ``--max-upload 1000``: 2000 bytes by ``Content-Length`` and 2400 sent chunked are
    413 with a JSON error and leave no file; exactly 1000 bytes are accepted."""

    def scenario(gw: HostGateway, sandbox_id: str) -> None:
        big = _put(gw, sandbox_id, "x", b"x" * 2000)
        assert big.status_code == 413
        assert "max-upload" in big.json()["error"]
        chunked = _put(gw, sandbox_id, "y", iter([b"y" * 600] * 4))
        assert chunked.status_code == 413
        assert "error" in chunked.json()
        ok = _put(gw, sandbox_id, "z", b"z" * 1000)
        assert ok.status_code == 201 and ok.json()["size"] == 1000
        listing = gw.request("GET", _files(gw, sandbox_id, "/list"), params={"path": "."})
        assert [e["name"] for e in listing.json()] == ["z"]

    await _with_sandbox(scenario, max_upload=1000)


@pytest_twisted.ensureDeferred
async def test_missing_paths_wrong_kinds_and_bad_paths_are_json_errors() -> None:
    """404 (JSON, "no such") for a missing file and for an upload into a missing directory,
    409 for a directory where a file is needed and the reverse, 400 for an empty path or one
    with NUL (refused by the gateway before the agent), 400 without ``path``."""

    def scenario(gw: HostGateway, sandbox_id: str) -> None:
        missing = _get(gw, sandbox_id, "no/such/file")
        assert missing.status_code == 404 and "no such" in missing.json()["error"]
        assert _put(gw, sandbox_id, "no/such/dir/f", b"x").status_code == 404
        made = gw.request("POST", _files(gw, sandbox_id, "/mkdir"), params={"path": "d1/d2"})
        assert made.status_code == 201
        assert _get(gw, sandbox_id, "d1").status_code == 409
        assert _put(gw, sandbox_id, "d1", b"x").status_code == 409
        assert _put(gw, sandbox_id, "plain", b"x").status_code == 201
        listing = gw.request("GET", _files(gw, sandbox_id, "/list"), params={"path": "plain"})
        assert listing.status_code == 409
        for bad in ("", "a\x00b"):
            response = _get(gw, sandbox_id, bad)
            assert response.status_code == 400, bad
            assert "error" in response.json()
        no_path = gw.request("GET", _files(gw, sandbox_id))
        assert no_path.status_code == 400 and "path" in no_path.json()["error"]

    await _with_sandbox(scenario)


@pytest_twisted.ensureDeferred
async def test_listing_gives_every_field_to_depth_and_delete_needs_recursive_for_a_tree() -> None:
    """A listing gives name, path, type (file/dir/symlink), size, mode and mtime, sorted,
    down to ``depth``; DELETE removes a file (200 ``deleted``), refuses a non-empty directory
    without ``recursive`` (409) and removes it with it."""

    def scenario(gw: HostGateway, sandbox_id: str) -> None:
        home = gw.runtime.agent_for(sandbox_id).home
        put = _put(gw, sandbox_id, "tree/a/b/file.txt", b"hello", mkdirs="true")
        assert put.status_code == 201
        (home / "tree" / "link").symlink_to("a")
        url = _files(gw, sandbox_id, "/list")
        top = gw.request("GET", url, params={"path": "tree"}).json()
        assert [(e["name"], e["type"]) for e in top] == [("a", "dir"), ("link", "symlink")]
        assert top[0]["path"] == f"{home}/tree/a"
        deep = gw.request("GET", url, params={"path": "tree", "depth": "3"}).json()
        by_path = {e["path"]: e for e in deep}
        assert list(by_path) == [
            f"{home}/tree/a",
            f"{home}/tree/a/b",
            f"{home}/tree/a/b/file.txt",
            f"{home}/tree/link",
        ]
        leaf = by_path[f"{home}/tree/a/b/file.txt"]
        assert (leaf["name"], leaf["type"], leaf["size"], leaf["mode"]) == (
            "file.txt",
            "file",
            5,
            "0644",
        )
        assert leaf["mtime"] > 1_600_000_000
        delete = _files(gw, sandbox_id)
        gone = gw.request("DELETE", delete, params={"path": "tree/a/b/file.txt"})
        assert gone.status_code == 200 and "deleted" in gone.json()
        assert _get(gw, sandbox_id, "tree/a/b/file.txt").status_code == 404
        refused = gw.request("DELETE", delete, params={"path": "tree"})
        assert refused.status_code == 409 and "error" in refused.json()
        removed = gw.request("DELETE", delete, params={"path": "tree", "recursive": "true"})
        assert removed.status_code == 200
        assert not (home / "tree").exists()

    await _with_sandbox(scenario)


@pytest_twisted.ensureDeferred
async def test_archive_upload_and_download_round_trip_files_dirs_and_links() -> None:
    """A tar uploaded into a directory lands there (201 with the entry count; files, a
    symlink inside it), and comes back as a tar and as a tar.gz with the same contents."""

    def scenario(gw: HostGateway, sandbox_id: str) -> None:
        body = tar_of(
            (tar_entry("top", tarfile.DIRTYPE, mode=0o755), None),
            (tar_entry("top/one.bin"), ALL_BYTES[:5000]),
            (tar_entry("top/sub", tarfile.DIRTYPE, mode=0o700), None),
            (tar_entry("top/sub/two.txt", mode=0o600), b"two"),
            (tar_entry("top/sub/ln", tarfile.SYMTYPE, linkname="two.txt"), None),
        )
        url = _files(gw, sandbox_id, "/archive")
        response = gw.request("PUT", url, params={"path": "unpacked"}, data=body)
        assert response.status_code == 201, response.text
        assert response.json()["entries"] == 5
        assert _get(gw, sandbox_id, "unpacked/top/one.bin").content == ALL_BYTES[:5000]
        assert _get(gw, sandbox_id, "unpacked/top/sub/ln").content == b"two"
        for fmt, mode in (("tar", "r|"), ("tar.gz", "r|gz")):
            back = gw.request("GET", url, params={"path": "unpacked", "format": fmt})
            assert back.status_code == 200
            assert tar_contents(io.BytesIO(back.content), mode) == {
                "top": "dir",
                "top/one.bin": ALL_BYTES[:5000],
                "top/sub": "dir",
                "top/sub/two.txt": b"two",
                "top/sub/ln": "->two.txt",
            }, fmt

    await _with_sandbox(scenario)


@pytest_twisted.ensureDeferred
async def test_tar_entries_that_escape_the_directory_are_400_and_nothing_is_extracted() -> None:
    """A tar with an entry escaping its directory (absolute name, ``..``, a symlink or hard
    link pointing outside), after a good entry, is 400 naming that entry and why; nothing of
    it is extracted, not even the good entry, and nothing appears outside."""

    def scenario(gw: HostGateway, sandbox_id: str) -> None:
        home = gw.runtime.agent_for(sandbox_id).home
        for number, (bad, why) in enumerate(ESCAPING_ENTRIES):
            body = tar_after_a_good_entry(bad)
            target = f"sub/refused-{number}"
            response = gw.request(
                "PUT", _files(gw, sandbox_id, "/archive"), params={"path": target}, data=body
            )
            assert response.status_code == 400, (bad.name, response.text)
            answer = response.json()
            assert answer["entry"] == bad.name
            assert why in answer["error"], (bad.name, answer)
            listing = gw.request("GET", _files(gw, sandbox_id, "/list"), params={"path": target})
            assert listing.json() == [], bad.name
        assert sorted(p.name for p in home.rglob("*")) == [f"refused-{n}" for n in range(5)] + [
            "sub"
        ]

    await _with_sandbox(scenario)


@pytest_twisted.ensureDeferred
async def test_file_routes_need_the_token_and_an_unknown_sandbox_is_404() -> None:
    """Without a token the file routes are 401 (the upload refused before its body), with a
    wrong one 401, ``access_token`` in the query works (and is not passed on as a path
    argument), and an unknown sandbox id is a JSON 404."""

    def scenario(gw: HostGateway, sandbox_id: str) -> None:
        url = gw.url + _files(gw, sandbox_id)
        assert requests.get(url, params={"path": "x"}, timeout=10).status_code == 401
        assert requests.put(url, params={"path": "x"}, data=b"x", timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert requests.get(url, params={"path": "x"}, headers=wrong, timeout=10).status_code == 401
        assert _put(gw, sandbox_id, "q.txt", b"query").status_code == 201
        by_query = requests.get(url, params={"path": "q.txt", "access_token": gw.token}, timeout=10)
        assert by_query.status_code == 200 and by_query.content == b"query"
        unknown = _get(gw, "0" * 32, "q.txt")
        assert unknown.status_code == 404 and "error" in unknown.json()

    await _with_sandbox(scenario)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``requests`` talks to 127.0.0.1 directly, whatever proxy the environment names."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
