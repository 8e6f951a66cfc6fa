#!/usr/bin/env bash
# A second Docker engine in swarm mode, beside the default one, for --backend swarm and its
# tests. Idempotent: `ensure-swarm.sh` (start, or check it is up), `ensure-swarm.sh stop`
# (stop only the dockerd this script started, by its pid file; its data stays), and
# `ensure-swarm.sh purge` (stop, then remove its data-root and its bridge).
#
# It must never disturb the default engine (/var/run/docker.sock, --live-restore, docker0,
# 172.17.0.0/16), which other work uses at the same time. So it has its own everything:
#   --data-root, --exec-root, --pidfile, a Unix socket only (no TCP), its own containerd
#   namespaces, an empty config file (never /etc/docker/daemon.json), no live-restore
#   (swarm refuses it), its own bridge `tgwswarm0` (10.213.0.1/24, created here),
#   `docker_gwbridge` made here before `swarm init` on 10.213.128.0/24 (Docker's documented
#   way to choose its subnet), swarm networks in 10.214.0.0/16 (`swarm init
#   --default-addr-pool`), and --iptables=false: with iptables on, two engines would rewrite
#   the same DOCKER chains.
#
#   NEVER give this dockerd `--bridge none` or `--default-address-pool`: dockerd deletes the
#   link named `docker0` (the default engine's!) at start-up with the first, and at every
#   restart with the second when live-restore is off (moby daemon_unix.go,
#   removeDefaultBridgeInterface; it happened here on 2026-11-26). The script checks that
#   docker0 survived every start and fails loudly if not.
#   The cost: its containers get no NAT to the outside (the gateway reaches agents over Unix
#   sockets in volumes, never over the network) and no inter-bridge isolation rules.
#   --no-new-privileges: a service spec (API 1.41) cannot ask for it per container, so the
#   engine sets it for every container (SECURITY.md, the Swarm table).
set -euo pipefail

log() { printf '[ensure-swarm] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

run_dir=${SWARM_RUN_DIR:-/run/twistedgw-swarm}
data_root=${SWARM_DATA_ROOT:-/var/lib/twistedgw-swarm}
sock="$run_dir/docker.sock"
pidfile="$run_dir/dockerd.pid"
logfile=${SWARM_DOCKERD_LOG:-/var/log/twistedgw-swarm-dockerd.log}
bridge=tgwswarm0
bridge_cidr=10.213.0.1/24
image=${SANDBOX_IMAGE:-sandbox-websocket-image}
swarm=(docker -H "unix://$sock")

running() { [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

stop() {
    if running; then
        pid=$(cat "$pidfile")
        log "stopping the swarm engine (dockerd pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then die "dockerd $pid did not stop within 20 s"; fi
    else
        log "the swarm engine is not running"
    fi
}

case "${1:-start}" in
    stop) stop; exit 0 ;;
    purge)
        stop
        # Only our own: the data-root and exec-root of this engine and its bridge.
        # Anything still mounted under them (task volumes, network namespaces) first.
        { findmnt -rn -o TARGET | grep -E "^($data_root|$run_dir)/" || true; } | sort -r \
            | while read -r target; do umount -l "$target" || true; done
        rm -rf --one-file-system "$data_root" "$run_dir"
        if ip link show "$bridge" >/dev/null 2>&1; then ip link delete "$bridge"; fi
        # docker_gwbridge too, but only ours (its address in our range).
        if ip -4 addr show docker_gwbridge 2>/dev/null | grep -q "inet 10\.213\.128\."; then
            ip link delete docker_gwbridge
        fi
        exit 0 ;;
    start) ;;
    *) die "usage: $0 [start|stop|purge]" ;;
esac

[ "$(id -u)" = 0 ] || die "needs root (it starts a dockerd)"
command -v dockerd >/dev/null 2>&1 || die "dockerd is missing; run scripts/ensure-docker.sh first"
ip link show docker0 >/dev/null 2>&1 || log "warning: the default engine's docker0 is missing (not ours to fix)"

had_docker0=no
ip link show docker0 >/dev/null 2>&1 && had_docker0=yes
if ! running; then
    mkdir -p "$run_dir" "$data_root"
    if ! ip link show "$bridge" >/dev/null 2>&1; then
        log "creating bridge $bridge ($bridge_cidr)"
        ip link add "$bridge" type bridge
        ip addr add "$bridge_cidr" dev "$bridge"
    fi
    ip link set "$bridge" up
    echo '{}' >"$run_dir/daemon.json"
    log "starting the swarm engine on $sock (log: $logfile)"
    setsid dockerd \
        --config-file "$run_dir/daemon.json" \
        --data-root "$data_root" \
        --exec-root "$run_dir/exec" \
        --pidfile "$pidfile" \
        -H "unix://$sock" \
        --containerd-namespace twistedgw-swarm \
        --containerd-plugins-namespace twistedgw-swarm-plugins \
        --bridge "$bridge" \
        --iptables=false --ip-masq=false \
        --no-new-privileges \
        >>"$logfile" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        "${swarm[@]}" info >/dev/null 2>&1 && break
        sleep 0.5
    done
    "${swarm[@]}" info >/dev/null 2>&1 || { tail -n 20 "$logfile" >&2; die "the swarm engine did not answer within 60 s"; }
    if [ "$had_docker0" = yes ] && ! ip link show docker0 >/dev/null 2>&1; then
        die "docker0 of the default engine vanished while this engine started: every published port of the default engine is down. Repair: ip link add docker0 type bridge; ip addr add 172.17.0.1/16 dev docker0; ip link set docker0 up; then 'ip link set <veth> master docker0' for each veth without a master"
    fi
fi

state=$("${swarm[@]}" info --format '{{.Swarm.LocalNodeState}}')
if [ "$state" != active ]; then
    if ! "${swarm[@]}" network inspect docker_gwbridge >/dev/null 2>&1; then
        log "creating docker_gwbridge on 10.213.128.0/24 (before swarm init picks a subnet)"
        "${swarm[@]}" network create --subnet 10.213.128.0/24 \
            --opt com.docker.network.bridge.name=docker_gwbridge \
            --opt com.docker.network.bridge.enable_icc=false \
            --opt com.docker.network.bridge.enable_ip_masquerade=false \
            docker_gwbridge >/dev/null
    fi
    log "docker swarm init (advertise 127.0.0.1, pools 10.214.0.0/16)"
    "${swarm[@]}" swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 \
        --default-addr-pool 10.214.0.0/16 --default-addr-pool-mask-length 24 >/dev/null
fi

want=$(docker -H unix:///var/run/docker.sock image inspect "$image" --format '{{.Id}}' 2>/dev/null || true)
have=$("${swarm[@]}" image inspect "$image" --format '{{.Id}}' 2>/dev/null || true)
if [ -n "$want" ] && [ "$want" != "$have" ]; then
    log "loading $image from the default engine"
    docker -H unix:///var/run/docker.sock save "$image" | "${swarm[@]}" load >/dev/null
elif [ -z "$want" ] && [ -z "$have" ]; then
    log "warning: $image is in neither engine (build it with sandbox-image/build.sh)"
fi
log "swarm engine ready: DOCKER_HOST=unix://$sock"
