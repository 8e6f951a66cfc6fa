"""Scenarios that the fast host-agent tests (``tests/test_hostgw_*.py``) and their integration
counterparts (``tests/integration/test_client.py``, ``test_files.py``, ``test_previews.py``)
both play, written once. Each takes its timings as arguments: a Docker sandbox is slower
than an agent process on the host, so the integration side passes longer ones.

Blocking helpers run in the caller's thread (the fast tests call them from ``in_thread``);
``resumed_after_cut`` is a coroutine for an asyncio loop (``in_asyncio`` / ``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urljoin

import pytest
import requests
from websockets.sync.client import connect

from tests.integration.tcprelay import TcpRelay
from twistedgw.client import AsyncSandbox, Backoff, GatewayError, Sandbox


def until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> None:
    """Wait until ``predicate()`` is true, checking every ``interval`` s; fail after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


# -- the client --------------------------------------------------------------------------------


async def resumed_after_cut(
    relay: TcpRelay,
    token: str | None = None,
    *,
    step: float,
    first_output: float,
    timeout: float,
    cut_after: float,
) -> None:
    """Through ``relay``: a command printing 1 to 8 (``step`` seconds apart) is cut once its
    first lines came (waited for up to ``first_output`` s); the client redials once and the
    result (within ``timeout``) has every line exactly once, in the callback too, and its
    stderr and exit code. Then a background process's ``wait`` (``timeout``) is cut
    ``cut_after`` s in and still gets all of its output."""
    fast = Backoff(initial=0.05, maximum=0.5, attempts=10)
    async with await AsyncSandbox.create(url=relay.url, token=token, backoff=fast) as sb:
        seen: list[str] = []
        got_three = asyncio.Event()

        def on_stdout(data: str) -> None:
            seen.append(data)
            if "3\n" in "".join(seen):
                got_three.set()

        command = f"for i in $(seq 1 8); do echo $i; sleep {step}; done; echo err >&2"
        run = asyncio.create_task(sb.run(command, on_stdout=on_stdout))
        await asyncio.wait_for(got_three.wait(), first_output)
        assert relay.cut() >= 1
        result = await asyncio.wait_for(run, timeout)
        expected = "".join(f"{i}\n" for i in range(1, 9))
        assert result.stdout == expected and "".join(seen) == expected
        assert result.stderr == "err\n" and result.exit_code == 0
        assert sb._channel.dials == 2

        # A background process followed by wait() survives a cut too.
        process = await sb.run(
            f"for i in $(seq 1 6); do echo b$i; sleep {step}; done", background=True
        )
        waiting = asyncio.create_task(process.wait(timeout))
        await asyncio.sleep(cut_after)
        relay.cut()
        resumed = await waiting
        assert resumed.stdout == "".join(f"b{i}\n" for i in range(1, 7))


def background_process_lifecycle(sb: Sandbox, *, step: float, timeout: float) -> None:
    """A background process (three lines, ``step`` s apart) is listed as running, ``wait``
    gives its result, ``attach`` to the finished process replays its output, ``kill`` ends
    another with -9 (each within ``timeout``), and attaching to a pid the sandbox does not
    have is ``unknown_process``."""
    process = sb.run(f"for i in 1 2 3; do echo $i; sleep {step}; done", background=True)
    listed = {p.pid: p for p in sb.processes()}
    assert listed[process.pid].background and listed[process.pid].running
    result = process.wait(timeout=timeout)
    assert (result.stdout, result.exit_code) == ("1\n2\n3\n", 0)
    # Attaching to the finished process replays its output.
    replay: list[str] = []
    again = sb.attach(process.pid, on_stdout=replay.append).wait(timeout=timeout)
    assert "".join(replay) == "1\n2\n3\n" and again.exit_code == 0
    sleeper = sb.run("sleep 60", background=True)
    assert sleeper.kill() is True
    assert sleeper.wait(timeout=timeout).exit_code == -9
    with pytest.raises(GatewayError) as unknown:
        sb.attach(999999)
    assert unknown.value.code == "unknown_process"


def pty_size_follows_resize(term: Any, wait: Callable[[Callable[[], object]], None]) -> None:
    """In a PTY opened at 80x24 with a shell, ``stty size`` says ``24 80``; after
    ``resize(100, 30)`` it says ``30 100``. ``wait(predicate)`` waits for the shell's output."""
    term.send("stty size\n")
    wait(lambda: "24 80" in term.output())
    term.resize(100, 30)
    term.send("stty size\n")
    wait(lambda: "30 100" in term.output())


# -- files: single ranges ----------------------------------------------------------------------


def single_ranges_are_206(
    get: Callable[..., requests.Response], path: str, data: bytes
) -> dict[str, requests.Response]:
    """``get(path, **headers)`` of a file holding ``data``: ``Range: bytes=100-355``, a suffix
    (``-10``) and an open-ended range (the last 5 bytes) are 206 with exactly those bytes
    (the first with its ``Content-Range``), a range starting at the size is 416 with a JSON
    error. The answers, by name (``part``, ``tail``, ``rest``, ``beyond``), for more checks."""
    size = len(data)
    part = get(path, Range="bytes=100-355")
    assert part.status_code == 206
    assert part.content == data[100:356]
    assert part.headers["Content-Range"] == f"bytes 100-355/{size}"
    tail = get(path, Range="bytes=-10")
    assert tail.status_code == 206 and tail.content == data[-10:]
    rest = get(path, Range=f"bytes={size - 5}-")
    assert rest.status_code == 206 and rest.content == data[-5:]
    beyond = get(path, Range=f"bytes={size}-")
    assert beyond.status_code == 416
    assert "error" in beyond.json()
    return {"part": part, "tail": tail, "rest": rest, "beyond": beyond}


# -- files: tar archives -----------------------------------------------------------------------


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    """A tar header: ``name`` of type ``kind``, mode ``0o644`` unless ``mode`` is given, and
    any other ``TarInfo`` fields (``linkname``, ``devmajor``...)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop("mode", 0o644)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """An uncompressed tar of ``(header, data)`` members (``None``: no data, as for a
    directory or a link); each data's length is set as its size."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return out.getvalue()


def tar_after_a_good_entry(bad: tarfile.TarInfo) -> bytes:
    """A tar of a good ``good.txt`` and then ``bad`` (with a little data if it is a kind of
    entry that has data)."""
    no_data = (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE)
    data = None if bad.type in no_data else b"evil"
    return tar_of((tar_entry("good.txt"), b"good"), (bad, data))


#: Entries that leave the directory a tar is unpacked into, each with a word its refusal says.
ESCAPING_ENTRIES = [
    (tar_entry("/etc/evil"), "absolute"),
    (tar_entry("ok/../../evil"), ".."),
    (tar_entry("out", tarfile.SYMTYPE, linkname="../../etc"), "outside"),
    (tar_entry("abs", tarfile.SYMTYPE, linkname="/etc/passwd"), "absolute"),
    (tar_entry("hl", tarfile.LNKTYPE, linkname="../x"), "outside"),
]


def tar_contents(fileobj: Any, mode: Literal["r|", "r|gz"]) -> dict[str, bytes | str]:
    """Read a tar from the binary stream ``fileobj`` (``tarfile.open`` ``mode``: ``r|``,
    ``r|gz``) into a dict by member name: a file's bytes, ``"->target"`` for a symlink,
    ``"=>target"`` for a hard link, ``"dir"`` for a directory."""
    contents: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=fileobj, mode=mode) as tar:
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                contents[member.name] = extracted.read()
            elif member.issym():
                contents[member.name] = "->" + member.linkname
            elif member.islnk():
                contents[member.name] = "=>" + member.linkname
            elif member.isdir():
                contents[member.name] = "dir"
    return contents


# -- previews ----------------------------------------------------------------------------------


def follow_listing(
    start: str, headers: dict[str, str] | None = None, *, not_listed: tuple[str, ...] = ()
) -> None:
    """Open a directory listing served through a preview (a ``sub/`` directory holding
    ``f.txt``, "hello-preview") and follow its relative links down to the file; names in
    ``not_listed`` must not be linked from the top listing."""
    listing = requests.get(start, headers=headers, timeout=10)
    assert listing.status_code == 200, listing.text
    assert 'href="sub/"' in listing.text
    for name in not_listed:
        assert f'href="{name}"' not in listing.text
    sub = requests.get(urljoin(start, "sub/"), headers=headers, timeout=10)
    assert sub.status_code == 200 and 'href="f.txt"' in sub.text
    leaf = requests.get(urljoin(urljoin(start, "sub/"), "f.txt"), headers=headers, timeout=10)
    assert leaf.status_code == 200 and leaf.text == "hello-preview\n"


def forgeries_are_refused(url: str, other_port: int) -> None:
    """Under a valid signed preview ``url``: ``other_port``, a later expiry or a changed
    signature is 403 with a JSON error."""
    prefix, port, expiry, signature, _ = url.rsplit("/", 4)
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for forged in (
        f"{prefix}/{other_port}/{expiry}/{signature}/",
        f"{prefix}/{port}/{int(expiry) + 1000}/{signature}/",
        f"{prefix}/{port}/{expiry}/{flipped}/",
    ):
        refused = requests.get(forged, timeout=10)
        assert refused.status_code == 403, forged
        assert "error" in refused.json()


def websocket_echoes(urls: tuple[str, ...], big: bytes, big_timeout: float) -> None:
    """Through each preview WebSocket URL (to an echo server): a text message and then the
    binary ``big`` (larger than a TCP read; echoed within ``big_timeout``) come back
    unchanged."""
    for url in urls:
        with connect(url, max_size=None) as ws:
            ws.send("hello through the preview")
            assert ws.recv(timeout=10) == "hello through the preview"
            ws.send(big)
            assert ws.recv(timeout=big_timeout) == big
