#!/usr/bin/env bash
# A private Docker daemon for building and running the msif image on a machine without
# systemd, a bridge or a registry (docs/design §6): no bridge, no iptables, its data root,
# exec root, socket and pidfile all under DIR. Storage: overlay2 where DIR's file system
# takes it (ext4, xfs: containers then start in about a second), else vfs, which copies the
# whole image for every container (about a minute for msif:cpu); DOCKER_STORAGE_DRIVER
# forces one.
#   images/dockerd.sh start DIR   # prints the DOCKER_HOST to export
#   images/dockerd.sh stop DIR
#   images/dockerd.sh status DIR
# Containers and builds then need host networking (--network host). Needs root and dockerd
# (Debian: apt-get install docker.io). Put DIR on a disk with room (msif:cpu takes ~2 GB).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
sock="$dir/docker.sock"
pidfile="$dir/dockerd.pid"
host="unix://$sock"

# Start dockerd with one storage driver; true once it answers, false once it has exited or
# stayed silent for 30 s (then it is stopped).
start_daemon() {
    dockerd --storage-driver="$1" --bridge=none --iptables=false --ip-masq=false \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$pidfile" \
        -H "$host" >>"$dir/dockerd.log" 2>&1 &
    local pid=$!
    for _ in $(seq 60); do
        if DOCKER_HOST=$host docker version >/dev/null 2>&1; then return 0; fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.5
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
}

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "$action" in
start)
    if running; then
        echo "DOCKER_HOST=$host"
        exit 0
    fi
    mkdir -p "$dir/data" "$dir/exec"
    drivers=${DOCKER_STORAGE_DRIVER:-overlay2 vfs}
    for driver in $drivers; do
        if start_daemon "$driver"; then
            echo "DOCKER_HOST=$host"
            exit 0
        fi
        echo "dockerd with storage driver $driver did not start; see $dir/dockerd.log" >&2
    done
    exit 1
    ;;
stop)
    if running; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "dockerd $pid still running after 30 s" >&2
            exit 1
        fi
    fi
    # dockerd leaves its network namespace mounted (exec/netns/default): without this a
    # checkout holding DIR could not be deleted.
    for m in "$dir"/exec/netns/*; do
        if mountpoint -q "$m" 2>/dev/null; then umount "$m" || true; fi
    done
    echo "stopped"
    ;;
status)
    if running; then echo "running pid $(cat "$pidfile") DOCKER_HOST=$host"; else echo "stopped"; exit 1; fi
    ;;
*) usage ;;
esac
