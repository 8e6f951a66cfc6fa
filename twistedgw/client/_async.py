"""The asyncio client: ``AsyncSandbox`` and what hangs off it.

One WebSocket per sandbox object carries every command, attach and control message; a reader
task hands each incoming message to the listener of its ``request_id``. When the WebSocket
drops, every listener is told; the connection is redialled with bounded exponential backoff
and each command or process being followed is re-attached (``attach`` with ``since`` = the
byte offsets already received, PROTOCOL.md "Process handles"), so output resumes where it
stopped and nothing is read twice."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import json
import os
import secrets
import tarfile
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, overload
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from twistedgw.client.backoff import Backoff
from twistedgw.client.errors import (
    AuthError,
    CommandTimeout,
    ConnectionLost,
    GatewayError,
    PathNotFound,
    SandboxGone,
    TwistedgwError,
    error_from_close,
    error_from_http,
    error_from_reply,
)
from twistedgw.client.results import CommandResult, FileEntry, ProcessInfo, SandboxInfo

#: Where the gateway is when neither ``url=`` nor ``TWISTEDGW_URL`` says.
DEFAULT_URL = "http://127.0.0.1:8003"

#: A callback for output text (called on the event loop, in order, per stream).
OutputCallback = Callable[[str], object]
#: A callback for transfer progress: (bytes done, total bytes or None).
ProgressCallback = Callable[[int, int | None], object]

#: Error codes after which the process may still run and can be re-attached.
_RESUMABLE_CODES = frozenset({"agent_unavailable"})
#: Error replies to control messages that share a running process's request_id (a stdin
#: or resize that came too late): not the process's end.
_IGNORED_AFTER_START = frozenset({"not_running", "not_writer", "stdin_closed"})
#: Upload/download chunk size.
_CHUNK = 256 * 1024


def resolve_url(url: str | None) -> str:
    """The gateway's base URL: ``url``, else ``$TWISTEDGW_URL``, else ``DEFAULT_URL``."""
    return (url or os.environ.get("TWISTEDGW_URL") or DEFAULT_URL).rstrip("/")


def resolve_token(token: str | None) -> str | None:
    """The API token: ``token``, else ``$TWISTEDGW_TOKEN``, else none."""
    return token or os.environ.get("TWISTEDGW_TOKEN") or None


def _ws_url(base: str) -> str:
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://")
    return "ws://" + base.removeprefix("http://")


@dataclass(frozen=True)
class _Drop:
    """Sent to every listener when the WebSocket closes."""

    code: int | None
    reason: str


class _Stream:
    """The output of one stream received so far, and the byte offset it reaches."""

    def __init__(self, callback: OutputCallback | None) -> None:
        self.parts: list[str] = []
        self.offset = 0
        self.callback = callback

    def feed(self, data: str, offset: int | None) -> None:
        encoded = len(data.encode("utf-8", "surrogatepass"))
        if offset is not None:
            if offset + encoded <= self.offset:
                return  # already had it (a replay from before our offset)
            self.offset = offset + encoded
        else:
            self.offset += encoded
        self.parts.append(data)
        if self.callback is not None:
            self.callback(data)

    def text(self) -> str:
        return "".join(self.parts)


class _Channel:
    """The sandbox's WebSocket: dial with backoff, read, fan messages out by request_id."""

    def __init__(
        self,
        url: str,
        sandbox_id: str,
        token: str | None,
        backoff: Backoff,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        open_timeout: float = 30.0,
    ) -> None:
        self.url = f"{_ws_url(url)}/ws/{sandbox_id}"
        self.sandbox_id = sandbox_id
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.backoff = backoff
        self.sleep = sleep
        self.open_timeout = open_timeout
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._listeners: dict[str, list[asyncio.Queue[dict[str, Any] | _Drop]]] = {}
        self._lock = asyncio.Lock()
        #: How many times a connection was made (1 after the first dial).
        self.dials = 0
        self._closed = False

    @property
    def ws(self) -> ClientConnection | None:
        """The current connection, if up (tests cut it)."""
        return self._ws

    def listen(self, request_id: str) -> asyncio.Queue[dict[str, Any] | _Drop]:
        """A queue that gets every message carrying ``request_id``, and every drop."""
        queue: asyncio.Queue[dict[str, Any] | _Drop] = asyncio.Queue()
        self._listeners.setdefault(request_id, []).append(queue)
        return queue

    def unlisten(self, request_id: str, queue: asyncio.Queue[dict[str, Any] | _Drop]) -> None:
        queues = self._listeners.get(request_id, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self._listeners.pop(request_id, None)

    async def ensure(self) -> None:
        """Connect if not connected, redialling with backoff; raise what a refusal means."""
        async with self._lock:
            if self._ws is not None:
                return
            if self._closed:
                raise ConnectionLost("the sandbox's connection was closed by this client")
            last: Exception | None = None
            for delay in [0.0, *self.backoff.delays()]:
                if delay:
                    await self.sleep(delay)
                try:
                    ws = await self._dial()
                except _Retry as retry:
                    last = retry.error
                    continue
                self._ws = ws
                self.dials += 1
                self._reader = asyncio.create_task(self._read(ws))
                return
            raise ConnectionLost(
                f"could not reconnect to sandbox {self.sandbox_id} after "
                f"{self.backoff.attempts} attempts: {last}"
            )

    async def _dial(self) -> ClientConnection:
        try:
            return await connect(
                self.url,
                additional_headers=self.headers,
                max_size=None,
                open_timeout=self.open_timeout,
                ping_interval=20,
                ping_timeout=20,
            )
        except InvalidStatus as e:
            status = e.response.status_code
            body = e.response.body or b""
            try:
                parsed: Any = json.loads(body)
            except ValueError:
                parsed = body
            error = error_from_http(status, parsed, self.sandbox_id)
            if isinstance(error, AuthError | SandboxGone):
                raise error from None
            raise _Retry(error) from None
        except (OSError, TimeoutError, InvalidHandshake) as e:
            raise _Retry(GatewayError(f"cannot reach {self.url}: {e or type(e).__name__}")) from e

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                for queue in self._listeners.get(str(message.get("request_id")), ()):
                    queue.put_nowait(message)
        except ConnectionClosed:
            pass
        finally:
            if self._ws is ws:
                self._ws = None
            drop = _Drop(ws.close_code, ws.close_reason or "")
            for queues in list(self._listeners.values()):
                for queue in queues:
                    queue.put_nowait(drop)

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send on the current connection (dialling first if needed). A connection that drops
        under the send is reported to the listeners by the reader, as any drop."""
        await self.ensure()
        ws = self._ws
        if ws is None:
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(message))

    async def close(self, final: bool = True) -> None:
        """Close the connection; with ``final``, for good (no redial)."""
        self._closed = final
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader

    async def cut(self) -> None:
        """Drop the connection abruptly, without a closing handshake (tests)."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()


class _Retry(Exception):
    def __init__(self, error: TwistedgwError) -> None:
        super().__init__(str(error))
        self.error = error


def _pid(message: Mapping[str, Any]) -> int:
    pid = message.get("pid")
    if not isinstance(pid, int):
        raise GatewayError(f"reply without a pid: {str(message)[:200]}")
    return pid


def _new_id() -> str:
    return secrets.token_hex(16)


def _check_result(result: CommandResult, timeout: float | None) -> CommandResult:
    if result.timed_out:
        raise CommandTimeout(
            f"command timed out after {timeout if timeout is not None else 'its'} s: "
            f"{result.command[:200]}",
            result,
        )
    return result


class AsyncProcess:
    """A handle on a process of the sandbox (a background run, or one found by ``attach``)."""

    def __init__(
        self,
        sandbox: AsyncSandbox,
        pid: int,
        request_id: str,
        command: str = "",
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.pid = pid
        self.request_id = request_id
        self.command = command
        self._stdout = _Stream(on_stdout)
        self._stderr = _Stream(on_stderr)
        self._result: CommandResult | None = None

    def __repr__(self) -> str:
        return f"<AsyncProcess pid={self.pid} request_id={self.request_id!r}>"

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """Follow the process's output (from where this handle stopped; the output callbacks
        get it) until it exits; its result. ``timeout`` bounds the wait (``TimeoutError``)
        without touching the process. Raises ``CommandTimeout`` if the process hit its own
        ``timeout``."""
        if self._result is None:
            follow = self.sandbox._follow(
                self.request_id, self.pid, self._stdout, self._stderr, attach=True
            )
            self._result = await asyncio.wait_for(follow, timeout)
        return _check_result(self._result, None)

    async def signal(self, name: str = "TERM") -> bool:
        """Send a signal (``TERM``, ``KILL``, ``INT``, ``HUP``, ...) to the process's group;
        whether it was delivered."""
        # The agent finds the process by pid and request_id, and answers with the process's
        # request_id: on a connection of its own, so a ``wait`` following it is not confused.
        message = {
            "type": "signal",
            "pid": self.pid,
            "request_id": self.request_id,
            "signal": name.upper().removeprefix("SIG"),
        }
        sandbox = self.sandbox
        reply = await sandbox._ask(message, self.request_id, "signalled", sandbox._side_channel())
        return reply.get("delivered") is True

    async def kill(self) -> bool:
        """SIGKILL the process group."""
        return await self.signal("KILL")


class AsyncPty:
    """An interactive terminal in the sandbox (``AsyncSandbox.pty``)."""

    def __init__(
        self,
        sandbox: AsyncSandbox,
        pid: int,
        request_id: str,
        screen: _Stream,
        follow: asyncio.Task[CommandResult],
    ) -> None:
        self.sandbox = sandbox
        self.pid = pid
        self.request_id = request_id
        self._screen = screen
        self._follow = follow

    def __repr__(self) -> str:
        return f"<AsyncPty pid={self.pid}>"

    @property
    def done(self) -> bool:
        """Whether the terminal's process has exited (or following it failed)."""
        return self._follow.done()

    def output(self) -> str:
        """Everything the terminal wrote so far (as this handle received it)."""
        return self._screen.text()

    async def send(self, data: str) -> None:
        """Type ``data`` into the terminal (``"\\x03"`` is Ctrl-C, ``"\\x04"`` Ctrl-D)."""
        # Input has no acknowledgement: what is sent while the connection is dropping may be
        # lost (output is not: it resumes from the last offset).
        message = {"type": "stdin", "request_id": self.request_id, "data": data}
        await self.sandbox._side_channel().send(message)

    async def resize(self, cols: int, rows: int) -> None:
        """Set the window size (the foreground job gets SIGWINCH)."""
        message = {"type": "resize", "pid": self.pid, "cols": cols, "rows": rows}
        message["request_id"] = self.request_id
        await self.sandbox._ask(message, self.request_id, "resized", self.sandbox._side_channel())

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait until the terminal's process exits; its result (``stdout`` is the screen)."""
        return await asyncio.wait_for(asyncio.shield(self._follow), timeout)

    async def kill(self) -> bool:
        """SIGKILL the terminal's process group."""
        return await AsyncProcess(self.sandbox, self.pid, self.request_id).kill()


class AsyncFiles:
    """``sb.files``: the sandbox's files over the REST file routes (README, "Files, snapshots
    and pause"). Paths are container paths; relative ones are relative to /home/sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    def _path(self, route: str, path: str, **query: str) -> str:
        params = "&".join(f"{k}={quote(v, safe='')}" for k, v in {"path": path, **query}.items())
        return f"/sandboxes/{self._sb.sandbox_id}/files{route}?{params}"

    async def write(
        self,
        path: str,
        data: bytes | str | IO[bytes],
        mode: int | None = None,
        mkdirs: bool = True,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Write a file (bytes, text as UTF-8, or a binary file object, streamed); parents are
        created unless ``mkdirs=False``. Returns its size."""
        query = {"mkdirs": "true"} if mkdirs else {}
        if mode is not None:
            query["mode"] = f"{mode:04o}"
        if isinstance(data, str):
            data = data.encode("utf-8")
        content: bytes | AsyncIterator[bytes]
        total: int | None
        if isinstance(data, bytes | bytearray):
            content, total = bytes(data), len(data)
            if progress is not None:
                content = _aiter_bytes(io.BytesIO(content), total, progress)
        else:
            total = _size_of(data)
            content = _aiter_bytes(data, total, progress)
        headers = {"Content-Length": str(total)} if total is not None else {}
        answer = await self._sb._request(
            "PUT", self._path("", path, **query), content=content, headers=headers
        )
        return int(answer.json().get("size", 0))

    async def read(self, path: str) -> bytes:
        """A file's bytes."""
        return (await self._sb._request("GET", self._path("", path))).content

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def download(
        self, path: str, sink: IO[bytes], progress: ProgressCallback | None = None
    ) -> int:
        """Stream a file into ``sink``; the bytes written."""
        done = 0
        async with self._sb._stream("GET", self._path("", path)) as answer:
            length = answer.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            async for chunk in answer.aiter_bytes(_CHUNK):
                sink.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return done

    async def list(self, path: str = ".", depth: int = 1) -> list[FileEntry]:
        """The entries below a directory (``depth`` levels), sorted, parents first."""
        answer = await self._sb._request("GET", self._path("/list", path, depth=str(depth)))
        return [FileEntry.from_json(item) for item in answer.json()]

    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists, a file or a directory (a removed sandbox also answers
        False)."""
        try:
            await self._sb._request("HEAD", self._path("", path))
        except PathNotFound:
            return False
        except GatewayError as e:
            if e.status != 409:
                raise
            # HEAD reads a file: a directory answers 409 ("a directory where a file is
            # needed"), and so does a paused sandbox; listing it tells the two apart (a paused
            # sandbox raises here too).
            await self.list(path, depth=1)
        return True

    async def mkdir(self, path: str) -> None:
        """Make a directory, with its parents (an existing one is fine)."""
        await self._sb._request("POST", self._path("/mkdir", path))

    async def remove(self, path: str, recursive: bool = False) -> None:
        """Delete a file, a symlink, an empty directory, or with ``recursive`` a tree."""
        query = {"recursive": "true"} if recursive else {}
        await self._sb._request("DELETE", self._path("", path, **query))

    async def upload_dir(
        self, local: str | os.PathLike[str], path: str, progress: ProgressCallback | None = None
    ) -> int:
        """Copy a local directory's contents into ``path`` (created if missing) as one tar;
        the number of entries extracted."""
        with tempfile.TemporaryFile() as spool:
            await asyncio.to_thread(_tar_into, Path(local), spool)
            answer = await self._sb._request(
                "PUT",
                self._path("/archive", path),
                content=_aiter_bytes(spool, _size_of(spool), progress),
                headers={"Content-Length": str(_size_of(spool))},
            )
        return int(answer.json().get("entries", 0))

    async def download_dir(
        self, path: str, local: str | os.PathLike[str], progress: ProgressCallback | None = None
    ) -> None:
        """Copy the tree below ``path`` into the local directory ``local`` (created)."""
        with tempfile.TemporaryFile() as spool:
            await self._download_archive(path, spool, progress)
            await asyncio.to_thread(_untar_from, spool, Path(local))

    async def _download_archive(
        self, path: str, sink: IO[bytes], progress: ProgressCallback | None
    ) -> None:
        done = 0
        async with self._sb._stream("GET", self._path("/archive", path)) as answer:
            async for chunk in answer.aiter_bytes(_CHUNK):
                sink.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, None)


def _tar_into(root: Path, spool: IO[bytes]) -> None:
    """Write the regular files and directories below ``root`` to ``spool`` as a tar (symlinks
    and special files are left out), and rewind it."""
    with tarfile.open(fileobj=spool, mode="w") as tar:
        for item in sorted(root.rglob("*")):
            if item.is_symlink() or not (item.is_file() or item.is_dir()):
                continue
            tar.add(item, arcname=str(item.relative_to(root)), recursive=False)
    spool.seek(0)


def _untar_from(spool: IO[bytes], target: Path) -> None:
    """Extract the tar in ``spool`` into ``target`` (created), refusing what tarfile's ``data``
    filter refuses (absolute names, ``..``, links outside, devices)."""
    target.mkdir(parents=True, exist_ok=True)
    spool.seek(0)
    with tarfile.open(fileobj=spool, mode="r") as tar:
        tar.extractall(target, filter="data")


def _size_of(stream: IO[bytes]) -> int | None:
    try:
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
        return end - here
    except (OSError, ValueError, AttributeError):
        return None


async def _aiter_bytes(
    stream: IO[bytes], total: int | None, progress: ProgressCallback | None
) -> AsyncIterator[bytes]:
    done = 0
    while chunk := stream.read(_CHUNK):
        done += len(chunk)
        yield chunk
        if progress is not None:
            progress(done, total)


class AsyncSandbox:
    """One sandbox of a twistedgw gateway, driven with asyncio.

    Make one with ``await AsyncSandbox.create(...)`` or ``await AsyncSandbox.connect(id)``.
    ``async with`` deletes it on exit when ``delete_on_exit`` (default: True for ``create``,
    False for ``connect``)."""

    def __init__(
        self,
        sandbox_id: str,
        url: str | None = None,
        token: str | None = None,
        *,
        delete_on_exit: bool = False,
        backoff: Backoff | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.url = resolve_url(url)
        self.token = resolve_token(token)
        self.delete_on_exit = delete_on_exit
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)
        self._channel = _Channel(self.url, sandbox_id, self.token, backoff or Backoff())
        self._side: _Channel | None = None
        self.files = AsyncFiles(self)

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.sandbox_id} at {self.url}>"

    # -- making one -----------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        url: str | None = None,
        token: str | None = None,
        *,
        delete_on_exit: bool = True,
        idempotency_key: str | None = None,
        backoff: Backoff | None = None,
        **options: Any,
    ) -> AsyncSandbox:
        """Create a sandbox. ``options`` are the creation body's (README, "REST API"):
        ``template``, ``idle_timeout``, ``max_lifetime``, ``cpus``, ``memory``, ``disk``,
        ``env``, ``metadata``, ``network``, ``egress``, ``from_snapshot``; ``None`` values are
        left out."""
        body = {k: v for k, v in options.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        async with _rest(url, token) as http:
            answer = await _call(http, "POST", "/sandboxes", json=body, headers=headers)
        sandbox_id = str(answer.json()["sandbox_id"])
        return cls(sandbox_id, url, token, delete_on_exit=delete_on_exit, backoff=backoff)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        url: str | None = None,
        token: str | None = None,
        *,
        delete_on_exit: bool = False,
        backoff: Backoff | None = None,
    ) -> AsyncSandbox:
        """A handle on an existing sandbox (checked: ``SandboxGone`` if there is none)."""
        sandbox = cls(sandbox_id, url, token, delete_on_exit=delete_on_exit, backoff=backoff)
        try:
            await sandbox.info()
        except BaseException:
            await sandbox.close()
            raise
        return sandbox

    @staticmethod
    async def list(url: str | None = None, token: str | None = None) -> list[SandboxInfo]:
        """The caller's sandboxes, with details."""
        async with _rest(url, token) as http:
            answer = await _call(http, "GET", "/sandboxes?details=true")
        return [SandboxInfo.from_json(item) for item in answer.json()]

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.delete_on_exit:
                with contextlib.suppress(SandboxGone):
                    await self.delete()
        finally:
            await self.close()

    async def close(self) -> None:
        """Close this handle's connections (the sandbox stays)."""
        await self._channel.close()
        if self._side is not None:
            await self._side.close()
        await self._http.aclose()

    # -- REST -----------------------------------------------------------------------------

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await _call(self._http, method, path, sandbox_id=self.sandbox_id, **kwargs)

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, path: str) -> AsyncIterator[httpx.Response]:
        try:
            async with self._http.stream(method, path) as answer:
                if answer.status_code >= 400:
                    await answer.aread()
                    raise error_from_http(answer.status_code, _body(answer), self.sandbox_id)
                yield answer
        except httpx.HTTPError as e:
            raise GatewayError(f"cannot reach the gateway at {self.url}: {e}") from e

    async def info(self) -> SandboxInfo:
        """The sandbox's details (``GET /sandboxes/{id}?details=true``)."""
        answer = await self._request("GET", f"/sandboxes/{self.sandbox_id}?details=true")
        return SandboxInfo.from_json(answer.json())

    async def keepalive(self, extend_by: float | None = None) -> SandboxInfo:
        """Count as activity; with ``extend_by``, push the lifetime to at least now + that."""
        body = {"extend_by": extend_by} if extend_by is not None else None
        answer = await self._request("POST", f"/sandboxes/{self.sandbox_id}/keepalive", json=body)
        return SandboxInfo.from_json(answer.json())

    async def delete(self) -> None:
        """Remove the sandbox (``SandboxGone`` if it already was)."""
        # Not for good: a later command dials, and learns the sandbox is gone (404).
        await self._channel.close(final=False)
        if self._side is not None:
            await self._side.close(final=False)
        await self._request("DELETE", f"/sandboxes/{self.sandbox_id}")

    # -- commands -------------------------------------------------------------------------

    @overload
    async def run(
        self,
        cmd: str,
        *,
        timeout: float | None = ...,
        cwd: str | None = ...,
        env: Mapping[str, str] | None = ...,
        stdin: str | None = ...,
        session: str | None = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        background: Literal[False] = ...,
        request_id: str | None = ...,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: str,
        *,
        timeout: float | None = ...,
        cwd: str | None = ...,
        env: Mapping[str, str] | None = ...,
        stdin: str | None = ...,
        session: None = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        background: Literal[True],
        request_id: str | None = ...,
    ) -> AsyncProcess: ...

    async def run(
        self,
        cmd: str,
        *,
        timeout: float | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        session: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        background: bool = False,
        request_id: str | None = None,
    ) -> CommandResult | AsyncProcess:
        """Run ``cmd`` (``bash -c``) and return its result; a non-zero exit is a result with
        ``success`` false, a command that hit ``timeout`` raises ``CommandTimeout``. Output is
        streamed: ``on_stdout``/``on_stderr`` get it as it comes. If the WebSocket drops, the
        client redials and re-attaches from the last offset (not for ``session`` commands,
        which have no process handle: ``ConnectionLost``).

        With ``background=True``: a process handle at once (``wait``, ``kill``, ``signal``);
        its output goes to the callbacks while ``wait`` follows it.

        ``request_id`` (default: a fresh one) names the command, for ``cancel``."""
        request_id = request_id or _new_id()
        message = self._command_message(cmd, request_id, timeout, cwd, env, stdin, session)
        if background:
            if session is not None:
                raise TypeError("a session command cannot run in the background")
            message["background"] = True
            reply = await self._ask(message, request_id, "started")
            return AsyncProcess(self, _pid(reply), request_id, cmd, on_stdout, on_stderr)
        out, err = _Stream(on_stdout), _Stream(on_stderr)
        result = await self._follow(
            request_id, None, out, err, attach=False, first=message, resumable=session is None
        )
        return _check_result(result, timeout)

    @staticmethod
    def _command_message(
        cmd: str,
        request_id: str,
        timeout: float | None,
        cwd: str | None,
        env: Mapping[str, str] | None,
        stdin: str | None,
        session: str | None,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"command": cmd, "request_id": request_id, "stream": True}
        if session is None:
            message["ack"] = True
        optional = {"timeout": timeout, "cwd": cwd, "stdin": stdin, "session": session}
        message.update({k: v for k, v in optional.items() if v is not None})
        if env is not None:
            message["env"] = dict(env)
        return message

    async def _follow(
        self,
        request_id: str,
        pid: int | None,
        out: _Stream,
        err: _Stream,
        *,
        attach: bool,
        first: dict[str, Any] | None = None,
        resumable: bool = True,
        on_started: Callable[[dict[str, Any]], object] | None = None,
    ) -> CommandResult:
        """Send ``first`` (a command) or an attach, then read that process's messages until
        its result, re-attaching after each drop. A PTY's one stream (``pty``) goes to
        ``out``."""
        channel = self._channel
        queue = channel.listen(request_id)
        is_pty = first is not None and first.get("type") == "pty"

        def attach_message() -> dict[str, Any]:
            since: dict[str, int] = (
                {"pty": out.offset} if is_pty else {"stdout": out.offset, "stderr": err.offset}
            )
            return {"type": "attach", "pid": pid, "request_id": request_id, "since": since}

        try:
            await channel.send(first if not attach and first is not None else attach_message())
            while True:
                item = await queue.get()
                if isinstance(item, _Drop):
                    gone = error_from_close(item.code, item.reason, self.sandbox_id)
                    if gone is not None:
                        raise gone
                    if not resumable or pid is None:
                        raise ConnectionLost(
                            f"connection to sandbox {self.sandbox_id} lost "
                            f"({item.code} {item.reason}) before the command could be resumed"
                        )
                    await channel.send(attach_message())
                    continue
                kind = item.get("type")
                if kind == "output":
                    stream = err if item.get("stream") == "stderr" else out
                    offset = item.get("offset")
                    stream.feed(
                        str(item.get("data", "")), offset if isinstance(offset, int) else None
                    )
                elif kind == "started":
                    pid = _pid(item)
                    if on_started is not None:
                        on_started(item)
                elif kind == "attached":
                    pid = _pid(item) if "pid" in item else pid
                elif kind == "result":
                    return CommandResult.from_message(item, out.text(), err.text())
                elif kind == "error":
                    if pid is not None and item.get("error_code") in _IGNORED_AFTER_START:
                        continue
                    if item.get("error_code") in _RESUMABLE_CODES and resumable and pid:
                        continue  # the close follows; re-attach then
                    raise error_from_reply(item)
                elif kind == "yielded":
                    return await self._follow(request_id, pid, out, err, attach=True)
        finally:
            channel.unlisten(request_id, queue)

    def _side_channel(self) -> _Channel:
        """A second connection, for control messages whose replies carry the request_id of
        a process the main connection may be following (``signal``)."""
        if self._side is None:
            self._side = _Channel(self.url, self.sandbox_id, self.token, self._channel.backoff)
        return self._side

    async def _ask(
        self,
        message: dict[str, Any],
        request_id: str,
        kind: str,
        channel: _Channel | None = None,
    ) -> dict[str, Any]:
        """Send one message and wait for its reply of type ``kind`` (resent after a drop)."""
        channel = channel or self._channel
        queue = channel.listen(request_id)
        try:
            await channel.send(message)
            while True:
                item = await queue.get()
                if isinstance(item, _Drop):
                    gone = error_from_close(item.code, item.reason, self.sandbox_id)
                    if gone is not None:
                        raise gone
                    await channel.send(message)
                    continue
                if item.get("type") == "error":
                    raise error_from_reply(item)
                if item.get("type") == kind:
                    return item
        finally:
            channel.unlisten(request_id, queue)

    async def _control(self, message: dict[str, Any], kind: str) -> dict[str, Any]:
        request_id = _new_id()
        return await self._ask({**message, "request_id": request_id}, request_id, kind)

    async def pty(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        command: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        on_data: OutputCallback | None = None,
    ) -> AsyncPty:
        """Start an interactive terminal (a login ``bash -l``, or ``bash -c command``) of
        ``cols`` x ``rows``; ``on_data`` gets what it writes, as text. The terminal outlives
        this connection (redialled and re-attached from the last offset after a drop)."""
        request_id = _new_id()
        message: dict[str, Any] = {"type": "pty", "request_id": request_id}
        message.update(cols=cols, rows=rows)
        optional = {"command": command, "cwd": cwd, "env": dict(env) if env else None}
        message.update({k: v for k, v in optional.items() if v is not None})
        started: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def on_started(reply: dict[str, Any]) -> None:
            if not started.done():
                started.set_result(reply)

        out = _Stream(on_data)
        follow = asyncio.create_task(
            self._follow(
                request_id,
                None,
                out,
                _Stream(None),
                attach=False,
                first=message,
                on_started=on_started,
            )
        )
        # Its failure is re-raised by wait(); never logged as "never retrieved".
        follow.add_done_callback(lambda t: t.cancelled() or t.exception())
        waiting: set[asyncio.Future[Any]] = {started, follow}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            follow.result()  # raises what ended it (an error reply, a gone sandbox)
            raise GatewayError("the PTY ended before it started")
        return AsyncPty(self, _pid(started.result()), request_id, out, follow)

    async def processes(self) -> builtins.list[ProcessInfo]:
        """The sandbox's running and recently finished commands."""
        reply = await self._control({"type": "processes"}, "processes")
        return [ProcessInfo.from_json(p) for p in reply.get("processes") or []]

    async def attach(
        self,
        pid: int,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AsyncProcess:
        """A handle on the process ``pid`` (``wait`` replays its output from the start, then
        follows it live). ``GatewayError`` (``unknown_process``) if the sandbox has none."""
        for info in await self.processes():
            if info.pid == pid:
                return AsyncProcess(self, pid, info.request_id, info.command, on_stdout, on_stderr)
        raise GatewayError(
            f"sandbox {self.sandbox_id} has no process {pid}", code="unknown_process"
        )

    async def cancel(self, request_id: str) -> None:
        """Cancel a running command by its request_id."""
        await self._channel.send({"type": "cancel", "request_id": request_id})


@contextlib.asynccontextmanager
async def _rest(url: str | None, token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    resolved = resolve_token(token)
    headers = {"Authorization": f"Bearer {resolved}"} if resolved else {}
    async with httpx.AsyncClient(base_url=resolve_url(url), headers=headers, timeout=120) as http:
        yield http


def _body(answer: httpx.Response) -> Any:
    try:
        return answer.json()
    except ValueError:
        return answer.text


async def _call(
    http: httpx.AsyncClient, method: str, path: str, sandbox_id: str | None = None, **kwargs: Any
) -> httpx.Response:
    """One REST call; an error status or an unreachable gateway raises the client's error."""
    try:
        answer = await http.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        raise GatewayError(f"cannot reach the gateway at {http.base_url}: {e}") from e
    if answer.status_code >= 400:
        raise error_from_http(answer.status_code, _body(answer), sandbox_id)
    return answer
