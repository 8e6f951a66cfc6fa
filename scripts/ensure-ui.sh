#!/usr/bin/env bash
# Install the browser console's npm assets (xterm.js and its fit add-on) into
# twistedgw/web/ui/node_modules with `npm ci`, pinned by twistedgw/web/ui/package-lock.json.
# Idempotent and quick: does nothing when node_modules was installed from the current lockfile.
# Without node/npm it only warns: the gateway runs without the console (/ui says how to fix it).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
ui="$here/twistedgw/web/ui"
log() { printf '[ensure-ui] %s\n' "$*" >&2; }

stamp="$ui/node_modules/.twistedgw-lock-sha256"
want=$(sha256sum "$ui/package-lock.json" | cut -d' ' -f1)
if [ -d "$ui/node_modules" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    log "WARNING: npm not found: the browser console (/ui) is unavailable; on Debian: apt-get install npm"
    [ "${TWISTEDGW_REQUIRE_UI:-}" = 1 ] && exit 1
    exit 0
fi
log "installing the browser console's assets (npm ci in twistedgw/web/ui)"
(cd "$ui" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null)
echo "$want" >"$stamp"
log "browser console assets ready"
