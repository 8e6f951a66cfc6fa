"""``twistedgw shell`` in a real terminal: tmux (on a private server socket) runs the CLI
against a real gateway; the test types with send-keys and reads the screen with capture-pane:
the prompt, a command's output, a resize, and the terminal's modes restored after exit (and
after an error)."""

from __future__ import annotations

import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import GatewayProcess

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "twistedgw")


class Tmux:
    """One tmux server of our own (``-L``), one session, one pane."""

    def __init__(self, tmp: Path) -> None:
        self.server = f"tgw-{secrets.token_hex(4)}"
        self.tmp = tmp

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.server, *args], capture_output=True, text=True, check=True
        ).stdout

    def start(self, command: str, cols: int = 100, rows: int = 30) -> None:
        self("new-session", "-d", "-s", "main", "-x", str(cols), "-y", str(rows), command)

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "main", *keys)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "main")

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            assert time.monotonic() < deadline, f"{text!r} not on the screen:\n{screen}"
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    terminal = Tmux(tmp_path)
    yield terminal
    terminal.kill()


def shell_then_report(gateway: GatewayProcess, sandbox_id: str, report: Path) -> str:
    """A pane command: the CLI's shell, then its exit status and `stty -a` (the pane's modes
    after it) written to ``report``, then the pane stays open."""
    cli = f"{shlex.quote(CLI)} --url {gateway.url} shell {sandbox_id}"
    return (
        f'bash -c \'{cli}; echo "EXIT=$?" > {report}; stty -a >> {report}; '
        f"echo SHELL-DONE; sleep 60'"
    )


def test_shell_prompt_output_resize_and_terminal_restored_after_exit(
    gateway: GatewayProcess, tmux: Tmux, tmp_path: Path
) -> None:
    """In a 100x30 tmux pane ``shell`` shows the sandbox's prompt, runs a typed command, reports
    ``30 100`` then ``40 120`` after the window is resized; ``exit 5`` makes the CLI exit 5,
    and the pane is back in canonical mode with echo on."""
    sandbox_id = gateway.create()
    report = tmp_path / "report"
    tmux.start(shell_then_report(gateway, sandbox_id, report))
    tmux.wait_for("sandbox@")  # the login shell's prompt (user@host)
    tmux.keys("echo hello-$((6 * 7))", "Enter")
    tmux.wait_for("hello-42")
    tmux.keys("stty size", "Enter")
    tmux.wait_for("30 100")
    tmux("resize-window", "-t", "main", "-x", "120", "-y", "40")
    time.sleep(0.5)
    tmux.keys("clear; stty size", "Enter")
    tmux.wait_for("40 120")
    tmux.keys("exit 5", "Enter")
    tmux.wait_for("SHELL-DONE")
    text = report.read_text()
    assert "EXIT=5" in text
    # Cooked mode again: canonical input and echo on (raw mode turns both off).
    modes = text.split()
    assert "icanon" in modes and "echo" in modes and "-icanon" not in modes


def test_shell_restores_the_terminal_when_the_sandbox_is_deleted_under_it(
    gateway: GatewayProcess, tmux: Tmux, tmp_path: Path
) -> None:
    """The sandbox deleted (REST) under an open ``shell``: the CLI prints an ``Error: sandbox``
    line without a traceback, exits 1, and the pane is back in canonical mode with echo on."""
    sandbox_id = gateway.create()
    report = tmp_path / "report"
    tmux.start(shell_then_report(gateway, sandbox_id, report))
    tmux.wait_for("sandbox@")
    assert gateway.delete(sandbox_id).status_code == 200
    screen = tmux.wait_for("SHELL-DONE")
    assert "Traceback" not in screen and "Error: sandbox" in screen
    text = report.read_text()
    assert "EXIT=1" in text
    modes = text.split()
    assert "icanon" in modes and "echo" in modes and "-icanon" not in modes
