"""What every experiment here shares: timing by interleaved medians, relative errors, JSON.

Timing: every function is compiled and warmed up first, then the functions run interleaved,
one call each in turn, so that a slow spell of the machine lands on all of them alike; the
median of each function's calls is its time.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa


def interleaved_medians(fns: dict[str, Callable[[int], Any]], repeats: int,
                        warmup: int = 1) -> dict[str, float]:
  """Median seconds of each named ``fn``, called as ``fn(i)`` for ``i`` in
  ``range(warmup + repeats)``: the first ``warmup`` calls of each compile and warm it up
  (untimed), then the functions run interleaved, call ``i`` of every one before call
  ``i + 1`` of any. ``i`` lets a decode step grow its cache; a function may ignore it."""
  for i in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn(i))
  times = {name: [] for name in fns}
  for i in range(warmup, warmup + repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(i))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
  return interleaved_medians({"": lambda i: fn()}, repeats, warmup)[""]


def relative_error(out, exact) -> np.ndarray:
  """``||o_hat - o|| / ||o||`` over the last axis, in float64 (per query head)."""
  a = np.asarray(out, np.float32).astype(np.float64)
  b = np.asarray(exact, np.float32).astype(np.float64)
  return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)


def attention_errors(res: sa.AttentionResult, exact: sa.AttentionResult
                     ) -> dict[str, jax.Array]:
  """Relative errors of the softmax denominator, numerator and output per query head, and
  the ratio ``D_hat / D`` (``jnp``, so that it traces under ``jit`` and ``lax.map``)."""
  ratio = jnp.exp(res.lse - exact.lse)
  out, ref = res.out.astype(jnp.float32), exact.out.astype(jnp.float32)
  norm = jnp.linalg.norm(ref, axis=-1)
  return {"denominator": jnp.abs(ratio - 1.0),
          "numerator": jnp.linalg.norm(ratio[..., None] * out - ref, axis=-1) / norm,
          "output": jnp.linalg.norm(out - ref, axis=-1) / norm,
          "ratio": ratio}


def plain(x):
  """``x`` as plain JSON: arrays as lists, numpy scalars as Python's, NaN and inf as None
  (JSON has no such numbers)."""
  if isinstance(x, dict):
    return {str(k): plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [plain(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return plain(np.asarray(x).tolist())
  if isinstance(x, (np.bool_, np.integer, np.floating)):
    return plain(x.item())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def save_json(report: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(plain(report), f, indent=1)


def has_accelerator() -> bool:
  return any(importlib.util.find_spec(name) for name in (
      "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu"))


# XLA:CPU's concurrency-optimised scheduler doubles MagicPIG's compiled retrieval (36 ms
# against 18 ms at 128K tokens on 2 cores; dense attention is unaffected, 110 against 106 ms).
CPU_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_cpu_xla_flag() -> None:
  """Adds ``CPU_XLA_FLAG`` to ``XLA_FLAGS`` before any computation, on machines without a GPU
  plugin (the flag is for XLA:CPU, and an XLA that does not know a flag refuses to start).
  Set ``XLA_FLAGS`` yourself, even to an empty string, to keep this off."""
  if "XLA_FLAGS" in os.environ or has_accelerator():
    return
  os.environ["XLA_FLAGS"] = CPU_XLA_FLAG
