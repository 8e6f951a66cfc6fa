#!/usr/bin/env bash
# Install tmux if it is missing: the CLI's `shell` test (tests/integration/test_cli_shell.py)
# drives the CLI in a real terminal with tmux send-keys and capture-pane. Debian (root): apt.
set -euo pipefail
log() { printf '[ensure-tmux] %s\n' "$*" >&2; }
command -v tmux >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 || { log "ERROR: tmux is missing and there is no apt-get; install tmux"; exit 1; }
log "installing tmux (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || true
apt-get install -y -qq tmux >/dev/null
command -v tmux >/dev/null 2>&1 || { log "ERROR: tmux did not install"; exit 1; }
