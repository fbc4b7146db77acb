#!/usr/bin/env bash
# A private Docker daemon for building and running the msif image on a machine without
# systemd, a bridge or a registry (docs/design §6): vfs storage, no bridge, no iptables,
# its data root, exec root, socket and pidfile all under DIR.
#   images/dockerd.sh start DIR   # prints the DOCKER_HOST to export
#   images/dockerd.sh stop DIR
#   images/dockerd.sh status DIR
# Containers and builds then need host networking (--network host). Needs root and dockerd
# (Debian: apt-get install docker.io). vfs copies every layer: put DIR on a disk with room.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
sock="$dir/docker.sock"
pidfile="$dir/dockerd.pid"
host="unix://$sock"

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "$action" in
start)
    if running; then
        echo "DOCKER_HOST=$host"
        exit 0
    fi
    mkdir -p "$dir/data" "$dir/exec"
    dockerd --storage-driver=vfs --bridge=none --iptables=false --ip-masq=false \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$pidfile" \
        -H "$host" >"$dir/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
        if DOCKER_HOST=$host docker version >/dev/null 2>&1; then
            echo "DOCKER_HOST=$host"
            exit 0
        fi
        sleep 0.5
    done
    echo "dockerd did not answer on $sock within 30 s; see $dir/dockerd.log" >&2
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
    echo "stopped"
    ;;
status)
    if running; then echo "running pid $(cat "$pidfile") DOCKER_HOST=$host"; else echo "stopped"; exit 1; fi
    ;;
*) usage ;;
esac
