"""Every estimator's outputs on fixed seeds, saved to compare two versions of the library.

A refactor that must not change behaviour is checked by running this script against the
tree before and after it and comparing the arrays bit for bit::

  git worktree add /tmp/before <rev>
  PYTHONPATH=/tmp/before python benchmarks/estimator_outputs.py --save /tmp/before.npz
  python benchmarks/estimator_outputs.py --save /tmp/after.npz --compare /tmp/before.npz

Each configuration runs ``init`` on a synthetic LLM-shaped cache, ``attend`` at its length,
one decode ``append`` and ``attend`` again; every array of both results (output, log-sum-exp,
density and stats) is saved. The estimators are built through whichever API the imported
library has: string predictors (up to commit 0101e31) or predictor values (after it).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa

_VALUES_API = hasattr(sa, "vattention_importance")


def _topk(params, predictor, **kw):
  if _VALUES_API:
    pred = {"oracle": sa.predictors.oracle(), "simhash": sa.predictors.simhash(bits=128),
            "spotlight": sa.predictors.spotlight(params)}[predictor]
    return sa.topk(predictor=pred, **kw)
  return sa.topk(predictor=predictor, hash_params=params if predictor == "spotlight" else None,
                 **kw)


def _vattention(params, predictor=None, **kw):
  if _VALUES_API:
    pred = {None: sa.predictors.oracle(), "simhash": sa.predictors.simhash(bits=128),
            "spotlight": sa.predictors.spotlight(params)}[predictor]
    return sa.vattention(predictor=pred, **kw)
  return sa.vattention(predictor=predictor,
                       hash_params=params if predictor == "spotlight" else None, **kw)


def _importance(params, proposal, **kw):
  if _VALUES_API:
    prop = {"uniform": None, "simhash": sa.predictors.simhash(bits=1024),
            "spotlight": sa.predictors.spotlight(params)}[proposal]
    return sa.vattention_importance(proposal=prop, **kw)
  return sa.vattention(proposal=proposal,
                       hash_params=params if proposal == "spotlight" else None, **kw)


def configurations(params) -> dict:
  return {
      "dense": lambda: sa.dense(),
      "streaming": lambda: sa.streaming(4, 64),
      "uniform": lambda: sa.uniform(0.05),
      "magicpig": lambda: sa.magicpig(K=8, L=40),
      "magicpig_capped": lambda: sa.magicpig(K=6, L=20, max_candidates=0.03, max_selected=0.01),
      "topk_oracle": lambda: _topk(params, "oracle", fraction=0.02),
      "topk_simhash": lambda: _topk(params, "simhash", k=40),
      "topk_spotlight": lambda: _topk(params, "spotlight", fraction=0.05),
      "topp": lambda: sa.topp(0.9),
      "spotlight": lambda: sa.spotlight(params),
      "vattention": lambda: _vattention(params, epsilon=0.05, delta=0.05),
      "vattention_numerator": lambda: _vattention(params, epsilon=0.1, delta=0.1,
                                                  guarantee="numerator"),
      "vattention_simhash": lambda: _vattention(params, "simhash", epsilon=0.05, delta=0.05),
      "vattention_spotlight": lambda: _vattention(params, "spotlight", epsilon=0.05,
                                                  delta=0.05),
      "importance_simhash": lambda: _importance(params, "simhash", epsilon=0.05, delta=0.05),
      "importance_spotlight": lambda: _importance(params, "spotlight", epsilon=0.05,
                                                  delta=0.05),
      "importance_density": lambda: _importance(params, "simhash", density=0.05),
      "importance_uniform_density": lambda: _importance(params, "uniform", density=0.05),
      "importance_biased": lambda: _importance(params, "simhash", density=0.05,
                                               unbiased=False),
      "importance_slice": lambda: _importance(params, "spotlight", epsilon=0.05, delta=0.05,
                                              certain_slice=64),
  }


def run() -> dict[str, np.ndarray]:
  capacity = 2048
  q, cache = sa.synthetic.llm_like(jax.random.PRNGKey(0), batch=2, capacity=capacity,
                                   length=jnp.array([capacity - 8, 700], jnp.int32))
  params = sa.hash_heads.init_params(jax.random.PRNGKey(3), cache.keys.shape[1],
                                     cache.keys.shape[-1])
  arrays = {}
  for name, build in configurations(params).items():
    est = build()
    index = est.init(cache, jax.random.PRNGKey(1))
    results = [est.attend(q, cache, index, jax.random.PRNGKey(2))]
    grown = cache._replace(length=cache.length + 1)
    index = est.append(index, grown)
    results.append(est.attend(q, grown, index, jax.random.PRNGKey(4)))
    for step, res in enumerate(results):
      leaves = jax.tree_util.tree_leaves_with_path(
          {"out": res.out, "lse": res.lse, "density": res.density, "stats": res.stats})
      for path, leaf in leaves:
        arrays[f"{name}/{step}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  return arrays


def compare(before: dict, after: dict) -> list[str]:
  problems = [f"only before: {k}" for k in sorted(set(before) - set(after))]
  problems += [f"only after: {k}" for k in sorted(set(after) - set(before))]
  for k in sorted(set(before) & set(after)):
    a, b = before[k], after[k]
    if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
      problems.append(f"differs: {k}")
  return problems


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--save", required=True, help="write the arrays to this .npz")
  parser.add_argument("--compare", help="an .npz from another version: report differences")
  args = parser.parse_args(argv)
  arrays = run()
  np.savez(args.save, **arrays)
  print(f"{len(arrays)} arrays from {len(configurations(None))} configurations -> {args.save}")
  if args.compare:
    with np.load(args.compare) as f:
      before = dict(f)
    problems = compare(before, arrays)
    print(f"against {args.compare}: {len(problems)} of {len(set(before) | set(arrays))} "
          "arrays differ or are missing")
    for p in problems:
      print("  " + p)
    return 1 if problems else 0
  return 0


if __name__ == "__main__":
  sys.exit(main())
