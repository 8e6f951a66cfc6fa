#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv with the gateway, its client library
# and CLI (the `client` extra) and its test tools.
# Re-installs only when setup.py changed since the last install.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv="${TWISTEDGW_VENV:-$here/.venv}"
log() { printf '[setup-venv] %s\n' "$*" >&2; }

python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
    done
fi
[ -n "$python" ] || { log "ERROR: no python3 found; install Python 3.11"; exit 1; }
"$python" - <<'PY' || { log "ERROR: Python 3.11 or newer is required"; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x "$venv/bin/python" ]; then
    log "creating virtualenv $venv"
    "$python" -m venv "$venv" || {
        log "ERROR: could not create a venv; on Debian: apt-get install python3-venv"; exit 1; }
fi
stamp="$venv/.twistedgw-installed"
want=$(sha256sum "$here/setup.py" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing twistedgw and its dependencies into $venv (pip)"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e "$here[client,test]"
    echo "$want" >"$stamp"
fi
# An editable install does not put the twisted/plugins dropin on twisted.plugins' path (a
# plain `pip install .` copies it there): link it into the venv's twisted/plugins, so
# `twistd sandboxgw` works without PYTHONPATH, and regenerate the dropin cache.
plugins=$("$venv/bin/python" -c 'import os, twisted.plugins; print(os.path.dirname(twisted.plugins.__file__))')
ln -sfn "$here/twisted/plugins/sandboxgw_plugin.py" "$plugins/sandboxgw_plugin.py"
(cd / && env -u PYTHONPATH "$venv/bin/python" -c \
    'from twisted.plugin import IPlugin, getPlugins; import twisted.plugins; list(getPlugins(IPlugin, twisted.plugins))') \
    >/dev/null 2>&1 || true
(cd / && env -u PYTHONPATH "$venv/bin/twistd" sandboxgw --help >/dev/null) \
    || { log "ERROR: twistd does not find the sandboxgw plugin in $venv"; exit 1; }
log "virtualenv ready: $venv"
