"""The benchmark suite in smoke mode, so it cannot rot (its figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.conftest import REPO

ALL = {"ttfc", "rtt", "throughput", "stream", "scale", "hop", "agent", "burst"}


def test_bench_smoke_runs_every_benchmark(docker_client: Any, tmp_path: Path) -> None:
    """`bench/run.py --smoke` exercises every benchmark, exits 0, writes its JSON, and leaves
    no container behind."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["smoke"] is True
    assert set(figures["benchmarks"]) == ALL
    assert not figures["errors"]
    assert figures["summary"]
    leftovers = docker_client.containers.list(all=True, filters={"label": "org.twistedgw.bench=1"})
    assert leftovers == []
