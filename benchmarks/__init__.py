"""Everything that measures the library: run from the repository root, not installed.

::

  python -m benchmarks [eval]          # every estimator on the reference model's attention
  python -m benchmarks compare         # verify | equal-density | bench [--devices 8]
  python -m benchmarks.model_bench     # a Llama-3.1-8B-shaped decode step
  python -m benchmarks.model_decode_loop  # its tokens/s, steps in one compiled loop (GPU)
  python -m benchmarks.reference.train --out DIR   # the reference model (benchmarks/reference)
  python -m benchmarks.gpu_decode      # device scripts: device_kernels, cpu_gpu_equal, ...

``harness`` holds the shared timing, errors and JSON; ``methods`` the named method
configurations of the tables; results go to ``benchmarks/results/``. Imports flow
``benchmarks -> models -> sparse_attn -> pallas_kernels``.
"""
