"""``twistd sandboxgw`` is found without PYTHONPATH in the venv ``scripts/setup-venv.sh`` built
(the one running these tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TWISTD = str(Path(sys.executable).parent / "twistd")


def test_twistd_finds_the_plugin_without_pythonpath() -> None:
    """From outside the repository and with no PYTHONPATH, ``twistd sandboxgw --help`` shows
    the gateway's options (not "Unknown command")."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [TWISTD, "sandboxgw", "--help"],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--pool-size" in result.stdout
    assert "Unknown command" not in result.stdout + result.stderr
