#!/usr/bin/env bash
# One prepared accelerator run (about 5 minutes on an H100/H200), results under $OUT:
#  1. benchmarks.device_kernels: every Pallas kernel compiled against its jnp reference,
#     hamming_scores at 512K tokens vs the paper's 100 us and the bandwidth floor, sparse
#     decode attention vs dense (XLA, cuDNN) at 128K;
#  2. python -m benchmarks bench with the kernels on (SPARSE_ATTN_PALLAS=1), 128K and 512K,
#     and (unless XLA_BENCH=0) at 128K with them off (the jnp gather path under XLA);
#  3. with RUN_TESTS=1, the test suite on the device and the 128K comparison table.
# Usage on a GPU machine, from the repository root: OUT=/some/dir bash benchmarks/device_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/device.txt"
timeout 150 $PY -m benchmarks.device_kernels --json "$OUT/device_kernels.json" 2>&1 \
  | tee "$OUT/device_kernels.txt" | tail -n 40
SPARSE_ATTN_PALLAS=1 timeout 200 $PY -m benchmarks bench --lengths 131072,524288 --batches 1 \
  --dtypes bfloat16 --json "$OUT/bench_kernels.json" > "$OUT/bench_kernels.txt" 2>&1
tail -n 20 "$OUT/bench_kernels.txt"
if [ "${XLA_BENCH:-1}" = 1 ]; then
  SPARSE_ATTN_PALLAS=0 timeout 90 $PY -m benchmarks bench --lengths 131072 --batches 1 \
    --dtypes bfloat16 --json "$OUT/bench_xla.json" > "$OUT/bench_xla.txt" 2>&1
  tail -n 12 "$OUT/bench_xla.txt"
fi
if [ "${RUN_TESTS:-0}" = 1 ]; then
  timeout 300 $PY -m pytest -q -p no:cacheprovider 2>&1 | tail -n 25 | tee "$OUT/pytest.txt"
  timeout 120 $PY -m benchmarks compare --length 131072 --batch 1 --kv-heads 8 --group 4 \
    --head-dim 128 --dtype float32 --repeats 20 --json "$OUT/compare_128k_float32.json" \
    > "$OUT/compare_128k_float32.txt" 2>&1
fi
