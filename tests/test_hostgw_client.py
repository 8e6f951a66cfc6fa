"""The client library (``twistedgw.client``, sync and asyncio) end to end against an
in-process gateway whose sandboxes are real agent processes on the host (``tests.hostgw``):
the fast counterpart of ``tests/integration/test_client.py``.

Each test body runs in a thread (``in_thread`` / ``in_asyncio``) while the reactor, in the
main thread, serves the gateway. Commands start in the agent user's home directory, not the
sandbox's temp home: tests that need a directory pass ``cwd`` or use ``$HOME``.
"""

from __future__ import annotations

import asyncio
import functools
import io
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted

from tests.hostgw import host_gateway, in_asyncio, in_thread
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
    CommandTimeout,
    PathNotFound,
    Sandbox,
    SandboxGone,
)
from twistedgw.client._async import DEFAULT_URL, resolve_token, resolve_url

#: Waits for a condition of a sandbox on the host (a command's effect, a PTY's output).
_until = functools.partial(until, timeout=10.0, interval=0.02)


@pytest_twisted.ensureDeferred
async def test_sync_run_passes_stdout_stderr_and_the_exit_code_through() -> None:
    """A command's stdout and stderr come back apart (and to their callbacks, in order) and a
    non-zero exit is a result with that exit code and ``success`` false, not an exception."""
    async with host_gateway() as gw:

        def scenario() -> None:
            out: list[str] = []
            err: list[str] = []
            with Sandbox.create(url=gw.url, token=gw.token) as sb:
                result = sb.run(
                    "echo one; echo two >&2; echo three; exit 3",
                    on_stdout=out.append,
                    on_stderr=err.append,
                )
                ok = sb.run("true")
            assert result.stdout == "one\nthree\n"
            assert result.stderr == "two\n"
            assert (result.exit_code, result.success, result.timed_out) == (3, False, False)
            assert result.pid is not None and result.pid > 0
            assert "".join(out) == "one\nthree\n"
            assert "".join(err) == "two\n"
            assert (ok.exit_code, ok.success) == (0, True)

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_sandbox_env_command_env_cwd_and_stdin_reach_the_command(tmp_path: Path) -> None:
    """The sandbox's ``env`` (creation), the command's ``env``, ``cwd`` and ``stdin`` all reach
    the command; the creation options come back in ``info()``."""
    async with host_gateway() as gw:

        def scenario() -> None:
            with Sandbox.create(
                url=gw.url, token=gw.token, env={"GREETING": "hi"}, idle_timeout=300
            ) as sb:
                result = sb.run(
                    'echo "$GREETING $X from $(pwd)"; read line; echo "got $line"',
                    env={"X": "there"},
                    cwd=str(tmp_path),
                    stdin="typed\n",
                )
                assert result.stdout == f"hi there from {tmp_path}\ngot typed\n"
                info = sb.info()
                assert info.sandbox_id == sb.sandbox_id and info.idle_timeout == 300

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_a_command_past_its_timeout_raises_command_timeout_keeping_its_output() -> None:
    """``timeout`` kills the command and raises ``CommandTimeout`` carrying what it printed
    (``timed_out`` true); the sandbox keeps working afterwards."""
    async with host_gateway() as gw:

        def scenario() -> None:
            with Sandbox.create(url=gw.url, token=gw.token) as sb:
                started = time.monotonic()
                with pytest.raises(CommandTimeout) as caught:
                    sb.run("echo before; sleep 30; echo never", timeout=0.5)
                assert time.monotonic() - started < 10
                assert caught.value.result.timed_out is True
                assert caught.value.result.stdout == "before\n"
                assert sb.run("echo after").stdout == "after\n"

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_sync_background_process_is_listed_waited_replayed_by_attach_and_killed() -> None:
    """A background process is listed as running, ``wait`` gives its result, ``attach`` to
    the finished process replays its output from the start, ``kill`` ends one with -9, and
    attaching to a pid the sandbox does not have is ``unknown_process``."""
    async with host_gateway() as gw:

        def scenario() -> None:
            with Sandbox.create(url=gw.url, token=gw.token) as sb:
                background_process_lifecycle(sb, step=0.1, timeout=20)

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_async_attach_follows_a_live_process_and_signal_term_reaches_its_trap() -> None:
    """``AsyncSandbox.attach`` to a running process replays what it printed so far and follows
    it live; ``signal("TERM")`` is delivered (its trap runs) and the exit code comes back."""
    async with host_gateway() as gw:

        async def scenario() -> None:
            async with await AsyncSandbox.create(url=gw.url, token=gw.token) as sb:
                command = (
                    "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"
                )
                process = await sb.run(command, background=True)
                seen: list[str] = []
                handle = await sb.attach(process.pid, on_stdout=seen.append)
                assert handle.request_id == process.request_id
                waiting = asyncio.create_task(handle.wait(20))
                for _ in range(200):
                    if "ready\n" in "".join(seen):
                        break
                    await asyncio.sleep(0.02)
                assert "".join(seen) == "ready\n"
                assert await process.signal("TERM") is True
                result = await waiting
                assert result.exit_code == 7
                assert result.stdout == "ready\ngot-term\n"
                assert "".join(seen) == "ready\ngot-term\n"

        await in_asyncio(scenario)


@pytest_twisted.ensureDeferred
async def test_async_commands_run_concurrently_and_the_sandbox_is_deleted_on_exit() -> None:
    """Four commands on one ``AsyncSandbox`` run at once (each waits until all four started,
    so run one after another the first would time out); ``async with`` deletes the sandbox
    (and its agent process) on exit."""
    async with host_gateway() as gw:

        async def scenario() -> str:
            async with await AsyncSandbox.create(url=gw.url, token=gw.token) as sb:
                directory = (await sb.run("mktemp -d")).stdout.strip()
                barrier = (
                    f"touch {directory}/b.{{i}}; "
                    f"until [ $(ls {directory}/b.* | wc -l) -ge 4 ]; do sleep 0.02; done; "
                    "echo {i}"
                )
                results = await asyncio.gather(
                    *(sb.run(barrier.format(i=i), timeout=10) for i in range(4))
                )
                assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
                await sb.run(f"rm -r {directory}")
                process = await sb.run("echo bg; exit 4", background=True)
                assert (await process.wait(20)).exit_code == 4
                return sb.sandbox_id

        sandbox_id = await in_asyncio(scenario)
        answer = await in_thread(gw.request, "GET", f"/sandboxes/{sandbox_id}")
        assert answer.status_code == 404
        assert gw.runtime.agents == {}


@pytest_twisted.ensureDeferred
async def test_pty_takes_input_reports_its_size_resizes_and_passes_the_exit_code() -> None:
    """A PTY echoes what its shell prints for typed input, ``stty size`` shows the size it
    was opened with and then the one ``resize`` set, and ``exit 3`` is its exit code."""
    async with host_gateway() as gw:

        def scenario() -> None:
            with Sandbox.create(url=gw.url, token=gw.token) as sb:
                term = sb.pty(cols=80, rows=24)
                term.send("echo mark-$((20 + 1))\n")
                _until(lambda: "mark-21" in term.output())
                pty_size_follows_resize(term, _until)
                assert not term.done
                term.send("exit 3\n")
                assert term.wait(timeout=10).exit_code == 3
                assert term.done

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_files_write_read_list_exists_mkdir_and_remove() -> None:
    """``sb.files``: text and bytes written (size returned, mode applied, parents made) read
    back exactly, listed with name/type/size/mode, visible to commands in ``$HOME``; ``mkdir``,
    ``exists`` (of files and directories) and ``remove`` (a file, then a tree) do what they
    say."""
    async with host_gateway() as gw:

        def scenario() -> None:
            with Sandbox.create(url=gw.url, token=gw.token) as sb:
                blob = bytes(range(256)) * 64
                assert sb.files.write("data/a.txt", "héllo\n") == len("héllo\n".encode())
                assert sb.files.write("data/b.bin", blob, mode=0o600) == len(blob)
                assert sb.files.read("data/a.txt") == "héllo\n".encode()
                assert sb.files.read_text("data/a.txt") == "héllo\n"
                assert sb.files.read("data/b.bin") == blob
                entries = {e.name: e for e in sb.files.list("data")}
                assert set(entries) == {"a.txt", "b.bin"}
                assert (entries["b.bin"].type, entries["b.bin"].size) == ("file", len(blob))
                assert entries["b.bin"].mode == "0600" and entries["a.txt"].mode == "0644"
                assert sb.run('cat "$HOME/data/a.txt"').stdout == "héllo\n"
                sb.files.mkdir("made/deep/er")
                sb.files.mkdir("made/deep/er")  # an existing directory is fine
                assert sb.files.exists("made/deep/er") and sb.files.exists("made")
                listed = [(e.name, e.type) for e in sb.files.list("made/deep")]
                assert listed == [("er", "dir")]
                sb.files.remove("data/a.txt")
                assert not sb.files.exists("data/a.txt") and sb.files.exists("data/b.bin")
                sb.files.remove("made", recursive=True)
                assert not sb.files.exists("made")
                assert "made" not in {e.name for e in sb.files.list(".")}

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_download_streams_into_a_file_at_a_path_and_into_a_file_object(
    tmp_path: Path,
) -> None:
    """``files.download`` writes the file's exact bytes into an open local file and into a
    ``BytesIO``, returning the byte count and reporting progress up to the total; a file
    object uploads as the bytes it holds."""
    async with host_gateway() as gw:

        def scenario() -> None:
            payload = bytes(range(256)) * 2000  # 512000 bytes: several chunks
            with Sandbox.create(url=gw.url, token=gw.token) as sb:
                assert sb.files.write("big.bin", io.BytesIO(payload)) == len(payload)
                target = tmp_path / "big.bin"
                progress: list[tuple[int, int | None]] = []
                with open(target, "wb") as sink:
                    count = sb.files.download("big.bin", sink, lambda d, t: progress.append((d, t)))
                assert count == len(payload) and target.read_bytes() == payload
                assert progress[-1] == (len(payload), len(payload))
                memory = io.BytesIO()
                assert sb.files.download("big.bin", memory) == len(payload)
                assert memory.getvalue() == payload

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_upload_dir_and_download_dir_round_trip_a_tree(tmp_path: Path) -> None:
    """``upload_dir`` sends a local tree as one tar (commands see its files), ``download_dir``
    brings it back identical, reporting the bytes received so far."""
    async with host_gateway() as gw:
        local = tmp_path / "src"
        (local / "pkg" / "sub").mkdir(parents=True)
        (local / "pkg" / "mod.py").write_text("X = 1\n")
        (local / "pkg" / "sub" / "data.bin").write_bytes(bytes(range(256)))
        (local / "top.txt").write_text("top\n")

        def scenario() -> None:
            with Sandbox.create(url=gw.url, token=gw.token) as sb:
                assert sb.files.upload_dir(local, "proj") >= 5
                listing = sb.run('cd "$HOME/proj" && cat pkg/mod.py top.txt')
                assert listing.stdout == "X = 1\ntop\n"
                progress: list[tuple[int, int | None]] = []
                sb.files.download_dir(
                    "proj", tmp_path / "back", lambda d, t: progress.append((d, t))
                )
                back = tmp_path / "back"
                # Progress counts the archive's bytes as they come (no total is known).
                assert progress and all(t is None for _, t in progress)
                counts = [d for d, _ in progress]
                assert counts == sorted(counts) and counts[0] > 0
                assert counts[-1] >= 256 + 512 * 4  # the data and the tar headers at least
                assert (back / "pkg" / "mod.py").read_text() == "X = 1\n"
                assert (back / "top.txt").read_text() == "top\n"
                assert (back / "pkg" / "sub" / "data.bin").read_bytes() == bytes(range(256))
                names = sorted(str(p.relative_to(back)) for p in back.rglob("*"))
                assert names == ["pkg", "pkg/mod.py", "pkg/sub", "pkg/sub/data.bin", "top.txt"]

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_errors_map_to_path_not_found_auth_error_and_sandbox_gone() -> None:
    """A missing path is ``PathNotFound`` (not ``SandboxGone``), a wrong token is ``AuthError``
    (creating and connecting), a deleted sandbox is ``SandboxGone`` for commands, files and
    ``connect``, and its agent process is stopped."""
    async with host_gateway() as gw:

        def scenario() -> None:
            with pytest.raises(AuthError):
                Sandbox.create(url=gw.url, token="wrong-token")
            sb = Sandbox.create(url=gw.url, token=gw.token, delete_on_exit=False)
            try:
                with pytest.raises(PathNotFound):
                    sb.files.read("no/such/file")
                assert sb.files.exists("no/such/file") is False
                with pytest.raises(AuthError):
                    Sandbox.connect(sb.sandbox_id, url=gw.url, token="wrong-token")
                other = Sandbox.connect(sb.sandbox_id, url=gw.url, token=gw.token)
                assert other.run("echo same").stdout == "same\n"
                assert other.keepalive().sandbox_id == sb.sandbox_id
                other.close()
            finally:
                sb.delete()
            with pytest.raises(SandboxGone, match="removed"):
                Sandbox.connect(sb.sandbox_id, url=gw.url, token=gw.token)
            with pytest.raises(SandboxGone):
                sb.run("true")
            with pytest.raises(SandboxGone):
                sb.files.read("anything")
            with pytest.raises(SandboxGone):
                sb.delete()
            sb.close()

        await in_thread(scenario)
        assert gw.runtime.agents == {}


@pytest_twisted.ensureDeferred
async def test_a_sandbox_deleted_under_a_running_command_raises_sandbox_gone() -> None:
    """A command still running when its sandbox is deleted ends with ``SandboxGone`` (the
    gateway's close 4000) naming the sandbox and the reason, not a hang or a generic
    connection error."""
    async with host_gateway() as gw:

        def scenario() -> None:
            sb = Sandbox.create(url=gw.url, token=gw.token, delete_on_exit=False)
            errors: list[BaseException] = []
            started = threading.Event()

            def run() -> None:
                try:
                    sb.run("sleep 60", on_stdout=lambda _: None)
                except BaseException as e:
                    errors.append(e)

            thread = threading.Thread(target=run)
            thread.start()
            _until(lambda: any(p.running for p in sb.processes()))
            started.set()
            assert gw.request("DELETE", f"/sandboxes/{sb.sandbox_id}").status_code == 200
            thread.join(20)
            assert not thread.is_alive()
            assert len(errors) == 1 and isinstance(errors[0], SandboxGone), errors
            assert errors[0].sandbox_id == sb.sandbox_id and errors[0].reason == "deleted"
            assert str(errors[0]).startswith(f"sandbox {sb.sandbox_id}: ")
            sb.close()

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_url_and_token_come_from_the_environment_when_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``resolve_url``/``resolve_token``: an argument wins, else ``TWISTEDGW_URL`` /
    ``TWISTEDGW_TOKEN``, else the default URL and no token; a client made with neither
    argument reaches the gateway the environment names, with its token."""
    monkeypatch.delenv("TWISTEDGW_URL", raising=False)
    monkeypatch.delenv("TWISTEDGW_TOKEN", raising=False)
    assert resolve_url(None) == DEFAULT_URL
    assert resolve_token(None) is None
    assert resolve_url("http://x:1/") == "http://x:1"
    async with host_gateway() as gw:
        monkeypatch.setenv("TWISTEDGW_URL", gw.url + "/")
        monkeypatch.setenv("TWISTEDGW_TOKEN", gw.token)
        assert resolve_url(None) == gw.url
        assert resolve_url("http://other:2") == "http://other:2"
        assert resolve_token(None) == gw.token
        assert resolve_token("given") == "given"

        def scenario() -> None:
            with Sandbox.create() as sb:
                assert sb.url == gw.url
                assert sb.run("echo env").stdout == "env\n"
            with pytest.raises(AuthError):
                Sandbox.create(token="wrong-token")

        await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_a_cut_connection_is_redialled_and_output_resumed_without_gaps_or_repeats() -> None:
    """When the client's connection is cut (a loopback relay resets it) under a running
    command and under a background process's ``wait``, the client redials and re-attaches
    from the last offsets: every line arrives exactly once."""
    async with host_gateway() as gw:
        relay = TcpRelay(gw.port)
        try:
            await in_asyncio(
                lambda: resumed_after_cut(
                    relay, gw.token, step=0.1, first_output=10, timeout=20, cut_after=0.25
                )
            )
        finally:
            relay.close()
