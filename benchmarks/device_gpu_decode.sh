#!/usr/bin/env bash
# One prepared accelerator run for the GPU decode work (steps 1-4 took about 6 minutes on an
# H200; step 5 is new and capped at E2E_TIMEOUT, 300 s), results
# under $OUT, each step writing its JSON as it goes:
#  1. benchmarks.device_kernels: every Pallas kernel compiled against its jnp reference;
#  2. benchmarks.cpu_gpu_equal: the GPU path selects what the CPU path selects;
#  3. benchmarks.torch_flash_decode: torch SDPA decode (the peer) and the copy bandwidth;
#  4. benchmarks.gpu_decode: decode steps in a compiled loop, dense and sparse (vAttention's
#     SimHash proposal last: vattention_simhash_kept, vattention_simhash), and retrieval
#     (scores + selection) alone;
#  5. benchmarks.model_decode_loop: end-to-end tokens/s of a Llama-3.1-8B-shaped model
#     (random weights), 128K context, batch 8, dense against Spotlight in every layer.
# Knobs: KERNEL_ARGS (e.g. --no-timings), SKIP_TORCH=1, DECODE_TIMEOUT, DECODE_ARGS (e.g.
# --hlo-dir "$OUT", or --methods for the sampling estimators: docs/gpu.md), SKIP_E2E=1,
# E2E_TIMEOUT, E2E_LAYERS (an int or auto), E2E_ARGS.
# Usage on a GPU machine, from the repository root: OUT=/some/dir bash benchmarks/device_gpu_decode.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  $PY -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
  date -u
  echo "== kernels"; timeout 120 $PY -m benchmarks.device_kernels --repeats 20 ${KERNEL_ARGS:-} --json "$OUT/device_kernels.json" | head -n 14
  echo "== cpu vs gpu"
  JAX_PLATFORMS=cpu timeout 90 $PY -m benchmarks.cpu_gpu_equal --save /tmp/cpu_path.npz \
    && timeout 90 $PY -m benchmarks.cpu_gpu_equal --against /tmp/cpu_path.npz --json "$OUT/cpu_gpu_equal.json" \
    && SPARSE_ATTN_PALLAS=1 timeout 90 $PY -m benchmarks.cpu_gpu_equal --against /tmp/cpu_path.npz \
      --json "$OUT/cpu_gpu_equal_pending.json"  # with the kernels not yet verified
  if [ "${SKIP_TORCH:-0}" != 1 ]; then
    echo "== torch"; timeout 90 $PY -m benchmarks.torch_flash_decode --json "$OUT/torch_flash_decode.json" | grep -v '^ \|^[{}]'
  fi
  echo "== jax decode loop"
  timeout "${DECODE_TIMEOUT:-300}" $PY -m benchmarks.gpu_decode --json "$OUT/gpu_decode.json" ${DECODE_ARGS:-} | grep -v '^ \|^[{}]'
  date -u
  if [ "${SKIP_E2E:-0}" = 1 ]; then exit 0; fi
  echo "== e2e model decode loop"
  # 14 layers fit an H100 80 GB: per layer, K+V at 128K x batch 8 in bf16 is 4.0 GiB, the
  # weights 0.41 GiB and Spotlight's index 0.13 GiB; with the embedding and LM head (1.96 GiB)
  # 14 layers take 65.6 GiB of the 74 GiB given to XLA (95% of ~78 GiB), leaving 8 GiB for
  # temporaries (layers_that_fit with 6 GiB headroom: 14 on an H100, 27 on an H200). One
  # method's caches are alive at a time. E2E_LAYERS=auto takes the most that fit this device.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "${E2E_TIMEOUT:-300}" \
    $PY -m benchmarks.model_decode_loop --layers "${E2E_LAYERS:-14}" --batch 8 --length 131072 \
    --methods dense,spotlight,topk_simhash --json "$OUT/model_decode_loop.json" ${E2E_ARGS:-}
  date -u
} 2>&1 | tee "$OUT/log.txt"
