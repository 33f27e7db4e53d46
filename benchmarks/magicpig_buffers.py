"""MagicPIG's default buffers on real attention: how often they are too small, and what it
costs in accuracy (nothing, by construction, since a step whose buffers are too small takes
an exact wider path) against the same estimator with no buffer limit and against an
explicit hard cap of the formula's size (two-stage subsample).

Two defaults: the sizes an eager ``init`` takes from the prefill (``default``), and the
formula's that a traced ``init`` keeps (``formula``: ``jax.jit(est.init)``).

Usage::

  python -m benchmarks.magicpig_buffers [--json PATH]

Two sources of real attention from the reference model (``benchmarks/reference``):

* ``eval``: the evaluation's answer-predicting positions (``python -m benchmarks eval``'s
  defaults: 4 tasks x 4 instances x 4 positions, 1,024 tokens);
* ``long``: 4,096-token concatenations of the model's tasks (needle, multi-key needle,
  variable tracking, common words, one of each per sequence), 16 positions in the last
  quarter of each, the cache holding every earlier token.

Per layer and source: the median relative output error over positions, query heads and
``seeds`` plane seeds of ``sa.magicpig(K=10, L=150)`` with its defaults, with no limit
(``max_selected=1``, ``max_candidates=L``) and with ``max_selected`` fixed at the formula's
list size; for both defaults, the fraction of (query, seed) pairs whose buckets or qualified
tokens overflowed the buffers, the fraction of steps (a batch) that took a wide path, the
buffer sizes as fractions of ``S``, and the median time of one jitted ``attend`` with each
(on the row's first problem, interleaved with dense attention).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa
from benchmarks import estimator_eval as ee
from benchmarks import harness
from benchmarks.reference import tasks
from benchmarks.task_codec import Codec
from models import checkpoint, decoding

K, L = 10, 150
LONG_TASKS = ("needle_single", "needle_multikey", "variable_tracking", "common_words")


@dataclasses.dataclass(frozen=True)
class Config:
  model: str = ee.REFERENCE
  seeds: int = 4  # plane seeds per position
  long_sequences: int = 2
  long_positions: int = 16
  sinks: int = 4
  local: int = 16
  seed: int = 0
  repeats: int = 20  # timed attend calls per layer


def estimators(cfg: Config) -> dict[str, sa.Estimator]:
  window = dict(K=K, L=L, sinks=cfg.sinks, local=cfg.local)
  listed = 2 * float(sa.lsh.collision_probability(0.0, K, L, 2)) + 1 / 64
  return {"default": sa.magicpig(**window),
          "formula": sa.magicpig(**window),  # initialised under jit (`measure`)
          "no limit": sa.magicpig(**window, max_selected=1.0, max_candidates=float(L)),
          "hard cap": sa.magicpig(**window, max_selected=listed)}


def eval_problems(model, codec, cfg: Config) -> dict[int, list]:
  eval_cfg = ee.Config(model=cfg.model, seed=cfg.seed)
  corpus = tasks.load_corpus()
  per_layer = {}
  for task in eval_cfg.tasks:
    group = ee.instances(eval_cfg, task, eval_cfg.attention_instances, True, corpus)
    att = ee.Attention(model, group, codec, eval_cfg)
    for layer in range(len(att.qkv)):
      per_layer.setdefault(layer, []).extend((p.q, p.cache) for p in att.problems(layer))
  return per_layer


def long_problems(model, codec, cfg: Config) -> dict[int, list]:
  corpus = tasks.load_corpus()
  rows = []
  for s in range(cfg.long_sequences):
    parts = [tasks.make(t, (cfg.seed, 5, s, i), 1024, held_out=True, corpus=corpus).tokens
             for i, t in enumerate(LONG_TASKS)]
    text = np.concatenate(parts).tobytes()
    rows.append(codec.ids(text, True)[:4096])
  ids = jnp.asarray(np.array(rows, np.int32))
  qkv = decoding.capture(model, ids, jnp.full((len(rows),), ids.shape[1], jnp.int32))
  positions = np.linspace(3 * ids.shape[1] // 4, ids.shape[1] - 1, cfg.long_positions,
                          dtype=np.int32)
  per_layer = {}
  for layer, (q, k, v) in enumerate(qkv):
    for p in positions:
      cache = sa.KVCache(k, v, jnp.full((len(rows),), p + 1, jnp.int32))
      per_layer.setdefault(layer, []).append((q[:, :, p], cache))
  return per_layer


def measure(ests: dict, problems: list, cfg: Config) -> dict:
  errors = {name: [] for name in ests}
  overflow = {name: {"bucket": [], "selected": [], "candidates": [], "listed": []}
              for name in ("default", "formula")}
  for i, (q, cache) in enumerate(problems):
    exact = sa.dense_attention(q, cache).out
    for s in range(cfg.seeds):
      key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 7), 1000 * i + s)
      for name, est in ests.items():
        init = functools.partial(ee._init, est) if name == "formula" else est.init
        index = init(cache, key)
        res = ee._attend(est, q, cache, index, jax.random.fold_in(key, 1))
        errors[name].append(harness.relative_error(res.out, exact).ravel())
        if name in overflow:
          capacity = cache.keys.shape[2]
          overflow[name]["bucket"].append(np.asarray(res.stats["bucket_overflow"]))
          overflow[name]["selected"].append(np.asarray(res.stats["selected_overflow"]))
          overflow[name]["candidates"].append(index.buffers.candidates / capacity)
          overflow[name]["listed"].append(index.buffers.selected / capacity)
  out = {f"error {name}": float(np.median(np.concatenate(e))) for name, e in errors.items()}
  out["attend ms (median)"] = attend_times(ests["default"], *problems[0], cfg)
  for name, o in overflow.items():
    bucket, selected = np.stack(o["bucket"]), np.stack(o["selected"])  # [steps, B, Hq]
    out[name] = {
        "queries": int(bucket.size),
        "bucket overflow fraction": float(np.mean(bucket > 0)),
        "selected overflow fraction": float(np.mean(selected > 0)),
        "wide steps fraction": float(np.mean(np.any((bucket > 0) | (selected > 0),
                                                    axis=(1, 2)))),
        "candidates / S (median, max)": [float(np.median(o["candidates"])),
                                         float(np.max(o["candidates"]))],
        "selected / S (median, max)": [float(np.median(o["listed"])),
                                       float(np.max(o["listed"]))]}
  return out


def attend_times(est: sa.Estimator, q, cache, cfg: Config) -> dict:
  """Milliseconds of one jitted ``attend`` (interleaved medians of ``cfg.repeats``) with
  the prefill's buffers, the formula's, and dense attention, on one problem."""
  key = jax.random.PRNGKey(cfg.seed)
  indices = {"default": est.init(cache, key), "formula": ee._init(est, cache, key)}
  fns = {name: (lambda i, index=index: jax.block_until_ready(
      ee._attend(est, q, cache, index, None).out)) for name, index in indices.items()}
  dense = jax.jit(sa.dense_attention)
  fns["dense"] = lambda i: jax.block_until_ready(dense(q, cache).out)
  seconds = harness.interleaved_medians(fns, cfg.repeats, warmup=2)
  return {name: 1e3 * t for name, t in seconds.items()}


def run(cfg: Config = Config(), log=print) -> dict:
  begin = time.perf_counter()
  model, model_cfg = checkpoint.load_hf(cfg.model)
  codec = Codec(cfg.model, model_cfg.vocab_size)
  ests = estimators(cfg)
  report = {"config": dataclasses.asdict(cfg), "rows": []}
  for source, build in (("eval", eval_problems), ("long", long_problems)):
    for layer, problems in build(model, codec, cfg).items():
      row = {"source": source, "layer": layer, **measure(ests, problems, cfg)}
      report["rows"].append(row)
      log(f"{source} layer {layer}: {row}")
  report["seconds"] = time.perf_counter() - begin
  return report


def format_report(report: dict) -> str:
  head = (f"{'source':<6} {'layer':>5} {'queries':>7} {'default':>8} {'no limit':>8} "
          f"{'ratio':>6} {'hard cap':>8} | {'buffers':>11} {'bucket':>6} {'sel':>6} "
          f"{'wide':>6} {'ms':>6} | {'formula':>11} {'bucket':>6} {'sel':>6} {'wide':>6} "
          f"{'ms':>6} | {'dense':>6}")
  lines = ["MagicPIG K=10 L=150: median relative output error; for the prefill-sized and the "
           "formula buffers: their sizes (candidates/S, selected/S; median over steps), the "
           "fraction of (query, seed) pairs whose buckets or qualified tokens overflowed "
           "them, the fraction of steps that took a wide path, and one attend's median ms (one "
           "problem per row; dense attention beside)", head, "-" * len(head)]

  def sizes(o):
    candidates, listed = (o[f"{n} / S (median, max)"][0] for n in ("candidates", "selected"))
    return (f"{candidates:>5.2f},{listed:.3f} {o['bucket overflow fraction']:>6.3f} "
            f"{o['selected overflow fraction']:>6.3f} {o['wide steps fraction']:>6.3f}")

  for r in report["rows"]:
    ratio = r["error default"] / max(r["error no limit"], 1e-30)
    ms = r["attend ms (median)"]
    lines.append(f"{r['source']:<6} {r['layer']:>5} {r['default']['queries']:>7} "
                 f"{r['error default']:>8.4f} {r['error no limit']:>8.4f} {ratio:>6.3f} "
                 f"{r['error hard cap']:>8.4f} | {sizes(r['default'])} {ms['default']:>6.2f} | "
                 f"{sizes(r['formula'])} {ms['formula']:>6.2f} | {ms['dense']:>6.2f}")
  lines.append(f"({report['seconds']:.0f} s)")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=Config.seeds)
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = parser.parse_args(argv)
  report = run(Config(seeds=args.seeds))
  print(format_report(report))
  if args.json:
    harness.save_json(report, args.json)
  return 0


if __name__ == "__main__":
  harness.use_cpu_xla_flag()
  sys.exit(main())
