#!/usr/bin/env bash
# ./tests/run.sh [pytest args...]
#
# The whole test suite on this machine: sets up the venv, starts a Docker engine if none runs,
# installs tmux if missing (the CLI shell test), builds the sandbox image and its templates
# (python) if missing or stale, starts a second, swarm-mode engine for the Swarm tests
# (scripts/ensure-swarm.sh), runs ruff and mypy,
# then pytest (fast in-memory tests and integration tests against the real engine and images,
# on loopback). SANDBOX_IMAGE and TEMPLATE_IMAGE_PREFIX name other images (build.sh).
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

log "pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$swarm_started" = yes ]; then
    scripts/ensure-swarm.sh stop
fi
scripts/check-default-engine.sh || rc=1
log "done in $(( $(date +%s) - start )) s (pytest exit $rc)"
exit $rc
