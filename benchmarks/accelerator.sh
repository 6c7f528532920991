#!/usr/bin/env bash
# The whole accelerator table in one call: DiT-S/2, B/2, L/2, XL/2 at 256 px in bf16, unrolled
# blocks (the fastest on an H100; BLOCKS=scanned for nn.scan), each at
# the largest listed global batch that fits (full remat only if none fits), train img/s, MFU, peak
# memory, compile time and guided sampling img/s. Needs only jax, flax, optax and numpy.
#   bash benchmarks/accelerator.sh [OUT_DIR]      (results.jsonl and table.md go to OUT_DIR)
# MODELS overrides the set, e.g. MODELS="S/2:256 XL/2:64" bash benchmarks/accelerator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmark_results}"
mkdir -p "$out"
: "${PYTHON:=python3}"
: "${MODELS:=S/2:512,256 XL/2:256,128,64,32 B/2:512,256 L/2:256,128,64}"
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
# shellcheck disable=SC2086  # MODELS is a list
PYTHONUNBUFFERED=1 "$PYTHON" -m benchmarks.accelerator --models $MODELS \
    --remats none nothing_saveable --blocks "${BLOCKS:-unrolled}" --out "$out/results.jsonl" \
    | tee "$out/table.md"
