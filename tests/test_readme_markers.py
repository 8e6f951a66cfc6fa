"""Every fenced block of README.md is marked as an example that a test runs, or as no
example with a reason (``tests/readme_blocks.py``): a new unmarked block fails here, before any
integration test runs."""

from __future__ import annotations

import ast

from tests.readme_blocks import (
    README,
    SPECIAL_KINDS,
    Block,
    blocks,
    marker_problems,
    readme_blocks,
)


def test_every_readme_fenced_block_has_a_known_marker() -> None:
    """No fenced block of the README lacks a ``readme-test`` marker, every marker's kind is
    known, reasons are given, and each special example appears exactly once."""
    found = readme_blocks()
    assert len(found) >= 16
    assert marker_problems(found) == []


def test_an_unmarked_block_is_reported() -> None:
    """The check itself: an unmarked fence, an unknown kind, a reasonless not-an-example and a
    missing special example are each reported; other HTML comments may sit between a marker
    and its fence."""
    text = (
        "```bash\nrm -rf /tmp/x\n```\n"
        '<!-- readme-test: shell expect="x" -->\n<!-- recipe: r -->\n```bash\necho x\n```\n'
        "<!-- readme-test: bogus -->\n```sh\ntrue\n```\n"
        "<!-- readme-test: not-an-example -->\n```\nlisting\n```\n"
    )
    found = blocks(text)
    assert [b.kind for b in found] == [None, "shell", "bogus", "not-an-example"]
    assert found[1] == Block("shell", ' expect="x"', 7, "bash", "echo x")
    problems = marker_problems(found)
    assert "README.md line 2 (bash): fenced block without a" in problems[0]
    assert "unknown readme-test kind 'bogus'" in problems[1]
    assert "not-an-example needs a reason" in problems[2]
    assert sum("expected exactly one" in p for p in problems) == len(SPECIAL_KINDS)


def test_each_special_kind_has_its_integration_test() -> None:
    """Each special kind names a test function that exists in the integration module, so no
    kind is marked as run by a test that is not there."""
    module = README.parent / "tests" / "integration" / "test_readme.py"
    tree = ast.parse(module.read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert set(SPECIAL_KINDS.values()) <= functions
