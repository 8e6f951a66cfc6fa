"""The synchronous client: thin wrappers that run the asyncio client on a private event loop
in a daemon thread. Output callbacks are called on that thread."""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
from collections.abc import Coroutine, Mapping
from typing import IO, Any, Literal, TypeVar, overload

from twistedgw.client._async import (
    AsyncFiles,
    AsyncProcess,
    AsyncPty,
    AsyncSandbox,
    OutputCallback,
    ProgressCallback,
)
from twistedgw.client.backoff import Backoff
from twistedgw.client.results import CommandResult, FileEntry, ProcessInfo, SandboxInfo

T = TypeVar("T")


class _LoopThread:
    """One event loop in a daemon thread, shared by every sync object of this process."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _pid: int | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="twistedgw-client", daemon=True
                )
                thread.start()
                cls._loop, cls._pid = loop, os.getpid()
            return cls._loop


def _run(coro: Coroutine[Any, Any, T]) -> T:
    loop = _LoopThread.loop()
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()  # Ctrl-C (KeyboardInterrupt) here stops the coroutine too
        raise


class Process:
    """A handle on a process of the sandbox (sync flavour of ``AsyncProcess``)."""

    def __init__(self, inner: AsyncProcess) -> None:
        self._inner = inner

    @property
    def pid(self) -> int:
        return self._inner.pid

    @property
    def request_id(self) -> str:
        return self._inner.request_id

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} request_id={self.request_id!r}>"

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Follow the output until the process exits; its result (see ``AsyncProcess``)."""
        return _run(self._inner.wait(timeout))

    def signal(self, name: str = "TERM") -> bool:
        return _run(self._inner.signal(name))

    def kill(self) -> bool:
        return _run(self._inner.kill())


class Pty:
    """An interactive terminal in the sandbox (sync flavour of ``AsyncPty``)."""

    def __init__(self, inner: AsyncPty) -> None:
        self._inner = inner

    @property
    def pid(self) -> int:
        return self._inner.pid

    @property
    def done(self) -> bool:
        return self._inner.done

    def __repr__(self) -> str:
        return f"<Pty pid={self.pid}>"

    def output(self) -> str:
        return self._inner.output()

    def send(self, data: str) -> None:
        _run(self._inner.send(data))

    def resize(self, cols: int, rows: int) -> None:
        _run(self._inner.resize(cols, rows))

    def wait(self, timeout: float | None = None) -> CommandResult:
        return _run(self._inner.wait(timeout))

    def kill(self) -> bool:
        return _run(self._inner.kill())


class Files:
    """``sb.files`` (sync flavour of ``AsyncFiles``)."""

    def __init__(self, inner: AsyncFiles) -> None:
        self._inner = inner

    def write(
        self,
        path: str,
        data: bytes | str | IO[bytes],
        mode: int | None = None,
        mkdirs: bool = True,
        progress: ProgressCallback | None = None,
    ) -> int:
        return _run(self._inner.write(path, data, mode, mkdirs, progress))

    def read(self, path: str) -> bytes:
        return _run(self._inner.read(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return _run(self._inner.read_text(path, encoding))

    def download(self, path: str, sink: IO[bytes], progress: ProgressCallback | None = None) -> int:
        return _run(self._inner.download(path, sink, progress))

    def list(self, path: str = ".", depth: int = 1) -> list[FileEntry]:
        return _run(self._inner.list(path, depth))

    def exists(self, path: str) -> bool:
        return _run(self._inner.exists(path))

    def mkdir(self, path: str) -> None:
        _run(self._inner.mkdir(path))

    def remove(self, path: str, recursive: bool = False) -> None:
        _run(self._inner.remove(path, recursive))

    def upload_dir(
        self, local: str | os.PathLike[str], path: str, progress: ProgressCallback | None = None
    ) -> int:
        return _run(self._inner.upload_dir(local, path, progress))

    def download_dir(
        self, path: str, local: str | os.PathLike[str], progress: ProgressCallback | None = None
    ) -> None:
        _run(self._inner.download_dir(path, local, progress))


class Sandbox:
    """One sandbox of a twistedgw gateway (sync flavour of ``AsyncSandbox``).

    ``Sandbox.create(...)``, ``Sandbox.connect(id)``; ``with`` deletes it on exit when
    ``delete_on_exit`` (default: True for ``create``, False for ``connect``)."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._inner = inner
        self.files = Files(inner.files)

    @property
    def sandbox_id(self) -> str:
        return self._inner.sandbox_id

    @property
    def url(self) -> str:
        return self._inner.url

    @property
    def delete_on_exit(self) -> bool:
        return self._inner.delete_on_exit

    @delete_on_exit.setter
    def delete_on_exit(self, value: bool) -> None:
        self._inner.delete_on_exit = value

    @property
    def aio(self) -> AsyncSandbox:
        """The asyncio object underneath (runs on the private loop's thread)."""
        return self._inner

    def __repr__(self) -> str:
        return f"<Sandbox {self.sandbox_id} at {self.url}>"

    @classmethod
    def create(
        cls,
        url: str | None = None,
        token: str | None = None,
        *,
        delete_on_exit: bool = True,
        idempotency_key: str | None = None,
        backoff: Backoff | None = None,
        **options: Any,
    ) -> Sandbox:
        """Create a sandbox (options as ``AsyncSandbox.create``)."""

        async def make() -> AsyncSandbox:
            return await AsyncSandbox.create(
                url,
                token,
                delete_on_exit=delete_on_exit,
                idempotency_key=idempotency_key,
                backoff=backoff,
                **options,
            )

        return cls(_run(make()))

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        url: str | None = None,
        token: str | None = None,
        *,
        delete_on_exit: bool = False,
        backoff: Backoff | None = None,
    ) -> Sandbox:
        """A handle on an existing sandbox (``SandboxGone`` if there is none)."""

        async def make() -> AsyncSandbox:
            return await AsyncSandbox.connect(
                sandbox_id, url, token, delete_on_exit=delete_on_exit, backoff=backoff
            )

        return cls(_run(make()))

    @staticmethod
    def list(url: str | None = None, token: str | None = None) -> list[SandboxInfo]:
        """The caller's sandboxes, with details."""
        return _run(AsyncSandbox.list(url, token))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        _run(self._inner.__aexit__(*exc))

    def close(self) -> None:
        _run(self._inner.close())

    def info(self) -> SandboxInfo:
        return _run(self._inner.info())

    def keepalive(self, extend_by: float | None = None) -> SandboxInfo:
        return _run(self._inner.keepalive(extend_by))

    def delete(self) -> None:
        _run(self._inner.delete())

    @overload
    def run(
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
    def run(
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
    ) -> Process: ...

    def run(
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
    ) -> CommandResult | Process:
        """Run a command (see ``AsyncSandbox.run``)."""
        if background:
            process = _run(
                self._inner.run(
                    cmd,
                    timeout=timeout,
                    cwd=cwd,
                    env=env,
                    stdin=stdin,
                    on_stdout=on_stdout,
                    on_stderr=on_stderr,
                    background=True,
                    request_id=request_id,
                )
            )
            return Process(process)
        return _run(
            self._inner.run(
                cmd,
                timeout=timeout,
                cwd=cwd,
                env=env,
                stdin=stdin,
                session=session,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                request_id=request_id,
            )
        )

    def pty(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        command: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        on_data: OutputCallback | None = None,
    ) -> Pty:
        """Start an interactive terminal (see ``AsyncSandbox.pty``)."""
        return Pty(
            _run(self._inner.pty(cols, rows, command=command, cwd=cwd, env=env, on_data=on_data))
        )

    def processes(self) -> builtins.list[ProcessInfo]:
        return _run(self._inner.processes())

    def attach(
        self,
        pid: int,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> Process:
        return Process(_run(self._inner.attach(pid, on_stdout, on_stderr)))

    def cancel(self, request_id: str) -> None:
        _run(self._inner.cancel(request_id))
