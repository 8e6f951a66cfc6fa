#!/usr/bin/env bash
# scripts/mutation.sh [logic|gateway|agent|all] [MODULE_GLOB...]
#
#   logic    the gateway's logic modules (LOGIC below, ~2070 mutants) and the agent's
#            (AGENT_LOGIC, ~1040): the documented, measured set. On the shared 2-core machine,
#            2 workers at nice 19 took about 50 minutes for the gateway's, 20 for the agent's.
#   gateway  the whole gateway package (but runtime/docker.py and twistedgw/testing/): hours
#   agent    the whole agent package (but __main__.py)
#   all      gateway, then agent
#   overall  the whole gateway package, the Docker runtime and the wiring included: generates
#            every mutant, then scripts/mutation/overall.py checks a random sample
#            (OVERALL_SAMPLE, default 100; OVERALL_SEED, default 13) against the fast suite and
#            its survivors against integration tests (needs the engine and the image, as
#            tests/run.sh provides). Prints the share killed with a 95% interval.
#
# Mutation testing (mutmut) against the fast, in-memory suite; not part of CI (slow).
# Each target is staged in .mutation/<target>/ (a copy of the work tree, git-ignored) with its
# configuration from scripts/mutation/<target>.toml as pyproject.toml, so the mutated package
# is imported under the name the tests use (the agent lives in sandbox-image/, imported as
# `agent`). Optional MODULE_GLOBs restrict the run (e.g. 'twistedgw/state.py' 'twistedgw/web/*').
# The machine is shared: runs under `nice -n 19` with MUTATION_JOBS workers (default 1).
# Results: .mutation/<target>/score.txt (per module, from scripts/mutation/score.py, which can
# also be run in .mutation/<target>/ while mutmut is still going), mutmut's own output in
# .mutation/<target>.log; `mutmut show NAME` / `mutmut browse` in .mutation/<target>/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
target=${1:-all}
shift || true
jobs=${MUTATION_JOBS:-1}
venv="${TWISTEDGW_VENV:-$here/.venv}"
log() { printf '[mutation] %s\n' "$*" >&2; }
# The logic modules: pure decisions the fast suite must guard (no process wiring, no Docker SDK).
LOGIC=(
    twistedgw/state.py twistedgw/sandbox.py twistedgw/registry.py twistedgw/reaper.py
    twistedgw/runtime/labels.py twistedgw/runtime/hardening.py
    twistedgw/lifecycle/options.py twistedgw/lifecycle/reconcile.py twistedgw/lifecycle/core.py
    twistedgw/lifecycle/pool.py twistedgw/web/auth.py twistedgw/web/errors.py
    twistedgw/proxy/flow.py
)
AGENT_LOGIC=(agent/capture.py agent/wsproto.py agent/config.py)

stage() {
    local name=$1 dir="$here/.mutation/$1"
    rm -rf "$dir"
    mkdir -p "$dir"
    # Tracked and new files, nothing ignored (no .venv, caches or earlier stages).
    git ls-files -z -co --exclude-standard | grep -zv '^\.mutation/' \
        | xargs -0 -I{} cp --parents -- {} "$dir"/ 2>/dev/null || true
    cp "$here/scripts/mutation/$name.toml" "$dir/pyproject.toml"
    if [ "$name" = agent ]; then
        # The agent at the top, as `agent`; none left under sandbox-image/ to shadow the mutants.
        mv "$dir/sandbox-image/agent" "$dir/agent"
    fi
    printf '%s\n' "$dir"
}

run() {
    local name=$1 dir
    shift
    dir=$(stage "$name")
    if [ $# -gt 0 ]; then
        # Restrict to the given modules (only_mutate is a list of globs).
        python3 - "$dir/pyproject.toml" "$@" <<'PY'
import sys
path, globs = sys.argv[1], sys.argv[2:]
text = open(path).read()
line = "only_mutate = [" + ", ".join(repr(g) for g in globs).replace("'", '"') + "]\n"
text = text.replace("[tool.mutmut]\n", "[tool.mutmut]\n" + line, 1)
open(path, "w").write(text)
PY
    fi
    log "$name: mutmut run in $dir ($jobs worker(s), nice 19)"
    (cd "$dir" && env -u PYTHONPATH nice -n 19 "$venv/bin/mutmut" run --max-children "$jobs") \
        >"$here/.mutation/$name.log" 2>&1 || log "$name: mutmut exited $? (see .mutation/$name.log)"
    (cd "$dir" && "$venv/bin/python" "$here/scripts/mutation/score.py") | tee "$dir/score.txt"
}

case $target in
    gateway | agent) run "$target" "$@" ;;
    logic) run gateway "${LOGIC[@]}"; run agent "${AGENT_LOGIC[@]}" ;;
    overall)
        dir=$(stage overall)
        log "overall: generating every mutant in $dir (and checking twistedgw.registry's)"
        (cd "$dir" && env -u PYTHONPATH nice -n 19 "$venv/bin/mutmut" run --max-children "$jobs" \
            'twistedgw.registry.*') >"$here/.mutation/overall.log" 2>&1 \
            || log "overall: mutmut exited $? (see .mutation/overall.log)"
        (cd "$dir" && env -u PYTHONPATH nice -n 10 "$venv/bin/python" \
            "$here/scripts/mutation/overall.py" --sample "${OVERALL_SAMPLE:-100}" \
            --seed "${OVERALL_SEED:-13}" --jobs "$jobs") | tee "$dir/score.txt"
        ;;
    all) run gateway "$@"; run agent ;;
    *) log "usage: $0 [logic|gateway|agent|all|overall] [MODULE_GLOB...]"; exit 2 ;;
esac
