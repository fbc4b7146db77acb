#!/usr/bin/env bash
# The project's test command: install (pinned), lint, then the whole test suite.
# CI (.ci/run) calls exactly this. Slow end-to-end cases run trimmed when MSIF_TRIM=1.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # shared 2-core machines: more threads thrash
export MSIF_TRIM="${MSIF_TRIM:-1}"
export MSIF_CACHE="${MSIF_CACHE:-$PWD/.msif-cache}"
ruff check .
ruff format --check .
python -m pytest -q "$@"
