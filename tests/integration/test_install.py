"""A plain ``pip install .`` into a fresh venv gives a working ``twistd sandboxgw``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_plain_pip_install_finds_the_plugin(tmp_path: Path) -> None:
    """The dropin is installed into twisted/plugins, so twistd finds sandboxgw with no
    PYTHONPATH and from outside the source tree."""
    # A copy of the source tree, so the build leaves nothing (build/, *.egg-info) in the repo.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
        check=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    dropins = list(venv.glob("lib/python3*/site-packages/twisted/plugins/sandboxgw_plugin.py"))
    assert len(dropins) == 1 and not dropins[0].is_symlink()
    result = subprocess.run(
        [str(venv / "bin" / "twistd"), "sandboxgw", "--help"],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--pool-size" in result.stdout
