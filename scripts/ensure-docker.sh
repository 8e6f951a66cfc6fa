#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`.
# If none does: install docker.io from Debian (as root) when dockerd is missing, then start
# dockerd in the background and wait for it. Prints what it does; exits non-zero with a clear
# message (never hangs) when it cannot.
set -euo pipefail

log() { printf '[ensure-docker] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if docker info >/dev/null 2>&1; then
    log "Docker engine is reachable."
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "no Docker engine is reachable and dockerd is not installed; run as root to install docker.io, or start Docker yourself."
    command -v apt-get >/dev/null 2>&1 || die "dockerd is missing and apt-get is not available to install it."
    log "Installing docker.io from Debian (apt-get)..."
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq || die "apt-get update failed"
    timeout 900 apt-get install -y -qq docker.io >/dev/null || die "apt-get install docker.io failed"
fi

[ "$(id -u)" = 0 ] || die "no Docker engine is reachable; start dockerd (needs root) or add yourself to the docker group."

logfile=${DOCKERD_LOG:-/var/log/twistedgw-dockerd.log}
log "Starting dockerd in the background (log: $logfile)..."
# setsid: dockerd outlives this script and is not killed with the caller's process group.
# --live-restore: containers (sandboxes) keep running while the engine restarts.
setsid dockerd --live-restore >>"$logfile" 2>&1 </dev/null &
pid=$!
echo "$pid" >/run/twistedgw-dockerd.pid 2>/dev/null || true

for _ in $(seq 1 120); do
    if docker info >/dev/null 2>&1; then
        log "Docker engine is up (dockerd pid $pid)."
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        tail -n 20 "$logfile" >&2 || true
        die "dockerd exited during start-up; see $logfile"
    fi
    sleep 0.5
done
tail -n 20 "$logfile" >&2 || true
die "dockerd did not answer within 60 s; see $logfile"
