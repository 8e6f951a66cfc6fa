"""``twistedgw``: the command line for a twistedgw gateway (and ``serve`` to run one).

The gateway is ``$TWISTEDGW_URL`` (or ``--url``, default http://127.0.0.1:8003) and the token
``$TWISTEDGW_TOKEN`` (or ``--token``). Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import codecs
import os
import secrets
import select
import shlex
import signal
import stat
import sys
import termios
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TransferSpeedColumn,
)
from rich.table import Table

from twistedgw.client import GatewayError, Sandbox, TwistedgwError
from twistedgw.client._async import resolve_url

F = TypeVar("F", bound=Callable[..., Any])

#: Files at least this big get a progress bar (on a terminal).
PROGRESS_THRESHOLD = 1024 * 1024


class _Context:
    def __init__(self, url: str | None, token: str | None) -> None:
        self.url = resolve_url(url)
        self.token = token

    def connect(self, sandbox_id: str) -> Sandbox:
        return Sandbox.connect(sandbox_id, self.url, self.token)


class _Group(click.Group):
    """Turns the client's errors (and local I/O errors) into one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TwistedgwError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _pairs(values: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", param_hint=what)
        out[name] = rest
    return out


def _needs_ctx(f: F) -> F:
    return click.pass_obj(f)  # type: ignore[return-value]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="TWISTEDGW_URL", help="gateway URL [$TWISTEDGW_URL]")
@click.option("--token", envvar="TWISTEDGW_TOKEN", help="API token [$TWISTEDGW_TOKEN]")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None) -> None:
    """Drive a twistedgw sandbox gateway: sandboxes, commands, files."""
    ctx.obj = _Context(url, token)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--port", "-p", default="8003", show_default=True, help="port or endpoint string")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(port: str, args: tuple[str, ...]) -> None:
    """Run the gateway in the foreground (twistd sandboxgw; ARGS are its options, see
    `twistd sandboxgw --help`). Unlike ./start.sh it sets nothing up."""
    endpoint = f"tcp:{port}" if port.isdigit() else port
    twistd = Path(sys.executable).parent / "twistd"
    if twistd.exists():
        command = [str(twistd)]
    else:
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    command += ["--nodaemon", "--pidfile=", "sandboxgw", "--port", endpoint, *args]
    sys.stdout.flush()
    os.execv(command[0], command)


@cli.command()
@click.option("--template", help="template name (GET /templates)")
@click.option("--idle-timeout", type=float, help="seconds idle before removal")
@click.option("--lifetime", "max_lifetime", type=float, help="maximum lifetime in seconds")
@click.option("--cpus", type=float)
@click.option("--memory", help="bytes or a size like 512m")
@click.option("--disk", help="home size: bytes or a size like 1g")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="repeatable")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="repeatable")
@click.option("--network", type=click.Choice(["bridge", "none"]))
@click.option("--egress", multiple=True, metavar="HOST[:PORT]", help="allow-list, repeatable")
@click.option("--from-snapshot", help="start from a snapshot id")
@_needs_ctx
def create(ctx: _Context, **options: Any) -> None:
    """Create a sandbox and print its id."""
    options["env"] = _pairs(options["env"], "--env") or None
    options["metadata"] = _pairs(options["metadata"], "--metadata") or None
    options["egress"] = list(options["egress"]) or None
    sandbox = Sandbox.create(ctx.url, ctx.token, delete_on_exit=False, **options)
    click.echo(sandbox.sandbox_id)
    sandbox.close()


@cli.command(name="ls")
@click.option("--quiet", "-q", is_flag=True, help="ids only")
@_needs_ctx
def ls_(ctx: _Context, quiet: bool) -> None:
    """List your sandboxes."""
    sandboxes = Sandbox.list(ctx.url, ctx.token)
    if quiet:
        for info in sandboxes:
            click.echo(info.sandbox_id)
        return
    table = Table(box=None)
    table.add_column("SANDBOX", no_wrap=True, min_width=32)
    for column in ("STATUS", "TEMPLATE", "CREATED", "EXPIRES"):
        table.add_column(column, no_wrap=True)
    for info in sandboxes:
        expires = info.expires_at
        table.add_row(
            info.sandbox_id,
            info.state or info.status,
            info.template or "default",
            _when(info.created_at),
            _when(expires) if expires else "-",
        )
    _console().print(table)


def _console() -> Console:
    """Rich's console on stdout; as wide as a line needs when not a terminal (pipes, tests)."""
    return Console(width=None if sys.stdout.isatty() else 512)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


@cli.command()
@click.argument("sandbox_ids", nargs=-1, required=True, metavar="ID...")
@_needs_ctx
def rm(ctx: _Context, sandbox_ids: tuple[str, ...]) -> None:
    """Delete sandboxes (all are tried; exit 1 if any failed)."""
    failed = False
    for sandbox_id in sandbox_ids:
        try:
            sandbox = Sandbox(_inner(ctx, sandbox_id))
            try:
                sandbox.delete()
            finally:
                sandbox.close()
            click.echo(sandbox_id)
        except TwistedgwError as e:
            click.echo(f"Error: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


def _inner(ctx: _Context, sandbox_id: str) -> Any:
    from twistedgw.client import AsyncSandbox

    return AsyncSandbox(sandbox_id, ctx.url, ctx.token)


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@click.option("--extend-by", type=float, help="push the lifetime to at least now + seconds")
@_needs_ctx
def keepalive(ctx: _Context, sandbox_id: str, extend_by: float | None) -> None:
    """Count as activity (and extend the lifetime)."""
    sandbox = Sandbox(_inner(ctx, sandbox_id))
    try:
        info = sandbox.keepalive(extend_by)
    finally:
        sandbox.close()
    expires = f", expires {_when(info.expires_at)}" if info.expires_at else ""
    click.echo(f"{info.sandbox_id} {info.state or info.status}{expires}")


def _piped(stream: Any) -> bool:
    """Whether ``stream`` is a pipe or a file (passed to the command), not a terminal or
    /dev/null."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _writer(stream: Any) -> Callable[[str], None]:
    def write(data: str) -> None:
        stream.write(data)
        stream.flush()

    return write


@cli.command(name="exec")
@click.argument("sandbox_id", metavar="ID")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD...")
@click.option("--timeout", type=float, help="seconds before the command is killed")
@click.option("--cwd", help="working directory (relative to /home/sandbox)")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="repeatable")
@click.option("--session", help="run in this persistent shell")
@_needs_ctx
def exec_(
    ctx: _Context,
    sandbox_id: str,
    command: tuple[str, ...],
    timeout: float | None,
    cwd: str | None,
    env: tuple[str, ...],
    session: str | None,
) -> None:
    """Run a command; its stdout and stderr go to yours, and its exit status is ours. One CMD
    argument is a shell command line; several are quoted and joined. Piped stdin is passed."""
    if command[:1] == ("--",):
        command = command[1:]
    if not command:
        raise click.UsageError("no command given (exec ID -- CMD...)")
    line = command[0] if len(command) == 1 else shlex.join(command)
    stdin = sys.stdin.read() if _piped(sys.stdin) else None
    sandbox = ctx.connect(sandbox_id)
    request_id = secrets.token_hex(16)
    try:
        result = sandbox.run(
            line,
            timeout=timeout,
            cwd=cwd,
            env=_pairs(env, "--env") or None,
            stdin=stdin,
            session=session,
            on_stdout=_writer(sys.stdout),
            on_stderr=_writer(sys.stderr),
            request_id=request_id,
        )
    except KeyboardInterrupt:
        sandbox.cancel(request_id)  # Ctrl-C ends the command too (it would run on)
        raise
    finally:
        sandbox.close()
    sys.exit(_exit_status(result.exit_code))


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@_needs_ctx
def ps(ctx: _Context, sandbox_id: str) -> None:
    """List the sandbox's running and recently finished commands."""
    sandbox = ctx.connect(sandbox_id)
    try:
        processes = sandbox.processes()
    finally:
        sandbox.close()
    table = Table("PID", "STATE", "CODE", "BG", "STARTED", "COMMAND", box=None)
    for p in processes:
        table.add_row(
            str(p.pid),
            p.state,
            "" if p.returncode is None else str(p.returncode),
            "yes" if p.background else "",
            _when(p.started_at),
            p.command,
        )
    _console().print(table)


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@click.argument("pid", type=int)
@_needs_ctx
def attach(ctx: _Context, sandbox_id: str, pid: int) -> None:
    """Replay a process's output, follow it to its end, exit with its status."""
    sandbox = ctx.connect(sandbox_id)
    try:
        process = sandbox.attach(pid, on_stdout=_writer(sys.stdout), on_stderr=_writer(sys.stderr))
        result = process.wait()
    finally:
        sandbox.close()
    sys.exit(_exit_status(result.exit_code))


@cli.command()
@click.argument("sandbox_id", metavar="ID")
@click.option("--command", "-c", help="run this instead of a login shell")
@_needs_ctx
def shell(ctx: _Context, sandbox_id: str, command: str | None) -> None:
    """An interactive terminal in the sandbox: raw mode, resized with your window, your
    terminal restored on exit (also on an error). Exits with the shell's status."""
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise click.UsageError("shell needs a terminal on stdin and stdout (use exec instead)")
    fd = sys.stdin.fileno()
    out = sys.stdout.buffer

    def on_data(text: str) -> None:
        out.write(text.encode("utf-8", "replace"))
        out.flush()

    size = os.get_terminal_size(fd)
    sandbox = ctx.connect(sandbox_id)
    saved = termios.tcgetattr(fd)
    wake_r, wake_w = os.pipe()
    old_handler = signal.signal(signal.SIGWINCH, lambda *_: os.write(wake_w, b"w"))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        tty.setraw(fd)
        term = sandbox.pty(size.columns, size.lines, command=command, on_data=on_data)
        while not term.done:
            ready, _, _ = select.select([fd, wake_r], [], [], 0.1)
            if wake_r in ready:
                os.read(wake_r, 64)
                size = os.get_terminal_size(fd)
                term.resize(size.columns, size.lines)
            if fd in ready:
                data = os.read(fd, 4096)
                if not data:
                    break
                if text := decoder.decode(data):
                    term.send(text)
        result = term.wait(timeout=10)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_handler)
        os.close(wake_r)
        os.close(wake_w)
        sandbox.close()
    sys.exit(_exit_status(result.exit_code))


def _split_remote(spec: str) -> tuple[str, str] | None:
    """``ID:PATH`` -> (id, path); a local path (no colon before any slash) -> None."""
    head, sep, path = spec.partition(":")
    if sep and head and "/" not in head:
        return head, path or "."
    return None


class _Bar:
    """A rich progress bar for one transfer, shown for large transfers on a terminal."""

    def __init__(self, label: str, total: int | None) -> None:
        self.enabled = sys.stderr.isatty() and (total is None or total >= PROGRESS_THRESHOLD)
        self.progress = Progress(
            "{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> _Bar:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, done: int, total: int | None) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=done, total=total)


@cli.command()
@click.argument("source")
@click.argument("destination")
@_needs_ctx
def cp(ctx: _Context, source: str, destination: str) -> None:
    """Copy LOCAL to ID:PATH, or ID:PATH to LOCAL (directories as tar archives)."""
    remote_src, remote_dst = _split_remote(source), _split_remote(destination)
    if (remote_src is None) == (remote_dst is None):
        raise click.UsageError("exactly one of SOURCE and DESTINATION must be ID:PATH")
    if remote_dst is not None:
        sandbox_id, path = remote_dst
        local = Path(source)
        sandbox = Sandbox(_inner(ctx, sandbox_id))
        try:
            if local.is_dir():
                sandbox.files.upload_dir(local, path)
            else:
                if path.endswith("/") or path == ".":
                    path = path.rstrip("/") + "/" + local.name if path != "." else local.name
                with local.open("rb") as f, _Bar(local.name, local.stat().st_size) as bar:
                    sandbox.files.write(path, f, progress=bar.update)
        finally:
            sandbox.close()
        return
    assert remote_src is not None
    sandbox_id, path = remote_src
    target = Path(destination)
    sandbox = Sandbox(_inner(ctx, sandbox_id))
    try:
        _download(sandbox, path, target)
    finally:
        sandbox.close()


def _download(sandbox: Sandbox, path: str, target: Path) -> None:
    name = Path(path.rstrip("/")).name or "download"
    file_target = target / name if target.is_dir() else target
    partial = file_target.with_name(file_target.name + ".part")
    try:
        with partial.open("wb") as sink, _Bar(name, None) as bar:
            sandbox.files.download(path, sink, progress=bar.update)
    except GatewayError as e:
        partial.unlink(missing_ok=True)
        if e.status != 409:  # 409: a directory where a file was expected
            raise
        dir_target = target / name if target.is_dir() else target
        sandbox.files.download_dir(path, dir_target)
        return
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(file_target)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script's entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="twistedgw")
