"""The "overall" mutation score: a random sample of every gateway mutant, fast suite first,
then integration tests for what the fast suite lets through.

Run by ``scripts/mutation.sh overall`` in its staged directory (``.mutation/overall``), after
``mutmut run`` has generated the mutants of the whole gateway package (runtime and process
wiring included). Checking all of them against integration tests would take days on this
machine, so this checks a uniform random sample (``--sample``, seeded by ``--seed``) and reports
the share killed with a 95% Wilson interval:

1. **Fast phase:** ``mutmut run NAME...`` on the sample: mutmut runs the fast tests that cover
   each mutant (its records in ``mutants/**/*.py.meta`` are the outcomes).
2. **Integration phase:** each sampled mutant that survived (or that no fast test covers) is
   run against the integration test files of its module (``INTEGRATION`` below; longest module
   prefix wins), in ``mutants/`` with ``MUTANT_UNDER_TEST`` set, which the gateway processes
   the tests start inherit. A kill counts only if the test that failed then passes without
   the mutant (a flaky or broken test kills nothing).
   ``serial`` tests (timing figures, an engine restart) are left out, so the figure is a lower
   bound: a mutant might be killed by a test outside its module's files.

Results: ``overall.json`` (every sampled mutant and how it ended) and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "timeout", "caught by type check"}

#: Module prefix -> the integration test files (under tests/integration/) that exercise it
#: most directly: at most two, as each check of a mutant runs them whole (minutes).
INTEGRATION: dict[str, list[str]] = {
    "twistedgw": ["test_seed_flow.py"],
    "twistedgw.agents": ["test_execution.py"],
    "twistedgw.cli": ["test_cli.py"],
    "twistedgw.client": ["test_client.py"],
    "twistedgw.config": ["test_seed_flow.py", "test_lifecycle.py"],
    "twistedgw.egress": ["test_egress.py"],
    "twistedgw.lease": ["test_swarm_gateway.py"],
    "twistedgw.lifecycle": ["test_lifecycle.py", "test_pool.py"],
    "twistedgw.logging": ["test_operations.py"],
    "twistedgw.metrics": ["test_operations.py"],
    "twistedgw.protocol": ["test_execution.py", "test_processes.py"],
    "twistedgw.proxy": ["test_execution.py", "test_processes.py"],
    "twistedgw.proxy.files": ["test_files.py"],
    "twistedgw.proxy.ports": ["test_previews.py"],
    "twistedgw.reaper": ["test_lifecycle.py", "test_restart_answers.py"],
    "twistedgw.registry": ["test_lifecycle.py", "test_restart_answers.py"],
    "twistedgw.runtime": ["test_runtime_contract.py", "test_security.py"],
    "twistedgw.runtime.docker": ["test_runtime_contract.py", "test_lifecycle.py"],
    "twistedgw.runtime.swarm": ["test_swarm_runtime_contract.py", "test_swarm_gateway.py"],
    "twistedgw.sandbox": ["test_lifecycle.py", "test_restart_answers.py"],
    "twistedgw.service": ["test_seed_flow.py", "test_lifecycle.py"],
    "twistedgw.snapshots": ["test_files.py"],
    "twistedgw.state": ["test_restart_answers.py", "test_lifecycle.py"],
    "twistedgw.tap": ["test_seed_flow.py", "test_lifecycle.py"],
    "twistedgw.web": ["test_seed_flow.py", "test_edge_attacks.py"],
    "twistedgw.web.cluster": ["test_swarm_gateway.py"],
    "twistedgw.web.console": ["test_browser.py"],
    "twistedgw.web.files": ["test_files.py"],
    "twistedgw.web.openapi": ["test_operations.py"],
    "twistedgw.web.previews": ["test_previews.py"],
}


def module_of(name: str) -> str:
    """``twistedgw.web.api.x_route__mutmut_3`` -> ``twistedgw.web.api``."""
    return name.rsplit(".", 1)[0]


def integration_files(module: str) -> list[str]:
    parts = module.split(".")
    while parts and ".".join(parts) not in INTEGRATION:
        parts.pop()
    return INTEGRATION[".".join(parts) or "twistedgw"]


def outcomes(root: Path) -> dict[str, str]:
    """Every mutant's status (mutmut's records)."""
    found: dict[str, str] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        for key, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            found[key] = status_by_exit_code[code]
    return found


def wilson(killed: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval of killed/total."""
    if total == 0:
        return (0.0, 1.0)
    z = 1.96
    p = killed / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (centre - half, centre + half)


def pytest_run(paths: list[str], mutant: str, timeout: float, log: Path) -> str:
    """``passed``, ``failed`` or ``timeout`` of these tests with ``mutant`` on (``""``: none),
    run in ``mutants/`` (so the gateway processes the tests start import the mutated code)."""
    mutants = Path("mutants").resolve()
    env = dict(os.environ, MUTANT_UNDER_TEST=mutant, PYTHONPATH=str(mutants))
    command = [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE",
        "--serial=skip", *(["-n", "2", "--dist", "loadfile"] if len(paths) > 1 else []), *paths,
    ]  # fmt: skip
    with log.open("w") as out:
        try:
            done = subprocess.run(command, cwd=mutants, env=env, stdout=out, stderr=out,
                                  timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return "timeout"
    return "passed" if done.returncode == 0 else "failed"


def first_failure(log: Path, word: str) -> str | None:
    """The node id of the first test a pytest log's summary reports with ``word``
    (``FAILED `` or ``ERROR ``)."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(word):
            return line[len(word) :].split(" - ", 1)[0].strip()
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=100)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--jobs", type=int, default=1, help="mutmut workers (fast phase)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    parser.add_argument("--mutmut", default=str(Path(sys.executable).parent / "mutmut"))
    parser.add_argument("--summary", action="store_true", help="only report what is done")
    args = parser.parse_args()
    root = Path("mutants")
    everything = outcomes(root)
    if not everything:
        print("no mutants generated here (run scripts/mutation.sh overall)", file=sys.stderr)
        return 2
    names = sorted(everything)
    # In the random order drawn: every prefix is itself a uniform sample, so a run stopped
    # early (or --summary) reports on the prefix it finished.
    sample = random.Random(args.seed).sample(names, min(args.sample, len(names)))
    report_path = Path("overall.json")
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if report.get("sample") != sample:
        report = {"seed": args.seed, "population": len(names), "sample": sample, "mutants": {}}
    print(f"[overall] {len(names)} mutants; sample of {len(sample)} (seed {args.seed})")

    # 1. Fast phase (mutmut keeps its outcomes: a rerun only checks what is left).
    unchecked = [n for n in sample if everything[n] == "not checked"]
    if unchecked and not args.summary:
        print(f"[overall] fast phase: mutmut run on {len(unchecked)} mutants", flush=True)
        subprocess.run(
            [args.mutmut, "run", "--max-children", str(args.jobs), *unchecked],
            stdout=subprocess.DEVNULL, check=False,  # its errors (stderr) stay visible
        )  # fmt: skip
        everything = outcomes(root)
    left = [n for n in sample if everything[n] == "not checked"]
    if left and not args.summary:
        print(f"[overall] the fast phase left {len(left)} sampled mutants unchecked "
              "(mutmut failed: see its output above); stopping", file=sys.stderr)  # fmt: skip
        return 1

    # 2. Integration phase.
    logs = Path("overall-logs")
    logs.mkdir(exist_ok=True)
    for index, name in enumerate(sample, 1):
        entry = report["mutants"].setdefault(name, {})
        entry["fast"] = everything[name]
        if entry["fast"] in KILLED or "integration" in entry or args.summary:
            continue
        files = integration_files(module_of(name))
        entry["files"] = files
        started = time.monotonic()
        log = logs / f"{name}.log"
        paths = [f"tests/integration/{f}" for f in files]
        outcome = pytest_run(paths, name, args.timeout, log)
        if outcome == "failed" and first_failure(log, "FAILED ") is None:
            # Only errors (a fixture's gateway that did not start in time on the loaded
            # machine): not a verdict on the mutant; one more try.
            outcome = pytest_run(paths, name, args.timeout, log)
        if outcome == "failed":
            # A kill counts only if the test that failed (or, after set-up errors twice, the
            # test whose set-up failed) passes without the mutant: not a flaky or broken test,
            # nor one this staged copy cannot run.
            failed = first_failure(log, "FAILED ") or first_failure(log, "ERROR ")
            entry["failed_test"] = failed
            if failed is None:
                outcome = "not counted: no test named"
            elif pytest_run([failed], "", args.timeout, logs / f"{name}.clean.log") != "passed":
                outcome = "not counted: the failed test fails without the mutant too"
        entry["integration"] = outcome
        entry["seconds"] = round(time.monotonic() - started)
        report_path.write_text(json.dumps(report, indent=1))
        print(f"[overall] {index}/{len(sample)} {name}: fast {entry['fast']}, "
              f"integration {outcome} ({entry['seconds']} s)", flush=True)  # fmt: skip
    for name in sample:
        report["mutants"].setdefault(name, {})["fast"] = everything[name]
    report_path.write_text(json.dumps(report, indent=1))

    # 3. Summary, over the longest prefix of the sample that is decided.
    done: list[str] = []
    for n in sample:
        entry = report["mutants"][n]
        if entry["fast"] not in KILLED and "integration" not in entry:
            break
        done.append(n)
    if not done:
        print("[overall] nothing decided yet")
        return 0

    def overall_killed(n: str) -> bool:
        entry = report["mutants"][n]
        return entry["fast"] in KILLED or entry.get("integration") in ("failed", "timeout")

    by_package: dict[str, Counter[str]] = defaultdict(Counter)
    for n in done:
        counts = by_package[".".join(module_of(n).split(".")[:2])]
        counts["sampled"] += 1
        counts["fast"] += everything[n] in KILLED
        counts["overall"] += overall_killed(n)
    print(f"\n{'package':<24} sampled  fast  overall")
    for package, counts in sorted(by_package.items()):
        print(f"{package:<24} {counts['sampled']:>7} {counts['fast']:>5} {counts['overall']:>8}")
    size = len(done)
    print(f"decided: {size} of the {len(sample)} sampled (the first {size} drawn)")
    fast_killed = sum(1 for n in done if everything[n] in KILLED)
    total_killed = sum(1 for n in done if overall_killed(n))
    figures = (("fast suite", fast_killed), ("overall (fast + integration)", total_killed))
    for label, killed in figures:
        low, high = wilson(killed, size)
        print(f"{label}: {killed}/{size} = {killed / size:.0%} (95% {low:.0%} to {high:.0%})")
    others = [n for n in done if not overall_killed(n)]
    print(f"not killed ({len(others)}):")
    for n in others:
        entry = report["mutants"][n]
        print(f"  {n}: fast {entry['fast']}, integration {entry.get('integration')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
