#!/usr/bin/env bash
# Install the test tools that are missing: tmux, for the CLI's `shell` test
# (tests/integration/test_cli_shell.py drives the CLI in a real terminal with tmux send-keys
# and capture-pane), and jq, for the README's `--log-format json | jq` example and the files
# example (tests/integration/test_readme.py). Debian (root): apt.
set -euo pipefail
log() { printf '[ensure-tmux] %s\n' "$*" >&2; }
missing=()
for tool in tmux jq; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null 2>&1 || { log "ERROR: ${missing[*]} missing and there is no apt-get; install them"; exit 1; }
log "installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || true
apt-get install -y -qq "${missing[@]}" >/dev/null
for tool in "${missing[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || { log "ERROR: $tool did not install"; exit 1; }
done
