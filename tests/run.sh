#!/usr/bin/env bash
# ./tests/run.sh [pytest args...]
#
# The whole test suite on this machine: sets up the venv, starts a Docker engine if none runs,
# installs tmux and jq if missing (the CLI shell test, a README example), builds the sandbox image and its templates
# (python) if missing or stale, starts a second, swarm-mode engine for the Swarm tests
# (scripts/ensure-swarm.sh), runs ruff and mypy,
# then pytest (fast in-memory tests and integration tests against the real engine and images,
# on loopback). SANDBOX_IMAGE and TEMPLATE_IMAGE_PREFIX name other images (build.sh).
#
# pytest runs twice, with the same arguments: first every test but those marked `serial`, in
# parallel on TEST_WORKERS pytest-xdist workers (default 4; 0 runs that phase without xdist),
# one test file per worker (--dist loadfile, so a module's shared gateway starts once); then
# the `serial` tests alone (timing figures, the dockerd restart). Images are built above, once,
# before either phase. Exits non-zero if either phase fails; a phase that selects no test
# (pytest's exit 5) is no failure unless neither selected any.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
log() { printf '[tests] %s\n' "$*" >&2; }
start=$(date +%s)

scripts/setup-venv.sh
scripts/ensure-ui.sh; scripts/ensure-browser.sh  # /ui assets; chromium for its test
export PATH="$here/.venv/bin:$PATH"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

log "ruff (lint + format check)"
ruff check .
ruff format --check .
log "mypy"
mypy

scripts/ensure-docker.sh
scripts/ensure-tmux.sh
sandbox-image/build.sh
# The second, swarm-mode engine for the Swarm tests (issue 20); stopped again at the end if
# this run started it (its data stays in /var/lib/twistedgw-swarm for the next run).
swarm_started=no
[ -s /run/twistedgw-swarm/dockerd.pid ] && kill -0 "$(cat /run/twistedgw-swarm/dockerd.pid)" 2>/dev/null \
    || swarm_started=yes
scripts/ensure-swarm.sh

workers=${TEST_WORKERS:-4}
parallel=()
[ "$workers" -gt 0 ] && parallel=(-n "$workers" --dist loadfile)
set +e
log "pytest, phase 1: all but the serial tests (${workers} workers)"
python -m pytest "${parallel[@]}" --serial=skip "$@"
rc1=$?
log "pytest, phase 2: the serial tests, one at a time"
python -m pytest --serial=only "$@"
rc2=$?
set -e
# 5 = no test selected: fine for one phase (e.g. arguments naming only fast tests), not both.
if [ $rc1 -eq 5 ] && [ $rc2 -eq 5 ]; then
    rc=5
elif [ $rc1 -ne 0 ] && [ $rc1 -ne 5 ]; then
    rc=$rc1
elif [ $rc2 -ne 0 ] && [ $rc2 -ne 5 ]; then
    rc=$rc2
else
    rc=0
fi
if [ "$swarm_started" = yes ]; then
    scripts/ensure-swarm.sh stop
fi
# The Swarm engine must not have cost the default engine its bridge (issue 20's pitfall).
scripts/check-default-engine.sh || rc=1
log "done in $(( $(date +%s) - start )) s (pytest exit: parallel $rc1, serial $rc2)"
exit $rc
