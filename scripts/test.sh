#!/usr/bin/env bash
# The project's test command: install (pinned), lint, start what the tests need, run the whole
# test suite, stop what it started. CI (.ci/run) calls exactly this. Slow end-to-end cases run
# trimmed when MSIF_TRIM=1.
#
# Containers: the image tests (tests/deploy/test_image_docker.py) need a docker daemon that
# holds the CPU component image. With DOCKER_HOST set, that daemon is used. Otherwise, as
# root (CI), Debian's docker.io and debootstrap are installed with apt, a private daemon is
# started under $MSIF_DOCKER_DIR (default .docker/, overlay2 where the disk takes it) and
# stopped when the tests end. Either way msif:cpu is built (images/build.sh; layers are
# cached) and a missing daemon fails the docker tests instead of skipping them.
# MSIF_DOCKER=0 leaves docker out: those tests then skip.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # shared 2-core machines: more threads thrash
export MSIF_TRIM="${MSIF_TRIM:-1}"
export MSIF_CACHE="${MSIF_CACHE:-$PWD/.msif-cache}"
ruff check .
ruff format --check .

start_docker() {
    local t=$SECONDS dir=${MSIF_DOCKER_DIR:-$PWD/.docker}
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q docker.io debootstrap >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q docker.io debootstrap >/dev/null; }
        echo "test.sh: installed docker.io and debootstrap in $(( SECONDS - t )) s" >&2
    fi
    t=$SECONDS
    local line
    line=$(bash images/dockerd.sh start "$dir")
    export "${line?}"
    trap 'bash images/dockerd.sh stop "'"$dir"'" >/dev/null' EXIT
    echo "test.sh: dockerd started in $(( SECONDS - t )) s ($DOCKER_HOST)" >&2
}

if [[ ${MSIF_DOCKER:-1} != 0 ]]; then
    if [[ -z ${DOCKER_HOST:-} && $(id -u) == 0 ]]; then
        start_docker
    fi
    if [[ -n ${DOCKER_HOST:-} ]]; then
        t=$SECONDS
        build_log=$(mktemp)
        bash images/build.sh cpu "${MSIF_TEST_IMAGE:-msif:cpu}" >"$build_log" 2>&1 \
            || { tail -n 40 "$build_log" >&2; echo "test.sh: the image build failed" >&2; exit 1; }
        tail -n 1 "$build_log" >&2  # built TAG in N s, SIZE bytes
        rm -f "$build_log"
        echo "test.sh: image ${MSIF_TEST_IMAGE:-msif:cpu} built in $(( SECONDS - t )) s" >&2
        export MSIF_REQUIRE_DOCKER=1
    else
        echo "test.sh: no DOCKER_HOST and not root: the docker tests will skip" >&2
    fi
fi
t=$SECONDS
python -m pytest -q "$@"
echo "test.sh: tests took $(( SECONDS - t )) s" >&2
