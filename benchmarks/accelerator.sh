#!/usr/bin/env bash
# The whole accelerator table in one call: DiT-S/2, B/2, L/2, XL/2 at 256 px in bf16, unrolled
# blocks (the fastest on an H100; BLOCKS=scanned for nn.scan), each at
# the largest listed global batch that fits (full remat only if none fits), train img/s, MFU, peak
# memory, compile time and guided sampling img/s. Needs only jax, flax, optax and numpy.
#   bash benchmarks/accelerator.sh [OUT_DIR]      (results.jsonl and table.md go to OUT_DIR)
# MODELS overrides the set, e.g. MODELS="S/2:256 XL/2:64" bash benchmarks/accelerator.sh
# PYTHON: the interpreter (default: the checkout's .venv/bin/python if there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmark_results}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import jax, flax, optax' 2>/dev/null; then
  echo "error: PYTHON=$PYTHON cannot import jax, flax and optax; set PYTHON to an interpreter" \
       "that has them" >&2
  exit 1
fi
mkdir -p "$out"
: "${MODELS:=S/2:512,256 XL/2:256,128,64,32 B/2:512,256 L/2:256,128,64}"
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
# shellcheck disable=SC2086  # MODELS is a list
PYTHONUNBUFFERED=1 "$PYTHON" -m benchmarks.accelerator --models $MODELS \
    --remats none nothing_saveable --blocks "${BLOCKS:-unrolled}" --out "$out/results.jsonl" \
    | tee "$out/table.md"
