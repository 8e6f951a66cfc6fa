#!/usr/bin/env bash
# ./tests/run.sh [pytest args...]
#
# The whole test suite on this machine: sets up the venv, starts a Docker engine if none runs,
# builds the sandbox image and its templates (python) if missing or stale, runs ruff and mypy,
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
sandbox-image/build.sh

log "pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
log "done in $(( $(date +%s) - start )) s (pytest exit $rc)"
exit $rc
