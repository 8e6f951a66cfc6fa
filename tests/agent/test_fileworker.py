"""The file worker (``agent.fileworker``) on the host: one request in on a pipe, one HTTP
response out, as the agent drives it (the integration tests run it as the sandbox user)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
from agent import fileworker


def serve(meta: dict[str, Any], body: bytes = b"") -> tuple[int, dict[str, str], bytes, int]:
    """Run one request through ``fileworker.serve``; status, headers, decoded body, exit."""
    request_r, request_w = os.pipe()
    with tempfile.TemporaryFile() as out:
        data = json.dumps(meta).encode() + b"\n" + body
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the writer
            os.close(request_r)
            try:
                os.write(request_w, data)
            finally:
                os._exit(0)
        os.close(request_w)
        try:
            code = fileworker.serve(request_r, out.fileno())
        finally:
            os.close(request_r)
            os.waitpid(pid, 0)
        out.seek(0)
        raw = out.read()
    if not raw:
        return 0, {}, b"", code
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        decoded = bytearray()
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded += rest[:size]
            rest = rest[size + 2 :]
        rest = bytes(decoded)
    return status, headers, rest, code


def put_meta(path: str, length: int | None, **query: str) -> dict[str, Any]:
    target = "/files?" + "&".join(f"{k}={v}" for k, v in {"path": path, **query}.items())
    headers = {"content-length": str(length)} if length is not None else {}
    if length is None:
        headers["transfer-encoding"] = "chunked"
    return {"method": "PUT", "target": target, "headers": headers, "home": "/nonexistent"}


def test_put_with_a_chunked_body(tmp_path: Path) -> None:
    """A chunked body (with a chunk extension and a trailer) is decoded into the file, with
    the mode asked for."""
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    status, _, answer, _ = serve(put_meta(str(tmp_path / "f"), None, mode="0600"), body)
    assert status == 201, answer
    assert (tmp_path / "f").read_bytes() == b"hello world"
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600


def test_an_incomplete_body_leaves_nothing(tmp_path: Path) -> None:
    """When the body ends early (the gateway went away), no file and no temporary file stay,
    and nothing is answered."""
    status, _, _, code = serve(put_meta(str(tmp_path / "f"), 100), b"only ten b")
    assert status == 0 and code == 3
    assert list(tmp_path.iterdir()) == []


def test_an_upload_replaces_atomically(tmp_path: Path) -> None:
    """An existing file is replaced by rename: a reader holding the old one keeps it."""
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with open(target, "rb") as reader:
        status, _, _, _ = serve(put_meta(str(target), 3), b"new")
        assert status == 201
        assert reader.read() == b"old"
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize(
    ("header", "status", "content"),
    [
        ("bytes=2-4", 206, b"234"),
        ("bytes=-3", 206, b"789"),
        ("bytes=8-", 206, b"89"),
        ("bytes=8-100", 206, b"89"),
        ("bytes=10-", 416, None),
        ("bytes=1-2,4-5", 200, b"0123456789"),
        ("lines=1-2", 200, b"0123456789"),
    ],
)
def test_range(tmp_path: Path, header: str, status: int, content: bytes | None) -> None:
    """Single byte ranges are served (206 with Content-Range); several ranges or another unit
    get the whole file; a range starting past the end is 416."""
    (tmp_path / "f").write_bytes(b"0123456789")
    meta = {
        "method": "GET",
        "target": f"/files?path={tmp_path / 'f'}",
        "headers": {"range": header},
    }
    got, headers, body, _ = serve(meta)
    assert got == status
    if content is not None:
        assert body == content
    if status == 206:
        assert headers["content-range"].endswith("/10")


def _tar(*members: tarfile.TarInfo) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info in members:
            data = b"x" if info.isfile() else None
            if data is not None:
                info.size = 1
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop("mode", 0o644)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize(
    "bad",
    [
        _member("/abs"),
        _member("a/../../b"),
        _member("l", tarfile.SYMTYPE, linkname="../out"),
        _member("l", tarfile.SYMTYPE, linkname="/etc"),
        _member("h", tarfile.LNKTYPE, linkname="../x"),
        _member("c", tarfile.CHRTYPE),
        _member("b", tarfile.BLKTYPE),
        _member("p", tarfile.FIFOTYPE),
        _member("s", mode=0o4755),
        _member("g", mode=0o2755),
    ],
    ids=[
        "abs",
        "dotdot",
        "symlink-up",
        "symlink-abs",
        "hardlink-up",
        "chr",
        "blk",
        "fifo",
        "suid",
        "sgid",
    ],
)
def test_refused_tar_entries_leave_nothing(tmp_path: Path, bad: tarfile.TarInfo) -> None:
    """A refused entry is named in a 400, and the good entry before it is not extracted."""
    body = _tar(_member("good"), bad)
    meta = {
        "method": "PUT",
        "target": f"/files/archive?path={tmp_path}",
        "headers": {"content-length": str(len(body))},
    }
    status, _, answer, _ = serve(meta, body)
    assert status == 400
    assert json.loads(answer)["entry"] == bad.name
    assert list(tmp_path.iterdir()) == []


def test_symlinks_inside_are_kept(tmp_path: Path) -> None:
    """A symlink pointing inside the directory (even through ``..`` that stays inside) is
    extracted as a symlink."""
    body = _tar(
        _member("d", tarfile.DIRTYPE, mode=0o755),
        _member("d/f"),
        _member("d/up", tarfile.SYMTYPE, linkname="../d/f"),
    )
    meta = {
        "method": "PUT",
        "target": f"/files/archive?path={tmp_path}",
        "headers": {"content-length": str(len(body))},
    }
    status, _, answer, _ = serve(meta, body)
    assert status == 201, answer
    assert os.readlink(tmp_path / "d" / "up") == "../d/f"
    assert (tmp_path / "d" / "up").read_bytes() == b"x"
