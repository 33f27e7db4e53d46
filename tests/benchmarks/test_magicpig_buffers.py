"""``benchmarks.magicpig_buffers`` and ``benchmarks.magicpig_needs`` on small synthetic
problems (the scripts themselves run on the reference model)."""

import jax
import jax.numpy as jnp

import sparse_attn as sa
from benchmarks import magicpig_buffers, magicpig_needs


def problems(count=2, head_dim=32):
  out = []
  for i in range(count):
    q, cache = sa.synthetic.llm_like(jax.random.PRNGKey(i), batch=2, num_kv_heads=2, group=2,
                                     capacity=1024, head_dim=head_dim,
                                     length=jnp.array([1024, 700], jnp.int32))
    out.append((q, cache))
  return out


def test_the_buffer_report_compares_the_prefill_and_formula_sizes():
  cfg = magicpig_buffers.Config(seeds=1, repeats=1, local=16)
  row = magicpig_buffers.measure(magicpig_buffers.estimators(cfg), problems(), cfg)
  assert row["error default"] == row["error no limit"] == row["error formula"]
  assert row["default"]["wide steps fraction"] == 0.0  # the prefill's sizes hold here
  assert row["formula"]["selected overflow fraction"] > 0  # the formula's do not (D=32)
  assert row["default"]["selected / S (median, max)"][0] > \
      row["formula"]["selected / S (median, max)"][0]
  assert set(row["attend ms (median)"]) == {"default", "formula", "dense"}


def test_the_needs_report_measures_real_queries_and_proxies():
  row = magicpig_needs.measure(problems(1, head_dim=64))
  for name in ("real", "proxies"):
    r = row[name]
    assert 0 < r["entries median"] <= r["entries max"]
    assert 0 < r["qualified median"] <= r["qualified max"] < 1
