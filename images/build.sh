#!/usr/bin/env bash
# Build the msif component image locally, either variant of images/Dockerfile:
#   images/build.sh cpu [TAG]   # default TAG msif:cpu; Debian bookworm + the CPU torch wheel
#   images/build.sh gpu [TAG]   # default TAG msif:gpu; FROM pytorch/pytorch (CUDA), needs a registry
# It talks to whatever daemon the docker client finds: point it at a private one with
#   eval "export $(images/dockerd.sh start /path/with/room)"   # sets DOCKER_HOST=unix://...
# It starts no daemon itself. For cpu it first makes the Debian base image CPU_BASE_IMAGE
# (default msif-base:bookworm) when the daemon lacks it: debootstrap --variant=minbase
# bookworm, then docker import (needs root and debootstrap; ~35 s). Environment:
#   DOCKER        docker client (default: the first `docker` on PATH with buildx, or a
#                 20.10-22.x client, which has BuildKit built in)
#   PIP_CERT_FILE CA bundle pip needs inside the build (default: pip's `cert` setting, else
#                 /etc/ssl/certs/ca-certificates.crt); passed as a build secret, in no layer
#   TORCH_WHEEL   the CPU torch wheel (default: the torch-2.13.0+cpu wheel in pip's find-links)
#   BASE_IMAGE    the GPU base (default: the Dockerfile's pinned pytorch/pytorch tag)
set -euo pipefail

variant=${1:-}
[[ $variant == cpu || $variant == gpu ]] || { echo "usage: $0 cpu|gpu [TAG]" >&2; exit 2; }
tag=${2:-msif:$variant}
root=$(cd "$(dirname "$0")/.." && pwd)
# A client that can run a BuildKit build: one with the buildx plugin, or a pre-23 client with
# BuildKit built in (Debian's docker.io 20.10); a 23+ client without buildx cannot.
pick_client() {
    local c v
    for c in $(type -ap docker); do
        if "$c" buildx version >/dev/null 2>&1; then echo "$c"; return; fi
        v=$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true)
        if [[ ${v%%.*} =~ ^[0-9]+$ ]] && (( ${v%%.*} < 23 )); then echo "$c"; return; fi
    done
    echo "no docker client with BuildKit: install buildx or Debian's docker.io (set DOCKER)" >&2
    exit 1
}
docker=${DOCKER:-$(pick_client)}
cpu_base=${CPU_BASE_IMAGE:-msif-base:bookworm}
wheel_name=torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl

cert=${PIP_CERT_FILE:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
cert=${cert:-/etc/ssl/certs/ca-certificates.crt}
[[ -r $cert ]] || { echo "CA bundle $cert is not readable (set PIP_CERT_FILE)" >&2; exit 1; }

args=(--build-arg "VARIANT=$variant")
if [[ $variant == cpu ]]; then
    if ! "$docker" image inspect "$cpu_base" >/dev/null 2>&1; then
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        echo "making $cpu_base with debootstrap" >&2
        debootstrap --variant=minbase bookworm "$tmp/root" >&2
        rm -rf "$tmp"/root/var/cache/apt/archives/*.deb "$tmp"/root/var/lib/apt/lists/*
        tar -C "$tmp/root" -c . | "$docker" import - "$cpu_base"
        rm -rf "$tmp"
    fi
    wheel=${TORCH_WHEEL:-}
    if [[ -z $wheel ]]; then
        links=$(python3 -m pip config get global.find-links 2>/dev/null || echo /opt/wheels)
        wheel=$links/$wheel_name
    fi
    [[ -r $wheel ]] || { echo "CPU torch wheel $wheel not found (set TORCH_WHEEL)" >&2; exit 1; }
    mkdir -p "$root/images/wheels"
    rm -f "$root/images/wheels/"*.whl
    ln "$wheel" "$root/images/wheels/$wheel_name" 2>/dev/null || cp "$wheel" "$root/images/wheels/$wheel_name"
    args+=(--build-arg "CPU_BASE_IMAGE=$cpu_base")
elif [[ -n ${BASE_IMAGE:-} ]]; then
    args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi

start=$(date +%s)
DOCKER_BUILDKIT=1 "$docker" build --network host -f "$root/images/Dockerfile" \
    --secret "id=pip_cert,src=$cert" "${args[@]}" -t "$tag" "$root"
echo "built $tag in $(( $(date +%s) - start )) s," \
    "$("$docker" image inspect --format '{{.Size}}' "$tag") bytes" >&2
