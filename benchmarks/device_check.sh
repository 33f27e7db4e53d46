#!/usr/bin/env bash
# One prepared accelerator run: the test suite on the device, then the comparison table at
# Llama-3.1-8B layer shapes (32 query / 8 KV heads, D=128), 128K tokens, as text and JSON.
# Usage on a GPU machine, from the repository root: OUT=/some/dir bash benchmarks/device_check.sh
# (DTYPES="float32 bfloat16" for both dtypes).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/device.txt"
# Tests: same suite as CI, but on the accelerator (float64 references on the host).
timeout 400 $PY -m pytest -q -p no:cacheprovider 2>&1 | tail -n 25 | tee "$OUT/pytest.txt"
for dtype in ${DTYPES:-float32}; do
  timeout 120 $PY -m sparse_attn --length 131072 --batch 1 --kv-heads 8 --group 4 \
    --head-dim 128 --dtype "$dtype" --repeats 20 --json "$OUT/compare_128k_${dtype}.json" \
    > "$OUT/compare_128k_${dtype}.txt" 2>&1
  tail -n 30 "$OUT/compare_128k_${dtype}.txt"
done
