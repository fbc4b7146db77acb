#!/usr/bin/env bash
# The prepared GPU check of issue 16, one command (DEVELOPERS.md, "The GPU check"):
#
#   bash benchmarks/gpu.sh [benchmarks.gpu options]     # from anywhere; < 8 min on an H100/H200
#
# It installs nothing and reaches no network: it runs this checkout's msif (PYTHONPATH=src)
# with the machine's python3, which must hold torch with CUDA and transformers (the device
# machines' image does). Results go to $OUT when set (the device tool's folder that comes
# back), else ./gpu-results: gpu-results.json (rewritten after every section) and
# gpu-check.log (everything printed). GPU_CHECK_TIMEOUT (seconds, default 450) bounds the run.
set -euo pipefail

cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-gpu-results}
mkdir -p "$out"

echo "== environment ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  || echo "nvidia-smi failed: no NVIDIA driver here?"
"$python" - <<'PY'
import platform
import torch
import transformers
print(
    f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
    f"transformers {transformers.__version__}, CUDA available: {torch.cuda.is_available()}, "
    f"GPUs: {torch.cuda.device_count()}, CPUs: {__import__('os').cpu_count()}"
)
PY

echo "== msif GPU check"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# SIGINT first: Python stops where it is, and gpu-results.json keeps the sections finished.
timeout --signal=INT --kill-after=30 "${GPU_CHECK_TIMEOUT:-450}" \
  "$python" -m benchmarks.gpu --out "$out" "$@" 2>&1 | tee "$out/gpu-check.log"
