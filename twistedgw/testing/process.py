"""One harness for a real gateway process: ``twistd --nodaemon sandboxgw`` on a free loopback
port, started, waited for and stopped by PID. The integration tests
(``tests/integration/conftest.py``) and the benchmarks (``bench/benchlib.py``) both build on
``GatewayProcess``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

#: The source checkout the gateway under test runs from.
REPO = Path(__file__).resolve().parents[2]
#: The sandbox image the harness's gateways use (``SANDBOX_IMAGE`` names another).
IMAGE = os.environ.get("SANDBOX_IMAGE", "sandbox-websocket-image")


def template_image(name: str) -> str:
    """The image ``sandbox-image/build.sh`` builds for template ``name`` (its
    ``TEMPLATE_IMAGE_PREFIX``, default ``twistedgw-``, then the name)."""
    return os.environ.get("TEMPLATE_IMAGE_PREFIX", "twistedgw-") + name


#: The python template's image.
PYTHON_IMAGE = template_image("python")


class GatewayFailed(RuntimeError):
    """The gateway process exited early or never answered."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistd_command() -> list[str]:
    """The venv's twistd, next to the running interpreter."""
    twistd = Path(sys.executable).parent / "twistd"
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def gateway_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of a gateway under test: this one, with the checkout first on
    ``PYTHONPATH``."""
    env = dict(environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class GatewayProcess:
    """One ``twistd --nodaemon sandboxgw`` child process on a loopback port.

    :param instance: its ``--instance`` (the label on its containers).
    :param args: more command-line options.
    :param state_dir: its ``--state-dir`` (default: under ``$TMPDIR``).
    :param log_path: where its output goes (default: under ``$TMPDIR``).
    :param env: its environment (default: ``gateway_env()``).
    :param image: its ``--image``.
    """

    #: Seconds between /healthz polls while waiting for it.
    poll_interval = 0.1

    def __init__(
        self,
        instance: str,
        *args: str,
        state_dir: Path | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        image: str = IMAGE,
    ) -> None:
        self.instance = instance
        self.args = args
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        self.log_path = log_path or tmp / f"twistedgw-{instance}.log"
        self.state_dir = state_dir or tmp / f"twistedgw-state-{instance}"
        self.env = dict(env) if env is not None else gateway_env()
        self.image = image

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0, ready: bool = True) -> None:
        """Start the process and wait until /healthz answers and, with ``ready``, says the
        gateway has recovered its sandboxes (sandbox routes answer 503 until then)."""
        self.launch()
        self.wait_ready(timeout, ready)

    def launch(self) -> None:
        """Start the process without waiting for it to answer."""
        command = [
            *twistd_command(),
            "--nodaemon",
            "--pidfile=",
            "sandboxgw",
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--instance",
            self.instance,
            "--image",
            self.image,
            "--state-dir",
            str(self.state_dir),
            *self.args,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env
            )

    def wait_ready(self, timeout: float = 30.0, ready: bool = True) -> None:
        """Wait until /healthz answers 200 (and, with ``ready``, says ``ready``)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GatewayFailed(
                    f"gateway {self.instance} exited early; see {self.log_path}:\n{self.tail()}"
                )
            try:
                health = requests.get(self.url + "/healthz", timeout=1)
                if health.status_code == 200 and (health.json().get("ready", True) or not ready):
                    return
            except requests.RequestException:
                pass
            time.sleep(self.poll_interval)
        raise GatewayFailed(
            f"gateway {self.instance} did not answer within {timeout} s:\n{self.tail()}"
        )

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the process (by PID) and wait for it, SIGKILL if it will not go; returns
        its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)
