"""What MagicPIG's per-query buffers must hold: real queries against the prefill's keys
taken as queries (the proxies ``init`` sizes the buffers from, ``_src/magicpig_buffers``).

Usage::

  python -m benchmarks.magicpig_needs [--json PATH]

For each source and layer, over 16 problems (one plane seed each): a query's bucket entries
(the sizes of its ``L`` buckets, as a share of the tokens in the tables) and its qualified
tokens (colliding in at least 2 tables, as a share of the residual), for the real queries
and for 32 evenly spaced residual keys per row and KV head hashed as queries; the median and
the largest of each. Sources: the reference model (``benchmarks/magicpig_buffers``' ``eval``
and ``long``) and LLM-shaped synthetic keys (``sa.synthetic.llm_like``, 8K tokens, D=64 and
128).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa
from benchmarks import harness
from benchmarks import magicpig_buffers as mb
from benchmarks.task_codec import Codec
from models import checkpoint
from pallas_kernels.table_match_counts import pack_codes, table_match_counts
from sparse_attn import lsh
from sparse_attn.attention import group_queries

K, L, SINKS, LOCAL, PROXIES, PROBLEMS = 10, 150, 4, 16, 32, 16


def needs(codes, index, length):
  """``(entries, qualified)`` shares of queries hashed to ``codes [B, Hkv, G, L]``."""
  batch, num_kv_heads, group, _ = codes.shape
  c = codes.astype(jnp.int32)[..., None]
  offsets = index.tables.offsets[:, :, None]
  entries = jnp.sum(jnp.take_along_axis(offsets, c + 1, axis=-1)
                    - jnp.take_along_axis(offsets, c, axis=-1), axis=(-2, -1))
  counts = table_match_counts(pack_codes(codes, K).reshape(batch, num_kv_heads * group, -1),
                              index.codes, length, K, L)
  positions = jnp.arange(index.codes.shape[2])[None]
  residual = (positions >= SINKS) & (positions < (length - LOCAL)[:, None])
  qualified = jnp.sum((counts >= 2) & residual[:, None], axis=-1)
  n = np.asarray(length, np.float64)[:, None, None]
  return (np.asarray(entries) / (n - SINKS),
          np.asarray(qualified).reshape(entries.shape) / (n - SINKS - LOCAL))


def measure(problems) -> dict:
  est = sa.magicpig(K=K, L=L, sinks=SINKS, local=LOCAL, retrieval="tables")
  found = {"real": ([], []), "proxies": ([], [])}
  for i, (q, cache) in enumerate(problems[:PROBLEMS]):
    index = est.init(cache, jax.random.PRNGKey(i))
    qg = group_queries(q, cache.keys.shape[1])
    shortest = int(np.min(np.asarray(cache.length)))
    at = np.linspace(SINKS, shortest - LOCAL - 1, PROXIES).astype(int)
    proxies = cache.keys[:, :, at].astype(jnp.float32)
    for name, x in (("real", qg), ("proxies", proxies)):
      for store, value in zip(found[name], needs(lsh.simhash(x, index.planes, K, L), index,
                                                 cache.length)):
        store.append(value.ravel())
  out = {}
  for name, (entries, qualified) in found.items():
    entries, qualified = np.concatenate(entries), np.concatenate(qualified)
    out[name] = {"entries median": float(np.median(entries)), "entries max": float(entries.max()),
                 "qualified median": float(np.median(qualified)),
                 "qualified max": float(qualified.max())}
  return out


def synthetic(head_dim: int) -> list:
  return [sa.synthetic.llm_like(jax.random.PRNGKey(i), num_kv_heads=2, group=4,
                                capacity=8192, head_dim=head_dim) for i in range(4)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = parser.parse_args(argv)
  cfg = mb.Config()
  model, model_cfg = checkpoint.load_hf(cfg.model)
  codec = Codec(cfg.model, model_cfg.vocab_size)
  sources = [(f"llm_like D={d}", {0: synthetic(d)}) for d in (128, 64)]
  sources += [(name, build(model, codec, cfg)) for name, build in
              (("eval", mb.eval_problems), ("long", mb.long_problems))]
  report = {"K": K, "L": L, "rows": []}
  print(f"{'source':<16} {'layer':>5} | real: entries p50/max, qualified p50/max | "
        f"proxies: the same  (shares of the tables / the residual)")
  for source, per_layer in sources:
    for layer, problems in per_layer.items():
      row = {"source": source, "layer": layer, **measure(problems)}
      report["rows"].append(row)
      cells = " | ".join(f"{r['entries median']:.3f}/{r['entries max']:.3f} "
                         f"{r['qualified median']:.3f}/{r['qualified max']:.3f}"
                         for r in (row["real"], row["proxies"]))
      print(f"{source:<16} {layer:>5} | {cells}", flush=True)
  if args.json:
    harness.save_json(report, args.json)
  return 0


if __name__ == "__main__":
  harness.use_cpu_xla_flag()
  sys.exit(main())
