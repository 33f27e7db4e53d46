"""MagicPIG's buffers sized at init from the prefill (``_src/magicpig_buffers``)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from pallas_kernels.table_match_counts import unpack_codes
from sparse_attn import lsh, synthetic
from tests.sparse_attn.test_magicpig import aligned_problem, small_problem

SINKS, LOCAL, PROXIES, MARGIN = 4, 16, 32, 1.25


def rounded(fraction, capacity, most):
  """Up to the first rung of ``2**(j/4) / 256`` of ``S`` at or above ``fraction``."""
  j = 0
  while 2 ** (j / 4) / 256 < fraction * (1 - 1e-12):
    j += 1
  return min(most, math.ceil(2 ** (j / 4) / 256 * capacity))


def formula(K, L, capacity):
  w0 = sa.lsh.collision_probability(0.0, K, L, 2)
  return (rounded(2 * L * 2.0**-K, capacity, L * capacity),
          rounded(2 * float(w0) + 1 / 64, capacity, capacity))


def need_reference(cache, index, K, L):
  """The documented rule in numpy: ``PROXIES`` evenly spaced residual keys per row and KV
  head, hashed as queries; the largest share of the row's hashed tokens in their buckets,
  and of its residual that collides in at least 2 tables."""
  codes = np.asarray(unpack_codes(index.codes, K, L)).astype(np.int64)  # [B, Hkv, S, L]
  entries, qualified = [], []
  for b in range(cache.keys.shape[0]):
    n = int(cache.length[b])
    end = max(n - LOCAL, SINKS)
    if end - SINKS < 256:
      continue
    at = [SINKS + int((i + 0.5) / PROXIES * (end - SINKS)) for i in range(PROXIES)]
    proxies = cache.keys[b:b + 1, :, at].astype(jnp.float32)  # [1, Hkv, P, D]
    proxy_codes = np.asarray(lsh.simhash(proxies, index.planes, K, L))[0].astype(np.int64)
    for h in range(codes.shape[1]):
      for p in range(PROXIES):
        equal = codes[b, h] == proxy_codes[h, p][None, :]  # [S, L]
        entries.append(equal[SINKS:n].sum() / (n - SINKS))
        qualified.append((equal[SINKS:end].sum(-1) >= 2).sum() / (end - SINKS))
  return max(entries), max(qualified)


@pytest.mark.parametrize("problem", ["llm_like", "aligned"])
def test_init_sizes_the_buffers_by_the_documented_rule(problem):
  q, cache = small_problem() if problem == "llm_like" else aligned_problem()
  K, L, capacity = 6, 20, cache.keys.shape[2]
  index = sa.magicpig(K=K, L=L, sinks=SINKS, local=LOCAL).init(cache, jax.random.PRNGKey(5))
  entries, qualified = need_reference(cache, index, K, L)
  assert index.buffers.candidates == rounded(MARGIN * entries, capacity, L * capacity)
  assert index.buffers.selected == rounded(MARGIN * qualified, capacity, capacity)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("K, L, problem", [(6, 20, "aligned"), (10, 150, "llm_like"),
                                           (8, 60, "llm_like")])
def test_the_sized_buffers_hold_the_real_queries(jit, K, L, problem):
  # Where the formula's buffers are too small (both problems at head dim 32: a query's
  # buckets and qualified tokens exceed them), the prefill's sizes hold every query: no
  # overflow, and the estimate is the one without any limit.
  q, cache = small_problem() if problem == "llm_like" else aligned_problem()
  est = sa.magicpig(K=K, L=L, sinks=SINKS, local=LOCAL)
  index = est.init(cache, jax.random.PRNGKey(5))
  traced = jax.jit(est.init)(cache, jax.random.PRNGKey(5))
  attend = jax.jit(est.attend) if jit else est.attend
  res, res_formula = attend(q, cache, index), attend(q, cache, traced)
  assert float(jnp.max(res_formula.stats["selected_overflow"])) > 0  # the formula binds
  assert float(jnp.max(res.stats["bucket_overflow"])) == 0
  assert float(jnp.max(res.stats["selected_overflow"])) == 0
  unlimited = sa.magicpig(K=K, L=L, sinks=SINKS, local=LOCAL, max_selected=1.0,
                          max_candidates=float(L))
  res_all = unlimited.attend(q, cache, unlimited.init(cache, jax.random.PRNGKey(5)))
  np.testing.assert_array_equal(np.asarray(res.stats["sampled"]),
                                np.asarray(res_all.stats["sampled"]))
  np.testing.assert_allclose(np.asarray(res.out), np.asarray(res_all.out), atol=1e-5)


def test_a_traced_init_or_a_short_prefill_keeps_the_formula():
  K, L = 10, 150
  est = sa.magicpig(K=K, L=L, sinks=SINKS, local=LOCAL)
  q, cache = small_problem()
  traced = jax.jit(est.init)(cache, jax.random.PRNGKey(5)).buffers
  # A concrete cache with a traced key (init under the caller's jit over seeds): traced too.
  traced_key = jax.jit(lambda key: est.init(cache, key))(jax.random.PRNGKey(5)).buffers
  short = est.init(cache._replace(length=jnp.array([200, 0], jnp.int32)),
                   jax.random.PRNGKey(5)).buffers
  expected = formula(K, L, cache.keys.shape[2])
  assert (traced.candidates, traced.selected) == expected
  assert (traced_key.candidates, traced_key.selected) == expected
  assert (short.candidates, short.selected) == expected


def test_explicit_sizes_are_kept():
  q, cache = small_problem()
  index = sa.magicpig(K=6, L=20, max_selected=0.01, max_candidates=0.05).init(
      cache, jax.random.PRNGKey(5))
  assert (index.buffers.candidates, index.buffers.selected) == (math.ceil(0.05 * 512),
                                                                math.ceil(0.01 * 512))
  only_list = sa.magicpig(K=6, L=20, local=LOCAL, max_selected=0.01).init(
      cache, jax.random.PRNGKey(5)).buffers
  assert only_list.selected == math.ceil(0.01 * 512)
  sized = sa.magicpig(K=6, L=20, local=LOCAL).init(cache, jax.random.PRNGKey(5)).buffers
  assert only_list.candidates == sized.candidates  # the other one is sized from the prefill


def test_the_sizes_survive_append_and_a_decode_loop():
  # The sizes are static structure: append keeps them, and a lax.scan carrying the index
  # compiles once.
  q, cache = synthetic.llm_like(jax.random.PRNGKey(2), batch=1, num_kv_heads=2, group=2,
                                capacity=1024, head_dim=32, length=jnp.array([700]))
  est = sa.magicpig(K=6, L=20, sinks=SINKS, local=LOCAL)
  index = est.init(cache, jax.random.PRNGKey(5))
  sizes = index.buffers

  def step(carry, _):
    index, length = carry
    grown = cache._replace(length=length + 1)
    index = est.append(index, grown)
    return (index, length + 1), est.attend(q, grown, index).out

  (index, _), outs = jax.lax.scan(step, (index, cache.length), None, length=8)
  assert index.buffers == sizes
  assert bool(jnp.all(jnp.isfinite(outs)))
