"""Peer baseline, run only on the device: torch's SDPA decode attention, timed with CUDA events.

The shapes of ``benchmarks/gpu_decode.py``: one query per head, 32 query heads over 8 KV
heads (GQA, ``enable_gqa=True``, no copy of the cache), D = 128, bf16, the cache laid out
``[B, Hkv, S, D]``. Each SDPA backend torch offers (flash, memory-efficient, cuDNN) is timed
alone; the fastest is the peer figure. Also the device-to-device copy bandwidth, for the
bytes / bandwidth floor of a dense decode step (read K and V once).

torch is not a dependency of the package or its tests; this script runs on the device only:

  python -m benchmarks.torch_flash_decode --json $OUT/torch_flash_decode.json
"""

from __future__ import annotations

import argparse
import json
import sys


def event_median_ms(fn, repeats: int) -> float:
  import torch
  for _ in range(5):
    fn()
  times = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end))
  times.sort()
  return times[len(times) // 2]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", metavar="PATH")
  parser.add_argument("--configs", default="131072x1,131072x8,524288x1")
  parser.add_argument("--repeats", type=int, default=100)
  args = parser.parse_args(argv)
  import torch
  import torch.nn.functional as F
  from torch.nn.attention import SDPBackend, sdpa_kernel

  report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": []}

  def save():
    if args.json:
      with open(args.json, "w") as f:
        json.dump(report, f, indent=1)

  big = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB
  other = torch.empty_like(big)
  copy_ms = event_median_ms(lambda: other.copy_(big), 20)
  report["copy_bandwidth_bytes_per_s"] = 2 * big.numel() / (copy_ms * 1e-3)  # read + write
  del big, other
  save()
  for config in args.configs.split(","):
    length, batch = (int(v) for v in config.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, 8, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(batch, 8, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    # The floor: K and V read once (bf16), at the measured copy rate.
    row = {"length": length, "batch": batch, "dtype": "bfloat16", "ms": {},
           "floor_ms": 1e3 * (k.numel() + v.numel()) * 2 / report["copy_bandwidth_bytes_per_s"]}
    report["rows"].append(row)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("math", SDPBackend.MATH)):
      if name == "math" and length * batch > 131072:
        continue  # materialises the scores; only a sanity point
      try:
        with sdpa_kernel(backend):
          row["ms"][name] = event_median_ms(
              lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.repeats)
      except Exception as err:  # noqa: BLE001 - a backend may refuse these shapes
        row["ms"][name] = f"failed: {type(err).__name__}: {str(err)[:200]}"
      print(f"n={length} B={batch} {name}: {row['ms'][name]}", flush=True)
      save()
    times = [t for t in row["ms"].values() if isinstance(t, float)]
    row["fastest_ms"] = min(times) if times else None
    save()
    del q, k, v
    torch.cuda.empty_cache()
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
