"""Every README example marked ``<!-- readme-test: python -->`` or ``<!-- readme-test:
shell -->`` (the marker on the line before its fence) runs here against a real gateway:
python blocks with the venv's interpreter, shell blocks with bash (``set -e``, the venv's
``twistedgw`` and ``python3`` first on PATH), in a scratch directory, with the README's
``localhost:8003`` / ``127.0.0.1:8003`` replaced by the test gateway's address and
``TWISTEDGW_URL`` set to it. ``expect="TEXT"`` in the marker: the block's stdout must contain
TEXT (repeatable). Blocks without a marker (other engineers' sections, interactive ones) are
not run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import GatewayProcess
from twistedgw.testing.process import REPO, gateway_env

pytestmark = pytest.mark.integration

MARKER = re.compile(r"^<!-- readme-test: (python|shell)((?: expect=\"[^\"]*\")*) -->$")
EXPECT = re.compile(r"expect=\"([^\"]*)\"")


@dataclass(frozen=True)
class Example:
    kind: str
    line: int
    code: str
    expect: tuple[str, ...]


def examples(text: str) -> list[Example]:
    """The marked fenced blocks of a Markdown text, in order."""
    lines = text.splitlines()
    found: list[Example] = []
    for i, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        fence = lines[i + 1].strip()
        assert fence.startswith("```"), f"README line {i + 1}: marker not followed by a fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        found.append(
            Example(
                match.group(1),
                i + 2,
                "\n".join(lines[i + 2 : end]) + "\n",
                tuple(EXPECT.findall(match.group(2))),
            )
        )
    return found


README_EXAMPLES = examples((REPO / "README.md").read_text())


def test_the_extractor_finds_marked_blocks_only() -> None:
    text = (
        '<!-- readme-test: python expect="a" expect="b" -->\n```python\nprint(\'a b\')\n```\n'
        "```bash\nnot run\n```\n<!-- readme-test: shell -->\n```bash\necho x\n```\n"
    )
    assert examples(text) == [
        Example("python", 2, "print('a b')\n", ("a", "b")),
        Example("shell", 9, "echo x\n", ()),
    ]
    kinds = {e.kind for e in README_EXAMPLES}
    assert kinds == {"python", "shell"} and len(README_EXAMPLES) >= 6


@pytest.mark.parametrize(
    "example", README_EXAMPLES, ids=[f"{e.kind}-line{e.line}" for e in README_EXAMPLES]
)
def test_readme_example_runs(gateway: GatewayProcess, example: Example, tmp_path: Path) -> None:
    address = gateway.url.removeprefix("http://")
    code = example.code.replace("localhost:8003", address).replace("127.0.0.1:8003", address)
    env = gateway_env()
    env.pop("TWISTEDGW_TOKEN", None)
    env["TWISTEDGW_URL"] = gateway.url
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if example.kind == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    where = f"README.md line {example.line}"
    assert result.returncode == 0, f"{where}:\n{result.stdout}\n{result.stderr}"
    for text in example.expect:
        assert text in result.stdout, f"{where}: {text!r} not in:\n{result.stdout}"
