"""The client library (``twistedgw.client``) against a real gateway process and the real
engine: sync and asyncio flavours, files, background processes, errors, and a dropped
connection redialled and resumed from the last offset (through a loopback TCP relay)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import GatewayProcess
from tests.integration.tcprelay import TcpRelay
from tests.scenarios import (
    background_process_lifecycle,
    pty_size_follows_resize,
    resumed_after_cut,
    until,
)
from twistedgw.client import (
    AsyncSandbox,
    AuthError,
    Backoff,
    CommandTimeout,
    GatewayError,
    Sandbox,
    SandboxGone,
)

pytestmark = pytest.mark.integration


def test_sync_run_returns_a_typed_result_with_output_exit_code_and_callbacks(
    gateway: GatewayProcess,
) -> None:
    """``run`` with sandbox and command env, ``cwd`` and ``stdin`` gives separate stdout and
    stderr, exit code 3 (not a success, not timed out), a pid, and ``on_stdout`` chunks that
    add up to stdout; ``info()`` reports the idle timeout; leaving the ``with`` deletes it."""
    chunks: list[str] = []
    with Sandbox.create(url=gateway.url, env={"GREETING": "hi"}, idle_timeout=600) as sb:
        result = sb.run(
            'echo "$GREETING $X from $(pwd)"; echo oops >&2; read line; echo "got $line"; exit 3',
            env={"X": "there"},
            cwd="/tmp",
            stdin="typed\n",
            on_stdout=chunks.append,
        )
        assert result.stdout == "hi there from /tmp\ngot typed\n"
        assert result.stderr == "oops\n"
        assert (result.exit_code, result.success, result.timed_out) == (3, False, False)
        assert result.pid is not None and result.pid > 0
        assert "".join(chunks) == result.stdout
        info = sb.info()
        assert info.sandbox_id == sb.sandbox_id and info.idle_timeout == 600
        sandbox_id = sb.sandbox_id
    # The context manager deleted it.
    assert gateway.get(f"/sandboxes/{sandbox_id}").status_code == 404


def test_sessions_keep_state_and_timeouts_raise_command_timeout(gateway: GatewayProcess) -> None:
    """A session keeps the ``cd`` and ``export`` of one run for the next; a ``sleep 30`` with
    ``timeout=1`` raises ``CommandTimeout`` within 10 s, its result keeping the output before
    and exit code -9."""
    with Sandbox.create(url=gateway.url) as sb:
        sb.run("cd /tmp && export K=v", session="s1")
        assert sb.run('echo "$(pwd) $K"', session="s1").stdout == "/tmp v\n"
        started = time.monotonic()
        with pytest.raises(CommandTimeout) as caught:
            sb.run("echo before; sleep 30", timeout=1)
        assert time.monotonic() - started < 10
        assert caught.value.result.stdout == "before\n"
        assert caught.value.result.exit_code == -9


def test_invalid_requests_raise_gateway_errors_with_the_protocols_code(
    gateway: GatewayProcess,
) -> None:
    """A ``run`` with a missing ``cwd`` raises ``GatewayError`` with code ``invalid_cwd``; a
    ``create`` with ``memory="64g"`` raises one with status 400 naming ``memory``."""
    with Sandbox.create(url=gateway.url) as sb:
        with pytest.raises(GatewayError) as caught:
            sb.run("true", cwd="/no/such/dir")
        assert caught.value.code == "invalid_cwd"
        with pytest.raises(GatewayError) as refused:
            Sandbox.create(url=gateway.url, memory="64g")
        assert refused.value.status == 400 and "memory" in str(refused.value)


def test_background_process_wait_attach_processes_and_kill(gateway: GatewayProcess) -> None:
    """The sync client's background process: listed as running, ``wait`` gives its output,
    ``attach`` replays it, ``kill`` ends another with -9, an unknown pid is
    ``unknown_process`` (``background_process_lifecycle``)."""
    with Sandbox.create(url=gateway.url) as sb:
        background_process_lifecycle(sb, step=0.2, timeout=30)


def test_files_write_read_list_remove_and_directories_both_ways(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    """``files``: ``write`` returns the size and sets the mode (seen by ``list``), ``read`` and a
    command see the content, ``remove`` deletes one file only; ``upload_dir`` then
    ``download_dir`` carry a tree both ways, and a recursive ``remove`` deletes it."""
    with Sandbox.create(url=gateway.url) as sb:
        assert sb.files.write("data/a.txt", "hello\n") == 6
        sb.files.write("data/b.bin", bytes(range(256)) * 64, mode=0o600)
        assert sb.files.read("data/a.txt") == b"hello\n"
        entries = {e.name: e for e in sb.files.list("data")}
        assert entries["b.bin"].size == 16384 and entries["b.bin"].mode == "0600"
        assert sb.run("cat data/a.txt").stdout == "hello\n"
        sb.files.remove("data/a.txt")
        assert not sb.files.exists("data/a.txt") and sb.files.exists("data/b.bin")

        local = tmp_path / "src"
        (local / "pkg").mkdir(parents=True)
        (local / "pkg" / "mod.py").write_text("X = 1\n")
        (local / "top.txt").write_text("top\n")
        assert sb.files.upload_dir(local, "proj") >= 3
        assert sb.run("cat proj/pkg/mod.py proj/top.txt").stdout == "X = 1\ntop\n"
        sb.files.download_dir("proj", tmp_path / "back")
        assert (tmp_path / "back" / "pkg" / "mod.py").read_text() == "X = 1\n"
        sb.files.remove("proj", recursive=True)
        assert not sb.files.exists("proj")


def test_keepalive_connect_delete_and_sandbox_gone(gateway: GatewayProcess) -> None:
    """``Sandbox.connect`` to an existing sandbox runs commands and ``keepalive`` returns its
    info; once deleted, ``connect`` raises ``SandboxGone`` (``removed``), as does ``run`` on
    the original handle."""
    sb = Sandbox.create(url=gateway.url, delete_on_exit=False)
    try:
        other = Sandbox.connect(sb.sandbox_id, url=gateway.url)
        assert other.run("echo same").stdout == "same\n"
        assert other.keepalive().sandbox_id == sb.sandbox_id
        other.close()
    finally:
        sb.delete()
    with pytest.raises(SandboxGone, match="removed"):
        Sandbox.connect(sb.sandbox_id, url=gateway.url)
    with pytest.raises(SandboxGone):
        sb.run("true")
    sb.close()


def test_a_sandbox_deleted_under_a_running_command_raises_sandbox_gone(
    gateway: GatewayProcess,
) -> None:
    """A ``run("sleep 60")`` in a thread raises ``SandboxGone`` (and nothing else) when the
    sandbox is deleted through the REST API under it."""
    sb = Sandbox.create(url=gateway.url, delete_on_exit=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sb.run("sleep 60")
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    assert gateway.delete(sb.sandbox_id).status_code == 200
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], SandboxGone), errors
    sb.close()


def test_tokens_are_sent_and_a_wrong_one_is_an_auth_error(
    make_gateway: Any, tmp_path: Path
) -> None:
    """Against a gateway with a tokens file, ``create`` with a wrong token raises ``AuthError``,
    with the right one it creates a sandbox that runs commands, and ``connect`` to it with the
    wrong token raises ``AuthError``."""
    tokens = tmp_path / "tokens"
    tokens.write_text("right-token-0123456789\n")
    gw = make_gateway("--tokens-file", str(tokens))
    with pytest.raises(AuthError):
        Sandbox.create(url=gw.url, token="wrong-token-0123456789")
    with Sandbox.create(url=gw.url, token="right-token-0123456789") as sb:
        assert sb.run("echo ok").stdout == "ok\n"
        with pytest.raises(AuthError):
            Sandbox.connect(sb.sandbox_id, url=gw.url, token="wrong-token-0123456789")


def test_async_client_runs_commands_concurrently_and_deletes_on_exit(
    gateway: GatewayProcess,
) -> None:
    """``AsyncSandbox``: four ``run``s gathered on one sandbox run at once (each waits for all
    four to start) and print their own number; files write and read back; a background run's
    ``wait`` gives exit 4; leaving ``async with`` deletes the sandbox (404)."""

    async def main() -> str:
        async with await AsyncSandbox.create(url=gateway.url) as sb:
            # Concurrent on one connection, shown without a clock: each command waits until
            # all four have started (a barrier of files), so run one after another the first
            # would time out instead of printing.
            barrier = (
                "touch /tmp/barrier.{i}; "
                "until [ $(ls /tmp/barrier.* | wc -l) -ge 4 ]; do sleep 0.05; done; echo {i}"
            )
            results = await asyncio.gather(
                *(sb.run(barrier.format(i=i), timeout=30) for i in range(4))
            )
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
            await sb.files.write("f.txt", b"async")
            assert await sb.files.read("f.txt") == b"async"
            process = await sb.run("echo bg; exit 4", background=True)
            assert (await process.wait(30)).exit_code == 4
            return sb.sandbox_id

    sandbox_id = asyncio.run(main())
    assert requests.get(f"{gateway.url}/sandboxes/{sandbox_id}", timeout=30).status_code == 404


def test_a_dropped_connection_is_redialled_and_output_resumed_from_the_last_offset(
    gateway: GatewayProcess,
) -> None:
    """Through a TCP relay cut mid-command, the client redials once and the result (and the
    callback) has every line exactly once, with its stderr and exit code; a background
    process's ``wait`` cut mid-way still gets all its output (``resumed_after_cut``)."""
    relay = TcpRelay(gateway.port)
    try:
        asyncio.run(resumed_after_cut(relay, step=0.25, first_output=20, timeout=30, cut_after=0.6))
    finally:
        relay.close()


def test_an_unreachable_gateway_is_a_gateway_error_not_a_traceback_of_httpx() -> None:
    """``Sandbox.create`` against a closed relay's URL (nothing listens there) raises
    ``GatewayError`` saying ``cannot reach``."""
    relay = TcpRelay(1)  # forwards to a closed port: every connection is dropped at once
    relay.close()
    with pytest.raises(GatewayError, match="cannot reach"):
        Sandbox.create(url=relay.url)


#: Waits for a condition of a sandbox in Docker (a PTY's output, a redial).
_until = functools.partial(until, timeout=20.0, interval=0.05)


def test_pty_input_output_resize_exit_and_a_cut_connection(gateway: GatewayProcess) -> None:
    """Through a TCP relay, a PTY shows the prompt and follows a resize (24 80, then 30 100);
    after the relay is cut the client redials, a typed command's output and the earlier
    ``30 100`` each appear once (nothing replayed), and ``exit 3`` ends it with exit code 3."""
    relay = TcpRelay(gateway.port)
    fast = Backoff(initial=0.05, maximum=0.5, attempts=10)
    try:
        with Sandbox.create(url=relay.url, backoff=fast) as sb:
            term = sb.pty(cols=80, rows=24)
            _until(lambda: "$ " in term.output())
            pty_size_follows_resize(term, _until)
            relay.cut()
            _until(lambda: sb.aio._channel.dials == 2)  # redialled and re-attached
            # Keystrokes sent into a dropping connection may be lost: wait until the input
            # connection has seen the drop too (the next send redials it).
            side = sb.aio._side
            _until(lambda: side is not None and side.ws is None)
            term.send("echo after-$((40 + 2))\n")
            _until(lambda: "after-42" in term.output())
            screen = term.output()
            assert screen.count("after-42") == 1 and screen.count("30 100") == 1  # no replays
            term.send("exit 3\n")
            assert term.wait(timeout=20).exit_code == 3
            assert term.done
    finally:
        relay.close()
