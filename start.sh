#!/usr/bin/env bash
# ./start.sh [PORT] [twistd sandboxgw options...]
#
# Sets up everything the gateway needs on this machine (Python venv, a running Docker engine,
# the sandbox image, built offline if no registry is reachable, and the templates built on it),
# then runs the gateway in the foreground on PORT (default 8003), serving each template built
# (`python`: --template python=twistedgw-python). Extra arguments go to `twistd sandboxgw`
# (see --help); a --template NAME=... among them replaces the built NAME.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
log() { printf '[start] %s\n' "$*" >&2; }

port=8003
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
    port=$1
    shift
fi
if [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    log "ERROR: port $port is not a TCP port number"; exit 2
fi

log "step 1/3: Python virtualenv"
scripts/setup-venv.sh
scripts/ensure-ui.sh  # the browser console's npm assets (/ui)
log "step 2/3: Docker engine"
scripts/ensure-docker.sh
log "step 3/3: sandbox image and templates"
PATH="$here/.venv/bin:$PATH" sandbox-image/build.sh

# The templates build.sh made, unless the arguments declare one of the same name.
templates=()
while read -r name image; do
    [ -n "$name" ] || continue
    if [[ " $* " == *" --template $name="* || " $* " == *" --template=$name="* ]]; then
        continue
    fi
    templates+=(--template "$name=$image")
done < <(sandbox-image/build.sh --print-templates)

log "starting the gateway on port $port (Ctrl-C stops it; sandboxes are kept)"
if [ -z "${TWISTEDGW_TOKENS:-}" ] && [[ " $* " != *" --tokens-file"* ]]; then
    if [[ " $* " == *" --insecure-no-auth "* ]]; then
        log "WARNING: no API tokens and --insecure-no-auth: anyone who reaches port $port drives sandboxes"
    else
        log "no API tokens: listening on 127.0.0.1 only (give --tokens-file, or --insecure-no-auth for all interfaces)"
    fi
fi
log "image: ${SANDBOX_IMAGE:-sandbox-websocket-image}; templates: ${templates[*]:-none}"
exec "$here/.venv/bin/twistd" --nodaemon --pidfile= sandboxgw --port "tcp:$port" \
    ${SANDBOX_IMAGE:+--image "$SANDBOX_IMAGE"} "${templates[@]}" "$@"
