"""``python -m benchmarks bench``: decode-step time of each estimator against dense attention.

At Llama-3.1-8B layer shapes (32 query heads, 8 KV heads, D = 128) for each (length, batch,
dtype): dense decode attention, both as ``jax.nn.dot_product_attention`` runs it (cuDNN's
where the GPU has it) and as ``sa.dense_attention`` does, against each estimator's whole
decode step, ``append`` of the new token plus ``attend`` (retrieval + attention), compiled
as one function per step. Speedups are against the *faster* of the two dense baselines. One
process; every step is compiled and warmed up first, then the methods run interleaved and
the medians are compared.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp

import sparse_attn as sa
from benchmarks import harness
from sparse_attn import synthetic


@dataclasses.dataclass(frozen=True)
class Config:
  lengths: tuple[int, ...] = (16384, 65536, 131072)
  batches: tuple[int, ...] = (1, 8)
  dtypes: tuple[str, ...] = ("float32", "bfloat16")
  methods: tuple[str, ...] = ("magicpig", "spotlight", "topk_simhash", "vattention",
                              "vattention_simhash", "vattention_spotlight", "streaming")
  num_kv_heads: int = 8
  group: int = 4
  head_dim: int = 128
  repeats: int = 10
  memory_fraction: float = 0.6  # skip configurations whose arrays would need more


def estimators(cfg: Config) -> dict[str, sa.Estimator]:
  params = sa.hash_heads.init_params(jax.random.PRNGKey(0), cfg.num_kv_heads, cfg.head_dim)
  every = {
      "magicpig": sa.magicpig(K=10, L=150),
      "spotlight": sa.spotlight(params, fraction=0.02),
      "topk_simhash": sa.topk(fraction=0.02, predictor=sa.predictors.simhash()),
      "vattention": sa.vattention(0.05, 0.05),
      "vattention_simhash": sa.vattention_importance(0.05, 0.05),
      "vattention_spotlight": sa.vattention_importance(
          0.05, 0.05, proposal=sa.predictors.spotlight(params)),
      "streaming": sa.streaming(),
  }
  return {name: every[name] for name in cfg.methods}


def dense_xla(q: jax.Array, cache: sa.KVCache) -> jax.Array:
  """Decode attention by ``jax.nn.dot_product_attention`` (GQA, ragged lengths)."""
  keys, values, length = cache
  return jax.nn.dot_product_attention(
      q[:, None], jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2),
      query_seq_lengths=jnp.ones_like(length), key_value_seq_lengths=length)[:, 0]


def bytes_needed(cfg: Config, length: int, batch: int, dtype: str) -> int:
  """Cache plus the largest index (MagicPIG: 6 L + 4 bytes per token per KV head)."""
  tokens = batch * cfg.num_kv_heads * length
  return tokens * (2 * cfg.head_dim * jnp.dtype(dtype).itemsize + 904)


def available_bytes() -> int:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 1 << 60


def run_one(cfg: Config, length: int, batch: int, dtype: str, log) -> dict:
  """Decodes ``repeats`` steps from ``length - 1`` tokens: every step writes one token (the
  cache's length grows), appends it to each index (in place) and attends."""
  steps = cfg.repeats + 1  # the first step compiles
  q, cache = synthetic.llm_like(jax.random.PRNGKey(1), batch=batch,
                                num_kv_heads=cfg.num_kv_heads, group=cfg.group,
                                capacity=length + steps, head_dim=cfg.head_dim,
                                length=jnp.full((batch,), length - 1, jnp.int32),
                                dtype=jnp.dtype(dtype))
  lengths = [jnp.full((batch,), length + i, jnp.int32) for i in range(steps)]
  key = jax.random.PRNGKey(2)
  steppers, build = {}, {}
  # Each decode step is one compiled function, as in a jitted decode loop: no Python
  # dispatch or eager input checks inside the timed region.
  for name, dense_fn in (("dense (XLA)", dense_xla),
                         ("dense_attention", lambda q, c: sa.dense_attention(q, c).out)):
    compiled = jax.jit(dense_fn)
    steppers[name] = (lambda f: lambda i: f(q, cache._replace(length=lengths[i])))(compiled)
  for name, est in estimators(cfg).items():
    start = time.perf_counter()
    state = {"index": jax.block_until_ready(est.init(cache, key))}
    build[name] = time.perf_counter() - start

    @functools.partial(jax.jit, donate_argnums=0)  # the index is updated in place
    def decode(index, grown, est=est):
      index = est.append(index, grown)
      return est.attend(q, grown, index, key).out, index

    def step(i, decode=decode, state=state):
      out, state["index"] = decode(state["index"], cache._replace(length=lengths[i]))
      return out

    steppers[name] = step
  medians = harness.interleaved_medians(steppers, cfg.repeats)  # step 0 compiles
  dense = min(medians["dense (XLA)"], medians["dense_attention"])
  # Each row as soon as it is measured: a run cut short still reports what it finished.
  log(f"  n={length} B={batch} {dtype}: " + ", ".join(
      f"{name} {1e3 * t:.2f} ms" for name, t in medians.items()), file=sys.stderr)
  return {"length": length, "batch": batch, "dtype": dtype,
          "step_ms": {n: 1e3 * t for n, t in medians.items()},
          "speedup_vs_dense": {n: dense / t for n, t in medians.items()},
          "index_build_s": build}


def run(cfg: Config = Config(), log=print) -> dict:
  rows, skipped = [], []
  for dtype in cfg.dtypes:
    for batch in cfg.batches:
      for length in cfg.lengths:
        need = bytes_needed(cfg, length, batch, dtype)
        if need > cfg.memory_fraction * available_bytes():
          skipped.append({"length": length, "batch": batch, "dtype": dtype,
                          "needs_gb": need / 2**30})
          continue
        rows.append(run_one(cfg, length, batch, dtype, log))
  return {"config": dataclasses.asdict(cfg), "device": jax.devices()[0].device_kind,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows, "skipped": skipped}


def format_report(report: dict) -> str:
  methods = ["dense (XLA)", "dense_attention"] + list(report["config"]["methods"])
  lines = [f"decode step (append + attend) in ms, and speedup over the faster dense baseline; "
           f"device {report['device']}, median of {report['config']['repeats']} interleaved "
           f"runs, XLA_FLAGS={report.get('xla_flags', '')!r}",
           f"{'n':>8}{'B':>3}{'dtype':>10}" + "".join(f"{m:>22}" for m in methods)]
  for r in report["rows"]:
    cells = "".join(f"{r['step_ms'][m]:>12.2f} ({r['speedup_vs_dense'][m]:>5.2f}x)"
                    for m in methods)
    lines.append(f"{r['length']:>8}{r['batch']:>3}{r['dtype']:>10}{cells}")
  for s in report["skipped"]:
    lines.append(f"skipped n={s['length']} B={s['batch']} {s['dtype']}: needs about "
                 f"{s['needs_gb']:.1f} GB")
  return "\n".join(lines)
