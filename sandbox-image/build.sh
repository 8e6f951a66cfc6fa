#!/usr/bin/env bash
# Build the sandbox image (default name: sandbox-websocket-image) and the templates built on it.
#
# Usage: sandbox-image/build.sh [--force | --print-mirror | --print-templates]
#   --force   rebuild even when an image with the current content hash exists, without
#             Docker's layer cache (picks up new Debian packages); the base image is kept
#   --print-mirror  print the Debian mirror and security mirror an offline bootstrap would use
#   --print-templates  print "NAME IMAGE" for each template this script builds, and exit
# Env:
#   SANDBOX_IMAGE   image name/tag to build (default: sandbox-websocket-image)
#   TEMPLATE_IMAGE_PREFIX  a template NAME is built as ${TEMPLATE_IMAGE_PREFIX}NAME
#                   (default: twistedgw-, so the python template is twistedgw-python)
#   SANDBOX_TEMPLATES  space-separated template names to build (default: every directory of
#                   sandbox-image/templates/; "none": only the default image)
#   DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR  Debian mirrors for an offline bootstrap (default:
#                   the host's apt sources that serve bookworm, else deb.debian.org); when
#                   DEBIAN_MIRROR is set, templates' apt also uses it
#
# The image carries the label org.twistedgw.image-hash = sha256 of the files that go into it
# (the whole build context: Dockerfile, supervise, runas.c, spawner.c, agent/*.py, twistedgw/__init__.py,
# twistedgw/protocol.py); when the existing image has the same hash, nothing is rebuilt.  The context is assembled in a
# temporary directory, because Docker cannot COPY the repository's twistedgw/protocol.py from
# outside sandbox-image/; the image gets an EMPTY twistedgw/__init__.py.
#
# Templates: each directory sandbox-image/templates/NAME/ holds a Dockerfile FROM the default
# image (build arg BASE_IMAGE) and is built after it; its hash label is the sha256 of the
# default image's hash and the directory's files, so a template is rebuilt only when it or
# the default image changed.
#
# Base image: debian:bookworm-slim if it is present locally or can be pulled; otherwise a local
# twistedgw-base:bookworm; otherwise one is bootstrapped offline from Debian's package mirror
# with debootstrap (needs root) and imported with `docker import`.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SANDBOX_IMAGE=${SANDBOX_IMAGE:-sandbox-websocket-image}
TEMPLATE_IMAGE_PREFIX=${TEMPLATE_IMAGE_PREFIX-twistedgw-}
TEMPLATES_DIR="$SCRIPT_DIR/templates"
# Only an explicit DEBIAN_MIRROR is handed to templates' apt (see templates/python/Dockerfile).
TEMPLATE_MIRROR=${DEBIAN_MIRROR:-}
OFFICIAL_BASE=debian:bookworm-slim
LOCAL_BASE=twistedgw-base:bookworm
# Where apt's configuration lives (tests point it elsewhere).
APT_ETC=${APT_ETC:-/etc/apt}
HASH_LABEL=org.twistedgw.image-hash
START=$SECONDS

log() { printf '[build-image] [%3ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() { sed -n '2,18s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

# --- Debian mirror ------------------------------------------------------------------------
# "URI SUITE..." for every enabled deb entry of the host's apt sources: one-line *.list files
# and deb822 *.sources files.
apt_source_entries() {
    local f
    for f in "$APT_ETC/sources.list" "$APT_ETC"/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # deb [options] URI SUITE COMPONENTS...
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && NF >= 3 {print $2, $3}'
    done
    for f in "$APT_ETC"/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && enabled != "no" && uris != "" && suites != "") {
                    n = split(uris, u, " ")
                    for (i = 1; i <= n; i++) print u[i], suites
                }
                types = ""; uris = ""; suites = ""; enabled = ""
            }
            /^#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { value = $0 }
            /^[^ \t]/ {
                key = tolower($1); sub(/:.*/, "", key)
                value = $0; sub(/^[^:]*:/, "", value)
            }
            {
                if (key == "types") types = types " " value
                else if (key == "uris") uris = uris " " value
                else if (key == "suites") suites = suites " " value
                else if (key == "enabled") enabled = tolower(value)
                gsub(/^[ \t]+|[ \t]+$/, "", enabled)
            }
            END { flush() }
        ' "$f"
    done
}

# The first http(s) source serving SUITE (e.g. bookworm, bookworm-security), or nothing.
host_mirror_for() {
    apt_source_entries | awk -v want="$1" '
        $1 ~ /^https?:\/\// { for (i = 2; i <= NF; i++) if ($i == want) { sub(/\/+$/, "", $1); print $1; exit } }
    '
}

DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(host_mirror_for bookworm)}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY=${DEBIAN_SECURITY_MIRROR:-$(host_mirror_for bookworm-security)}
DEBIAN_SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}

# The templates to build: SANDBOX_TEMPLATES, or every directory of templates/.
template_names() {
    local d
    if [ -n "${SANDBOX_TEMPLATES+set}" ]; then
        [ "$SANDBOX_TEMPLATES" = none ] || printf '%s\n' $SANDBOX_TEMPLATES
        return 0
    fi
    for d in "$TEMPLATES_DIR"/*/; do
        [ -f "$d/Dockerfile" ] && basename "$d"
    done
    return 0
}

FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --print-mirror) printf '%s\n%s\n' "$DEBIAN_MIRROR" "$DEBIAN_SECURITY"; exit 0 ;;
        --print-templates)
            for name in $(template_names); do printf '%s %s\n' "$name" "$TEMPLATE_IMAGE_PREFIX$name"; done
            exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $arg" ;;
    esac
done

command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info' (start one, e.g. scripts/ensure-docker.sh)"

# --- build context and content hash -------------------------------------------------------
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
CONTEXT=$(mktemp -d "${TMPDIR:-/tmp}/twistedgw-image-context.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT
assemble_context() {
    local f
    [ -f "$SCRIPT_DIR/Dockerfile" ] || die "missing $SCRIPT_DIR/Dockerfile"
    [ -f "$REPO_DIR/twistedgw/protocol.py" ] || die "missing $REPO_DIR/twistedgw/protocol.py"
    cp "$SCRIPT_DIR/Dockerfile" "$CONTEXT/Dockerfile"
    [ -f "$SCRIPT_DIR/supervise" ] || die "missing $SCRIPT_DIR/supervise"
    cp "$SCRIPT_DIR/supervise" "$CONTEXT/supervise"
    chmod 0755 "$CONTEXT/supervise"
    [ -f "$SCRIPT_DIR/runas.c" ] || die "missing $SCRIPT_DIR/runas.c"
    cp "$SCRIPT_DIR/runas.c" "$CONTEXT/runas.c"
    [ -f "$SCRIPT_DIR/spawner.c" ] || die "missing $SCRIPT_DIR/spawner.c"
    cp "$SCRIPT_DIR/spawner.c" "$CONTEXT/spawner.c"
    mkdir -p "$CONTEXT/agent" "$CONTEXT/twistedgw"
    for f in "$SCRIPT_DIR"/agent/*.py; do
        cp "$f" "$CONTEXT/agent/"
    done
    [ -f "$CONTEXT/agent/__main__.py" ] || die "missing $SCRIPT_DIR/agent/__main__.py"
    cp "$REPO_DIR/twistedgw/protocol.py" "$CONTEXT/twistedgw/protocol.py"
    : >"$CONTEXT/twistedgw/__init__.py"
}
# Every file of the context, by relative path, in a stable order: what goes into the image.
hash_inputs() {
    local f
    (cd "$CONTEXT" && find . -type f -print | LC_ALL=C sort) | while read -r f; do
        printf '%s\0' "${f#./}"
        sha256sum <"$CONTEXT/$f" | cut -d' ' -f1
    done
}
assemble_context
IMAGE_HASH=$(hash_inputs | sha256sum | cut -d' ' -f1)
log "content hash $IMAGE_HASH"

image_hash_of() {
    docker image inspect -f "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$1" 2>/dev/null || true
}
DEFAULT_CURRENT=0
if [ "$FORCE" = 0 ]; then
    current=$(image_hash_of "$SANDBOX_IMAGE")
    if [ "$current" = "$IMAGE_HASH" ]; then
        log "image up to date: $SANDBOX_IMAGE"
        DEFAULT_CURRENT=1
    fi
    if [ "$DEFAULT_CURRENT" = 1 ]; then
        :
    elif [ -n "$current" ]; then
        log "image $SANDBOX_IMAGE is stale (hash ${current:0:12}), rebuilding"
    else
        log "image $SANDBOX_IMAGE not found, building"
    fi
else
    log "--force: rebuilding $SANDBOX_IMAGE"
fi

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# --- offline base bootstrap ---------------------------------------------------------------
ROOTFS=""
cleanup_rootfs() {
    [ -n "$ROOTFS" ] && [ -d "$ROOTFS" ] || return 0
    # debootstrap mounts proc/sys inside the target; never rm -rf through a live mount.
    local m
    for m in $(awk -v d="$ROOTFS" 'index($2, d "/") == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    if awk -v d="$ROOTFS" 'index($2, d "/") == 1 {found=1} END {exit !found}' /proc/mounts; then
        log "WARNING: $ROOTFS still has mounts; leaving it in place"
    else
        rm -rf --one-file-system "$ROOTFS"
    fi
    ROOTFS=""
}
cleanup() { cleanup_rootfs; rm -rf "$CONTEXT"; }
trap cleanup EXIT

url_reachable() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 15 "$1" 2>/dev/null
    elif command -v wget >/dev/null 2>&1; then
        wget -q -O /dev/null --timeout=15 "$1" 2>/dev/null
    else
        return 1
    fi
}

bootstrap_base() {
    local t0=$SECONDS
    [ "$(id -u)" = 0 ] || die "no base image available and bootstrapping one with debootstrap needs root; run this script as root (or load $OFFICIAL_BASE / $LOCAL_BASE into Docker)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || die "debootstrap is missing and apt-get is not available to install it"
        log "installing debootstrap with apt-get"
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
            || die "apt-get install debootstrap failed"
    fi
    ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/twistedgw-rootfs.XXXXXX")
    log "bootstrapping bookworm (minbase) into $ROOTFS from $DEBIAN_MIRROR (takes a minute or two)"
    local dblog="$ROOTFS.log"
    # python3-ply is named because debootstrap does not resolve virtual packages and
    # python3-autobahn (installed later by apt in the Dockerfile) needs it.
    if ! timeout 1200 debootstrap --variant=minbase --include=python3,python3-ply \
            bookworm "$ROOTFS" "$DEBIAN_MIRROR" >"$dblog" 2>&1; then
        tail -n 30 "$dblog" >&2 || true
        die "debootstrap failed (full log: $dblog)"
    fi
    rm -f "$dblog"
    log "debootstrap done in $((SECONDS - t0))s"

    # A sane apt configuration for `apt-get install` in the Dockerfile: bookworm main, plus
    # updates and security when the mirror serves them.
    {
        echo "deb $DEBIAN_MIRROR bookworm main"
        if url_reachable "$DEBIAN_MIRROR/dists/bookworm-updates/Release"; then
            echo "deb $DEBIAN_MIRROR bookworm-updates main"
        fi
        if url_reachable "$DEBIAN_SECURITY/dists/bookworm-security/Release"; then
            echo "deb $DEBIAN_SECURITY bookworm-security main"
        fi
    } >"$ROOTFS/etc/apt/sources.list"
    log "apt sources: $(paste -sd';' "$ROOTFS/etc/apt/sources.list")"
    # Leftovers that do not belong in an image.
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb \
        "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* 2>/dev/null || true
    mkdir -p "$ROOTFS/var/lib/apt/lists/partial"
    echo "sandbox" >"$ROOTFS/etc/hostname"

    local t1=$SECONDS
    log "importing rootfs as $LOCAL_BASE"
    tar --numeric-owner -C "$ROOTFS" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "twistedgw: debootstrap --variant=minbase bookworm" \
        - "$LOCAL_BASE" >/dev/null || die "docker import of $LOCAL_BASE failed"
    cleanup_rootfs
    log "imported $LOCAL_BASE in $((SECONDS - t1))s (bootstrap total $((SECONDS - t0))s)"
}

build_default() {
    # --- choose the base ----------------------------------------------------------------------
    BASE=""
    if image_exists "$OFFICIAL_BASE"; then
        BASE=$OFFICIAL_BASE
        log "base: $OFFICIAL_BASE (present locally)"
    else
        log "trying to pull $OFFICIAL_BASE (60s limit)"
        if timeout 60 docker pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
            BASE=$OFFICIAL_BASE
            log "base: $OFFICIAL_BASE (pulled)"
        elif image_exists "$LOCAL_BASE"; then
            BASE=$LOCAL_BASE
            log "pull failed; base: $LOCAL_BASE (present locally)"
        else
            log "pull failed and $LOCAL_BASE is missing; bootstrapping it offline"
            bootstrap_base
            BASE=$LOCAL_BASE
        fi
    fi

    # --- build --------------------------------------------------------------------------------
    old_id=$(docker image inspect -f '{{ .Id }}' "$SANDBOX_IMAGE" 2>/dev/null || true)
    t_build=$SECONDS
    build_opts=()
    [ "$FORCE" = 1 ] && build_opts+=(--no-cache)
    log "docker build ${build_opts[*]:+${build_opts[*]} }-t $SANDBOX_IMAGE (base $BASE)"
    if ! docker build "${build_opts[@]}" \
            --build-arg "BASE=$BASE" \
            --build-arg "IMAGE_HASH=$IMAGE_HASH" \
            -t "$SANDBOX_IMAGE" "$CONTEXT" >&2; then
        die "docker build of $SANDBOX_IMAGE failed (see the output above)"
    fi
    new_id=$(docker image inspect -f '{{ .Id }}' "$SANDBOX_IMAGE" 2>/dev/null || true)
    # Drop the image this build replaced, if nothing else uses it (no tag left, no container).
    if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ] \
            && [ "$(docker image inspect -f '{{ len .RepoTags }}' "$old_id" 2>/dev/null)" = 0 ]; then
        docker image rm "$old_id" >/dev/null 2>&1 && log "removed the previous image ${old_id:7:12}" || true
    fi
    size=$(docker image inspect -f '{{ .Size }}' "$SANDBOX_IMAGE" 2>/dev/null || echo 0)
    log "built $SANDBOX_IMAGE in $((SECONDS - t_build))s ($((size / 1024 / 1024)) MiB, hash ${IMAGE_HASH:0:12})"
}

[ "$DEFAULT_CURRENT" = 1 ] || build_default

# --- templates ----------------------------------------------------------------------------
# Build templates/NAME/ as ${TEMPLATE_IMAGE_PREFIX}NAME, FROM the image just checked or built.
build_template() {
    local name=$1 dir="$TEMPLATES_DIR/$1" image="$TEMPLATE_IMAGE_PREFIX$1" hash current f
    [ -f "$dir/Dockerfile" ] || die "template $name: missing $dir/Dockerfile"
    # Hashed as a stream (NUL separators and all): a command substitution would drop the NULs.
    hash=$(
        {
            printf 'base\0%s\n' "$IMAGE_HASH"
            (cd "$dir" && find . -type f -print | LC_ALL=C sort) | while read -r f; do
                printf '%s\0' "${f#./}"
                sha256sum <"$dir/$f" | cut -d' ' -f1
            done
        } | sha256sum | cut -d' ' -f1
    )
    if [ "$FORCE" = 0 ]; then
        current=$(image_hash_of "$image")
        if [ "$current" = "$hash" ]; then
            log "template $name up to date: $image"
            return 0
        fi
        log "template $name: ${current:+image $image is stale, re}building $image"
    fi
    local opts=() old_id new_id size t0=$SECONDS
    [ "$FORCE" = 1 ] && opts+=(--no-cache)
    [ -n "$TEMPLATE_MIRROR" ] && opts+=(--build-arg "DEBIAN_MIRROR=$TEMPLATE_MIRROR")
    old_id=$(docker image inspect -f '{{ .Id }}' "$image" 2>/dev/null || true)
    log "docker build -t $image (template $name, FROM $SANDBOX_IMAGE)"
    if ! docker build "${opts[@]}" \
            --build-arg "BASE_IMAGE=$SANDBOX_IMAGE" \
            --build-arg "IMAGE_HASH=$hash" \
            -t "$image" "$dir" >&2; then
        die "docker build of template $name ($image) failed (see the output above)"
    fi
    new_id=$(docker image inspect -f '{{ .Id }}' "$image" 2>/dev/null || true)
    if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ] \
            && [ "$(docker image inspect -f '{{ len .RepoTags }}' "$old_id" 2>/dev/null)" = 0 ]; then
        docker image rm "$old_id" >/dev/null 2>&1 && log "removed the previous image ${old_id:7:12}" || true
    fi
    size=$(docker image inspect -f '{{ .Size }}' "$image" 2>/dev/null || echo 0)
    log "built template $name as $image in $((SECONDS - t0))s ($((size / 1024 / 1024)) MiB, hash ${hash:0:12})"
}
for template in $(template_names); do
    [[ "$template" =~ ^[a-z0-9][a-z0-9_.-]*$ ]] || die "template name $template: use a-z, 0-9, '.', '_', '-'"
    build_template "$template"
done
log "done"
