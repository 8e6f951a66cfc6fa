#!/usr/bin/env bash
# scripts/mutation/recheck.sh TARGET MODULE_PREFIX TEST_PATH... [-- PYTEST_ARGS...]
#
# Re-checks the mutants that survived a `scripts/mutation.sh` run (TARGET: gateway or agent)
# in the modules whose names start with MODULE_PREFIX (e.g. twistedgw.lifecycle.pool), against
# the given tests as they are in the work tree now: new fast tests, or integration tests
# (which start real gateway processes; they inherit MUTANT_UNDER_TEST, so the gateway runs
# the mutant). Works on a copy of the staged mutants/ (a run still going is left alone) with
# the work tree's tests/ copied over it. Prints one line per mutant and the count killed;
# mutmut's own records are not changed. Runs under `nice -n 19`, one mutant at a time, each
# for at most RECHECK_TIMEOUT seconds (default 300).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
target=${1:?target (gateway or agent)}
prefix=${2:?module prefix}
shift 2
tests=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do tests+=("$1"); shift; done
[ $# -gt 0 ] && shift
extra=("$@")
venv="${TWISTEDGW_VENV:-$here/.venv}"
stage="$here/.mutation/$target"
[ -d "$stage/mutants" ] || { echo "no staged run in $stage" >&2; exit 2; }
copy=$(mktemp -d "${TMPDIR:-/tmp}/mutation-recheck.XXXXXX")
trap 'rm -rf "$copy"' EXIT
cp -a "$stage/mutants/." "$copy/"
rm -rf "$copy/tests"
cp -a "$here/tests" "$copy/tests"
if [ "$target" = agent ]; then
    # The staged agent package sits at the top, as the tests import it.
    rm -rf "$copy/sandbox-image/agent"
fi
mapfile -t survivors < <(cd "$stage" && env -u PYTHONPATH "$venv/bin/mutmut" results 2>/dev/null \
    | sed -n 's/^ *\([^ ]*\): \(survived\|no tests\)$/\1/p' \
    | awk -v p="$prefix" 'index($0, p) == 1' || true)
check() {
    # A mutant that hangs the tests counts as killed (as mutmut counts a timeout).
    (cd "$copy" && MUTANT_UNDER_TEST="$1" PYTHONPATH="$copy" nice -n 19 \
        timeout "${RECHECK_TIMEOUT:-300}" "$venv/bin/python" -m pytest -x -q -p no:cacheprovider "${tests[@]}" "${extra[@]}" \
        >"$copy/last.log" 2>&1)
}
# The tests must pass on the unmutated code first, or every "kill" would be a broken test.
if ! check ""; then
    cat "$copy/last.log" >&2
    echo "the tests fail without a mutant; nothing re-checked" >&2
    exit 1
fi
killed=0
for name in "${survivors[@]}"; do
    if check "$name"; then
        echo "survived $name"
    else
        echo "killed   $name"
        killed=$((killed + 1))
    fi
done
echo "killed $killed of ${#survivors[@]} survivors of $prefix"
