"""Plant the bugs that issue 13 found surviving the test suite, one at a time, and check that
the fast suite now catches each.

    .venv/bin/python scripts/planted_bugs.py [NAME...]

Each bug is planted in a scratch copy of the work tree (nothing here is edited) and the fast
tests that guard its code (``Bug.tests``, the files that exist; ``-m "not integration and not
slow"``) run against the copy. They first run once without any bug: a bug is *caught* when a
test that passed then fails with the bug (a test that is flaky on a loaded machine is not
taken for a catch). Exits 1
if any bug survives, or if a bug's code is no longer where this list expects it (the list
must follow the code).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from attrs import frozen

REPO = Path(__file__).resolve().parents[1]


@frozen
class Bug:
    name: str
    path: str
    old: str
    new: str
    #: The test files that guard this code (those that exist are run).
    tests: tuple[str, ...] = ()


BUGS = (
    Bug(
        "instance label dropped from the container filter",
        "twistedgw/runtime/labels.py",
        'return [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={instance}"]',
        'return [f"{LABEL_MANAGED}=true"]',
        tests=(
            "tests/test_isolation.py",
            "tests/test_runtime_contract.py",
            "tests/test_reaper.py",
            "tests/test_recovery.py",
            "tests/test_lifecycle.py",
        ),
    ),
    Bug(
        "state not saved on shutdown",
        "twistedgw/lifecycle/manager.py",
        "        d = self.save_state()\n"
        '        d.addErrback(lambda f: self._log.failure("could not save state at shutdown", f))',
        "        d: Deferred[None] = Deferred()\n        d.callback(None)",
        tests=(
            "tests/test_state.py",
            "tests/test_lifecycle.py",
        ),
    ),
    Bug(
        "expires_at not written to the state file",
        "twistedgw/state.py",
        '                "expires_at": s.expires_at,\n',
        "",
        tests=(
            "tests/test_state.py",
            "tests/test_lifecycle.py",
        ),
    ),
    Bug(
        "state file written without fsync",
        "twistedgw/state.py",
        "                os.fsync(f.fileno())\n",
        "",
        tests=(
            "tests/test_state.py",
            "tests/test_lifecycle.py",
        ),
    ),
    Bug(
        "server maximum lifetime not the default lifetime",
        "twistedgw/lifecycle/options.py",
        "        lifetime = lifetime or policy.max_lifetime\n",
        "",
        tests=(
            "tests/test_lifetimes.py",
            "tests/test_lifecycle.py",
            "tests/test_api.py",
        ),
    ),
    Bug(
        "pool hand-out without expiry",
        "twistedgw/lifecycle/pool.py",
        "expires_at=None if lifetime is None else now + lifetime,",
        "expires_at=None,",
        tests=(
            "tests/test_lifetimes.py",
            "tests/test_lifecycle.py",
            "tests/test_pool.py",
        ),
    ),
    Bug(
        "valid query token accepted alongside a wrong header token",
        "twistedgw/web/auth.py",
        "        if presented is None and query_token:\n            presented = query_token\n",
        "        if query_token and any(\n"
        "            hmac.compare_digest(query_token.encode(), t) for t in self._tokens\n"
        "        ):\n"
        "            presented = query_token\n",
        tests=(
            "tests/test_auth.py",
            "tests/test_edge.py",
            "tests/test_proxy.py",
        ),
    ),
    Bug(
        "/healthz shows counts with tokens on",
        "twistedgw/web/api.py",
        "        if not self.authenticator.enabled:\n",
        "        if True:\n",
        tests=(
            "tests/test_auth.py",
            "tests/test_api.py",
            "tests/test_recovery.py",
        ),
    ),
    Bug(
        "reconcile records an external removal as deleted",
        "twistedgw/lifecycle/reconcile.py",
        "                    REASON_EXITED,\n"
        '                    "container removed outside the gateway",',
        '                    "deleted",\n'
        '                    "container removed outside the gateway",',
        tests=(
            "tests/test_reaper.py",
            "tests/test_recovery.py",
            "tests/test_lifecycle.py",
        ),
    ),
    Bug(
        "env-name regex without its end anchor",
        "twistedgw/protocol.py",
        r'ENV_NAME_RE = re.compile(rf"\A[A-Za-z_][A-Za-z0-9_]{{0,{MAX_ENV_NAME_LENGTH - 1}}}\Z")',
        r'ENV_NAME_RE = re.compile(rf"\A[A-Za-z_][A-Za-z0-9_]{{0,{MAX_ENV_NAME_LENGTH - 1}}}")',
        tests=(
            "tests/test_api.py",
            "tests/test_lifecycle.py",
            "tests/test_protocol.py",
            "tests/agent/test_dispatch.py",
        ),
    ),
    Bug(
        "error replies lose their request_id",
        "twistedgw/protocol.py",
        '        "request_id": _echo_request_id(request_id),\n        "command": None,',
        '        "request_id": None,\n        "command": None,',
        tests=(
            "tests/test_protocol.py",
            "tests/test_proxy_protocol.py",
            "tests/test_proxy.py",
            "tests/agent/test_dispatch.py",
        ),
    ),
    Bug(
        "agent truncation keeps only the head",
        "sandbox-image/agent/capture.py",
        "        if not view or self._tail_cap == 0:\n            return\n",
        "        return\n",
        tests=(
            "tests/agent/test_capture.py",
            "tests/agent/test_dispatch.py",
        ),
    ),
    Bug(
        "tokens compared with == (not constant time)",
        "twistedgw/web/auth.py",
        "            if hmac.compare_digest(candidate, token):",
        "            if candidate == token:",
        tests=("tests/test_auth.py",),
    ),
    Bug(
        "a corrupt state file silently treated as empty",
        "twistedgw/state.py",
        "            self._set_aside(error)\n",
        "",
        tests=(
            "tests/test_state.py",
            "tests/test_lifecycle.py",
        ),
    ),
)


def copy_tree(target: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in files:
        if not name or name.startswith(b".mutation/"):
            continue
        source = REPO / os.fsdecode(name)
        if not source.is_file():
            continue
        destination = target / os.fsdecode(name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


def failures(bug: Bug | None) -> set[str] | None:
    """The tests failing with ``bug`` planted (``None``: no bug); ``None`` if the code to
    break is not there."""
    with tempfile.TemporaryDirectory(prefix="planted-") as scratch:
        root = Path(scratch)
        copy_tree(root)
        if bug is not None:
            path = root / bug.path
            text = path.read_text()
            if text.count(bug.old) != 1:
                return None
            path.write_text(text.replace(bug.old, bug.new))
        env = {**os.environ, "PYTHONPATH": str(root)}
        wanted = bug.tests if bug is not None else sorted({t for b in BUGS for t in b.tests})
        tests = [t for t in wanted if (root / t).exists()]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-rfE",
                "-p",
                "no:cacheprovider",
                "-m",
                "not integration and not slow",
                *tests,
            ],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
        failed = {
            line.split()[1]
            for line in result.stdout.splitlines()
            if line.startswith(("FAILED ", "ERROR "))
        }
        if result.returncode not in (0, 1) or (result.returncode == 1 and not failed):
            failed.add(f"pytest exit {result.returncode}")
        return failed


def main(names: list[str]) -> int:
    bugs = [b for b in BUGS if not names or any(n in b.name for n in names)]
    baseline = failures(None) or set()
    if baseline:
        print(f"failing without any bug (ignored below): {sorted(baseline)}", flush=True)
    worst = 0
    for bug in bugs:
        failed = failures(bug)
        caught = None if failed is None else bool(failed - baseline)
        for name in sorted(failed - baseline)[:3] if failed else ():
            print(f"    {name}")
        verdict = {True: "caught", False: "SURVIVED", None: "NOT FOUND in the code"}[caught]
        print(f"{verdict:>10}: {bug.name}", flush=True)
        if not caught:
            worst = 1
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
