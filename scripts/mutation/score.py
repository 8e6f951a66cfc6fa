"""Per-module mutation scores of a mutmut run (run in its staged directory).

Reads mutmut's own records (``mutants/**/*.py.meta`` for each mutant's outcome, ``.spans`` for
where each mutant's copy of its function is) and prints one line per module and a total:
killed / counted and the score, then the same without the mutants that only change a log
call (its message text or fields: no test pins log wording, so those survive by design), and
the surviving mutants by kind.

Killed = killed, timed out or caught by the type check; every other outcome (survived, no
tests, suspicious, segfault) counts against the score; not-yet-checked or skipped mutants are
left out (a run stopped early gives the score of what it checked).
"""

from __future__ import annotations

import ast
import difflib
import json
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "timeout", "caught by type check"}
UNCOUNTED = {"skipped", "not checked", "check was interrupted by user"}
LOG_METHODS = {"debug", "info", "warn", "error", "critical", "failure"}


def _is_log_call(node: ast.stmt) -> bool:
    if not isinstance(node, ast.Expr) or not isinstance(node.value, ast.Call):
        return False
    func = node.value.func
    if not isinstance(func, ast.Attribute) or func.attr not in LOG_METHODS:
        return False
    owner = func.value
    name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
    return "log" in name.lower()


def _changed_lines(orig: list[str], mutant: list[str]) -> list[int]:
    """0-based lines of ``orig`` that the mutant changes (names of the copies aside)."""
    changed: list[int] = []
    matcher = difflib.SequenceMatcher(a=orig, b=mutant, autojunk=False)
    for tag, i1, i2, _, _ in matcher.get_opcodes():
        if tag != "equal":
            changed.extend(range(i1, max(i2, i1 + 1)))
    return changed


def _kind(orig: list[str], mutant: list[str]) -> str:
    """``log`` if every change is inside a log call, else ``code``."""
    try:
        tree = ast.parse(textwrap.dedent("".join(orig)))
    except SyntaxError:
        return "code"
    log_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and _is_log_call(node):
            log_lines.update(range(node.lineno - 1, (node.end_lineno or node.lineno)))
    changed = _changed_lines(orig, mutant)
    if changed and all(line in log_lines for line in changed):
        return "log"
    return "code"


def outcomes(root: Path) -> dict[str, list[tuple[str, str]]]:
    """(status, kind) of every mutant, by module."""
    by_module: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for meta_path in sorted(root.rglob("*.py.meta")):
        source = meta_path.with_suffix("")
        spans_path = source.with_name(source.name + ".spans")
        meta = json.loads(meta_path.read_text())
        spans = json.loads(spans_path.read_text())["spans"] if spans_path.exists() else {}
        lines = source.read_text().splitlines(keepends=True)
        module = ".".join(source.relative_to(root).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for key, exit_code in meta.get("exit_code_by_key", {}).items():
            status = status_by_exit_code[exit_code]
            kind = "code"
            mangled = key[len(module) + 1 :]
            base = mangled.partition("__mutmut_")[0]
            if mangled in spans and base + "__mutmut_orig" in spans:
                start, end = spans[mangled]
                o_start, o_end = spans[base + "__mutmut_orig"]
                own = [
                    line.replace(mangled, base + "__mutmut_orig") for line in lines[start - 1 : end]
                ]
                kind = _kind(lines[o_start - 1 : o_end], own)
            by_module[module].append((status, kind))
    return by_module


def _line(name: str, results: list[tuple[str, str]]) -> str:
    counted = [(s, k) for s, k in results if s not in UNCOUNTED]
    killed = sum(s in KILLED for s, _ in counted)
    code = [(s, k) for s, k in counted if k == "code"]
    code_killed = sum(s in KILLED for s, _ in code)
    lost = Counter(f"{s} ({k})" for s, k in counted if s not in KILLED)
    pending = sum(s in UNCOUNTED for s, _ in results)

    def pct(a: int, b: int) -> str:
        return f"{100.0 * a / b:5.1f}%" if b else "    -"

    return (
        f"{name:32s} {killed:4d}/{len(counted):<4d} {pct(killed, len(counted))}"
        f"   w/o log calls {code_killed:4d}/{len(code):<4d} {pct(code_killed, len(code))}"
        + (f"   unchecked {pending}" if pending else "")
        + (
            "   not killed: " + ", ".join(f"{k} {n}" for k, n in sorted(lost.items()))
            if lost
            else ""
        )
    )


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("mutants")
    by_module = outcomes(root)
    everything: list[tuple[str, str]] = []
    for module in sorted(by_module):
        if not by_module[module]:
            continue
        everything += by_module[module]
        print(_line(module, by_module[module]))
    print(_line("TOTAL", everything))
    return 0


if __name__ == "__main__":
    sys.exit(main())
