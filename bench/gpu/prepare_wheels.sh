#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels the GPU machine lacks, into bench/gpu/wheels/ (git-ignored),
# and checks that they fit the device tool's 64 MiB transfer limit (working tree + carried paths together).
#
# The GPU image (Python 3.12, x86-64) already has torch, transformers, accelerate, peft, pytest(-xdist), numpy,
# pandas, pyarrow, xxhash, fsspec, huggingface-hub, tokenizers, safetensors, pyyaml, tqdm, requests, httpx,
# regex, pillow, matplotlib, onnxruntime, psutil (its package list: the device library's KINDS.md).
# Missing there: diffusers, trl, datasets, gguf, and of their dependencies dill, multiprocess, importlib_metadata
# (+ lazy-importer).
# xformers 0.0.35 (torch>=2.10, one stable-ABI wheel of about 3 MiB) fits too: it is carried so that the image
# section can time xformers attention beside SDPA; if it does not load there, those cases record the error.
#
#     bash bench/gpu/prepare_wheels.sh            # then carry bench/gpu/wheels in the device call
set -euo pipefail
cd "$(dirname "$0")"
DEST=wheels
LIMIT_MIB=${LIMIT_MIB:-64}
# What else travels in the same call: the tracked working tree (measured below) must fit beside the wheels.
# Versions come from constraints.txt, the pinned set CI tests. transformers, accelerate and peft are carried too:
# the image holds older ones (transformers 5.17.0, accelerate 1.15.0 as last read), and the figures must come from
# the versions every other benchmark uses. Their own needs (huggingface-hub, tokenizers, safetensors, typer) are met there.
PINNED=(diffusers trl datasets gguf dill multiprocess importlib_metadata lazy-importer transformers accelerate peft)
PACKAGES=()
for name in "${PINNED[@]}"; do
  line=$(grep -i -E "^${name}==" ../../constraints.txt) || { echo "ERROR: ${name} is not pinned in constraints.txt" >&2; exit 1; }
  PACKAGES+=("$line")
done
PACKAGES+=("xformers==0.0.35")   # not a project dependency: CUDA-only, timed beside SDPA in the image section
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform any)
PIP=(python3 -m pip download --no-deps --disable-pip-version-check -q)
rm -rf "$DEST" && mkdir -p "$DEST"
for spec in "${PACKAGES[@]}"; do
  "${PIP[@]}" "${PLATFORM[@]}" -d "$DEST" "$spec"
done
wheels_kib=$(du -sk "$DEST" | cut -f1)
tree_kib=$(cd ../.. && git ls-files -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "wheels in bench/gpu/$DEST:"
ls -l "$DEST" | awk 'NR>1 {printf "  %8.1f KiB  %s\n", $5/1024, $9}'
printf 'wheels total: %.1f MiB; tracked working tree: %.1f MiB; together %.1f MiB of the %d MiB limit\n' \
  "$(echo "$wheels_kib/1024" | bc -l)" "$(echo "$tree_kib/1024" | bc -l)" "$(echo "($wheels_kib+$tree_kib)/1024" | bc -l)" "$LIMIT_MIB"
if [ $((wheels_kib + tree_kib)) -gt $((LIMIT_MIB * 1024)) ]; then
  echo "ERROR: over the ${LIMIT_MIB} MiB transfer limit" >&2
  exit 1
fi
