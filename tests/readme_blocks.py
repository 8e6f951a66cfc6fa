"""The fenced blocks of README.md and their ``<!-- readme-test: KIND ... -->`` markers.

Every fenced block carries a marker on a line before its fence (only other HTML comments,
such as ``<!-- recipe: custom template -->``, may stand between them). The kinds:

* ``python`` / ``shell``, with ``expect="TEXT"`` (repeatable): run as they are by
  ``tests/integration/test_readme.py::test_readme_example_runs``;
* one of ``SPECIAL_KINDS``: run by the test of ``test_readme.py`` that the table names, with
  the substitutions the block's text implies (a real sandbox id, the test's token, ...);
* ``not-an-example (WHY)``: text shown in a fence but nothing to run (a layout listing);
* ``run-elsewhere (WHY)``: an example run by other tests or by CI itself (WHY says where).

``tests/test_readme_markers.py`` fails on a fenced block without a marker, so a new example
cannot slip in untested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

MARKER = re.compile(r"^<!-- readme-test: ([a-z-]+)(.*?) -->$")
EXPECT = re.compile(r"expect=\"([^\"]*)\"")
REASON = re.compile(r"^ \((.+)\)$")

#: Kinds run by ``test_readme_example_runs`` (their arguments: ``expect="..."``).
RUN_KINDS = frozenset({"python", "shell"})
#: Kinds run by a test of their own in ``tests/integration/test_readme.py``: kind -> test.
SPECIAL_KINDS = {
    "files": "test_readme_files_example",
    "preview": "test_readme_port_preview_example",
    "schemathesis": "test_readme_schemathesis_example",
    "dockerfile": "test_readme_template_example",
    "template": "test_readme_template_example",
    "scrape-config": "test_readme_scrape_config_and_queries",
    "promql": "test_readme_scrape_config_and_queries",
    "json-log": "test_readme_json_log_example",
}
#: Kinds that are not run here and must say why: ``KIND (WHY)``.
REASON_KINDS = frozenset({"not-an-example", "run-elsewhere"})


@dataclass(frozen=True)
class Block:
    """One fenced block: its marker's kind and arguments (None: no marker), the 1-based line
    of its first code line, its info string (``bash``), and its code."""

    kind: str | None
    args: str
    line: int
    lang: str
    code: str

    @property
    def expect(self) -> tuple[str, ...]:
        return tuple(EXPECT.findall(self.args))


def blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, in order, with the marker before it if any."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = lines[i].strip()
        if not opening.startswith("```"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"line {i + 1}: a fence that is never closed"
        kind, args = None, ""
        k = i - 1
        while k >= 0 and lines[k].strip().startswith("<!--"):
            match = MARKER.match(lines[k].strip())
            if match:
                kind, args = match.group(1), match.group(2)
                break
            k -= 1
        found.append(
            Block(kind, args, i + 2, opening.removeprefix("```"), "\n".join(lines[i + 1 : end]))
        )
        i = end + 1
    return found


def marker_problems(found: list[Block]) -> list[str]:
    """What is wrong with the markers of these blocks (empty: nothing)."""
    problems = []
    known = RUN_KINDS | set(SPECIAL_KINDS) | REASON_KINDS
    for block in found:
        where = f"README.md line {block.line} ({block.lang or 'no language'})"
        if block.kind is None:
            problems.append(f"{where}: fenced block without a <!-- readme-test: ... --> marker")
        elif block.kind not in known:
            problems.append(f"{where}: unknown readme-test kind {block.kind!r}")
        elif block.kind in REASON_KINDS and not REASON.match(block.args):
            problems.append(f"{where}: {block.kind} needs a reason: {block.kind} (why)")
        elif block.kind in SPECIAL_KINDS and block.args.strip():
            problems.append(f"{where}: {block.kind} takes no arguments")
        elif block.kind in RUN_KINDS and EXPECT.sub("", block.args).strip():
            problems.append(f'{where}: {block.kind} takes only expect="..." arguments')
    for kind in SPECIAL_KINDS:
        count = sum(1 for block in found if block.kind == kind)
        if count != 1:
            problems.append(f"README.md: {count} blocks of kind {kind!r}, expected exactly one")
    return problems


def readme_blocks() -> list[Block]:
    return blocks(README.read_text())


def special_block(kind: str) -> Block:
    """The one README block of a special kind."""
    (block,) = [b for b in readme_blocks() if b.kind == kind]
    return block
