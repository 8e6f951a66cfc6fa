#!/usr/bin/env bash
# Check that the DEFAULT Docker engine (/var/run/docker.sock) still serves published ports:
# `docker0` exists, and a container started with a port published on 127.0.0.1 answers there.
# Run before and after anything that starts a second engine (scripts/ensure-swarm.sh): a
# second dockerd once deleted docker0 and every published port of the default engine died.
# The probe container is named twistedgw-engine-probe-<pid> and removed by that name.
set -euo pipefail

log() { printf '[check-default-engine] %s\n' "$*" >&2; }
image=${SANDBOX_IMAGE:-sandbox-websocket-image}
name="twistedgw-engine-probe-$$"

ip link show docker0 >/dev/null 2>&1 || { log "FAIL: docker0 is missing"; exit 1; }
cleanup() { docker -H unix:///var/run/docker.sock rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
docker -H unix:///var/run/docker.sock run -d --name "$name" -p 127.0.0.1::8000 \
    --entrypoint python3 "$image" -m http.server 8000 >/dev/null
port=$(docker -H unix:///var/run/docker.sock port "$name" 8000/tcp | head -n1 | sed 's/.*://')
for _ in $(seq 1 50); do
    if python3 -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=2)" 2>/dev/null; then
        log "OK: docker0 present, a published port (127.0.0.1:$port) answers"
        exit 0
    fi
    sleep 0.2
done
log "FAIL: the published port 127.0.0.1:$port of the default engine does not answer"
exit 1
