#!/usr/bin/env bash
# On the GPU machine: install the carried wheels (bench/gpu/prepare_wheels.sh made them) offline, then run the bench.
# Device tool call: command "bash bench/gpu/run.sh", carry ["bench/gpu/wheels"], timeout_s 480 (bench/gpu/README.md).
# Extra arguments go to run_gpu_bench.py, e.g. --sections device,image --deadline-s 200 for a shorter rerun.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/outputs/gpu-bench}
mkdir -p "$OUT"
if ! ls bench/gpu/wheels/*.whl >/dev/null 2>&1; then
  echo "bench/gpu/wheels/ holds no wheels: run bash bench/gpu/prepare_wheels.sh here and carry bench/gpu/wheels" >&2
  exit 2
fi
start=$(date +%s)
SITE=/tmp/gpu-bench-site
python3 -m pip install -q --no-index --find-links bench/gpu/wheels --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$SITE" bench/gpu/wheels/*.whl || { echo "installing the carried wheels failed" >&2; exit 3; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "carried wheels installed in $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
PYTHONUNBUFFERED=1 python3 bench/gpu/run_gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
