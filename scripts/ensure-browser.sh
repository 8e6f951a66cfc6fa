#!/usr/bin/env bash
# Make sure Debian's Chromium and its WebDriver are installed (/usr/bin/chromium,
# /usr/bin/chromedriver), for the browser console's integration test. Quick when both are there.
# Packages come from Debian's archive only: no browser download.
set -euo pipefail
log() { printf '[ensure-browser] %s\n' "$*" >&2; }

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || {
    log "ERROR: chromium/chromedriver missing and no apt-get here; install Chromium and its driver"; exit 1; }
sudo=()
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { log "ERROR: run as root (or with sudo) to install chromium"; exit 1; }
    sudo=(sudo)
fi
log "installing chromium and chromium-driver (apt)"
export DEBIAN_FRONTEND=noninteractive
# dpkg's lock may be held by another install on this machine: wait for it rather than fail.
"${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
"${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends \
    chromium chromium-driver >/dev/null
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || {
    log "ERROR: chromium-driver installed but /usr/bin/chromedriver is missing"; exit 1; }
log "chromium ready: $(/usr/bin/chromium --version 2>/dev/null || echo unknown)"
