"""Per-module mutation score from ``mutmut results --all true`` (run in a staged directory).

Killed = killed, timed out or caught by the type check; every other outcome (survived, no
tests, suspicious, segfault) counts against the score; skipped and not-checked mutants are left
out. Prints one line per module and a total.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict

KILLED = {"killed", "timeout", "caught by type check"}
UNCOUNTED = {"skipped", "not checked", "check was interrupted by user"}


def main() -> int:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in name:
            continue
        module = name.split(".x_")[0].split(".xǁ")[0]
        by_module[module][status] += 1
    total: Counter[str] = Counter()
    for module in sorted(by_module):
        counts = by_module[module]
        total.update(counts)
        print(_line(module, counts))
    print(_line("TOTAL", total))
    return 0


def _line(name: str, counts: Counter[str]) -> str:
    counted = sum(n for status, n in counts.items() if status not in UNCOUNTED)
    killed = sum(n for status, n in counts.items() if status in KILLED)
    score = 100.0 * killed / counted if counted else 100.0
    others = ", ".join(
        f"{status} {n}" for status, n in sorted(counts.items()) if status not in KILLED
    )
    return f"{name:40s} {killed:4d}/{counted:<4d} {score:5.1f}%  {others}"


if __name__ == "__main__":
    sys.exit(main())
