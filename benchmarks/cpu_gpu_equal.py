"""The GPU path selects what the CPU path selects, on one fixed problem.

Spotlight and top-k SimHash at 2% on a ragged bf16 cache (numpy-generated, so both
backends see the same bits; hash parameters and SimHash planes made once by the CPU run
and loaded by the GPU run). The CPU run (``JAX_PLATFORMS=cpu``) saves its key codes,
selected positions, outputs and lse; the GPU run (kernels, counting selection) recomputes
them and compares: positions must be identical (on the CPU run's codes; whether the GPU
hashed every key to the same code is reported), outputs within bf16 output rounding (the
kernels accumulate in another order).

MagicPIG (K=10, L=150) too: the CPU run retrieves by its bucketed tables, the GPU run by the
scan of the packed codes (``backend.magicpig_retrieval``); on the CPU run's planes, codes,
key mean and key norms the sampled token counts must be identical and the outputs within
bf16 output rounding.

  JAX_PLATFORMS=cpu python -m benchmarks.cpu_gpu_equal --save /tmp/cpu.npz
  python -m benchmarks.cpu_gpu_equal --against /tmp/cpu.npz --json $OUT/cpu_gpu_equal.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa
from sparse_attn import predictors
from sparse_attn._src import selection
from sparse_attn.attention import group_queries
from sparse_attn.streaming import residual_mask

B, KV, G, S, D = 2, 2, 4, 3000, 128
LENGTH = (3000, 1777)


def problem():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(B, KV * G, D)), jnp.bfloat16)
  keys = jnp.asarray(rng.normal(size=(B, KV, S, D)) + rng.normal(size=(1, KV, 1, D)),
                     jnp.bfloat16)
  values = jnp.asarray(rng.normal(size=(B, KV, S, D)), jnp.bfloat16)
  return q, sa.KVCache(keys, values, jnp.asarray(LENGTH, jnp.int32))


def run(saved: dict | None) -> dict:
  q, cache = problem()
  params = ({k: jnp.asarray(saved[f"params_{k}"]) for k in ("w", "b")} if saved
            else sa.hash_heads.init_params(jax.random.PRNGKey(3), KV, D))
  results = {"params_w": params["w"], "params_b": params["b"]}
  for name, pred, est in (
      ("spotlight", predictors.spotlight(params).scorer(0, 0),
       sa.spotlight(params, fraction=0.02)),
      ("topk_simhash", predictors.simhash().scorer(4, 64),  # topk's window: sinks 4, local 64
       sa.topk(fraction=0.02, predictor=predictors.simhash()))):
    state = pred.init(cache, jax.random.PRNGKey(4))
    index = est.init(cache, jax.random.PRNGKey(4))
    results[f"{name}_codes"] = state.codes
    if saved:
      # Hashing may round differently on the GPU (a sign flips where a projection is ~0):
      # reported, then the selection is compared on the CPU run's codes and planes.
      results[f"{name}_own_codes_equal"] = np.array_equal(state.codes,
                                                          saved[f"{name}_codes"])
      same = {"codes": jnp.asarray(saved[f"{name}_codes"])}
      if name == "topk_simhash":
        same.update(planes=jnp.asarray(saved[f"{name}_planes"]),
                    key_mean=jnp.asarray(saved[f"{name}_key_mean"]))
      state, index = state._replace(**same), index._replace(**same)
    qg = group_queries(q, KV)
    scores = pred.scores(qg, cache, state)
    positions = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
    keep = math.ceil(0.02 * LENGTH[0])
    keep_rows = jnp.ceil(0.02 * cache.length.astype(jnp.float32)).astype(jnp.int32)
    top, valid = selection.top(scores, residual_mask(positions, cache.length, 4, 64), keep,
                               keep_rows[:, None, None, None],
                               pred.score_range(G, D))
    res = est.attend(q, cache, index, None)
    results.update({f"{name}_top": jnp.where(valid, top, -1),
                    f"{name}_out": res.out.astype(jnp.float32), f"{name}_lse": res.lse})
    if name == "topk_simhash":
      results.update({f"{name}_planes": state.planes, f"{name}_key_mean": state.key_mean})
  results.update(run_magicpig(q, cache, saved))
  return {k: np.asarray(v) for k, v in results.items()}


MAGICPIG_STATE = ("planes", "key_mean", "codes", "key_norms")


def run_magicpig(q, cache, saved):
  est = sa.magicpig(K=10, L=150)
  index = est.init(cache, jax.random.PRNGKey(5))
  results = {f"magicpig_{k}": getattr(index, k) for k in MAGICPIG_STATE}
  results["magicpig_retrieval"] = np.array(index.tables is None)  # True: the scan
  if saved:
    results["magicpig_own_codes_equal"] = np.array_equal(index.codes, saved["magicpig_codes"])
    index = index._replace(**{k: jnp.asarray(saved[f"magicpig_{k}"]) for k in MAGICPIG_STATE})
  res = est.attend(q, cache, index, None)
  results.update(magicpig_sampled=res.stats["sampled"], magicpig_out=res.out.astype(jnp.float32),
                 magicpig_lse=res.lse)
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--save", metavar="NPZ")
  parser.add_argument("--against", metavar="NPZ")
  parser.add_argument("--json", metavar="PATH")
  args = parser.parse_args(argv)
  if args.save:
    np.savez(args.save, **run(None))
    return 0
  saved = dict(np.load(args.against))
  got = run(saved)
  report = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
  ok = True
  for name in ("spotlight", "topk_simhash"):
    codes_equal = bool(got[f"{name}_own_codes_equal"])
    top_equal = bool(np.array_equal(got[f"{name}_top"], saved[f"{name}_top"]))
    out_diff = float(np.max(np.abs(got[f"{name}_out"] - saved[f"{name}_out"])))
    lse_diff = float(np.max(np.abs(got[f"{name}_lse"] - saved[f"{name}_lse"])))
    report[name] = {"codes_equal": codes_equal, "selection_equal": top_equal,
                    "out_max_diff": out_diff, "lse_max_diff": lse_diff,
                    "differing_positions": int(np.sum(got[f"{name}_top"]
                                                      != saved[f"{name}_top"]))}
    ok &= top_equal and out_diff < 1e-2 and lse_diff < 1e-4
  sampled_equal = bool(np.array_equal(got["magicpig_sampled"], saved["magicpig_sampled"]))
  out_diff = float(np.max(np.abs(got["magicpig_out"] - saved["magicpig_out"])))
  lse_diff = float(np.max(np.abs(got["magicpig_lse"] - saved["magicpig_lse"])))
  report["magicpig"] = {"scan_here": bool(got["magicpig_retrieval"]),
                        "tables_there": not bool(saved["magicpig_retrieval"]),
                        "codes_equal": bool(got["magicpig_own_codes_equal"]),
                        "sampled_equal": sampled_equal, "out_max_diff": out_diff,
                        "lse_max_diff": lse_diff}
  ok &= sampled_equal and out_diff < 1e-2 and lse_diff < 1e-4
  report["ok"] = bool(ok)
  print(json.dumps(report, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
