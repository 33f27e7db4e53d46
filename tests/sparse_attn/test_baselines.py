"""The comparison baselines: uniform Horvitz-Thompson sampling and oracle top-k."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from sparse_attn import synthetic
from tests import reference as ref


def problem(lengths=(700, 333), capacity=700):
  return synthetic.llm_like(jax.random.PRNGKey(0), batch=len(lengths), num_kv_heads=2, group=2,
                            capacity=capacity, head_dim=16, length=jnp.array(lengths, jnp.int32),
                            query_scale=0.5)


def test_topk_equals_float64_top_k_attention():
  q, cache = problem()
  k, sinks, local = 25, 4, 16
  res = sa.topk(k=k, sinks=sinks, local=local).attend(q, cache, (), None)
  keys, values, qq = ref.f64(cache.keys), ref.f64(cache.values), ref.f64(q)
  for b, n in enumerate(np.asarray(cache.length)):
    exact = ref.exact_set(int(n), sinks, local)
    residual = np.array([i for i in range(n) if i not in set(exact)])
    for h in range(q.shape[1]):
      scores = keys[b, h // 2, residual] @ qq[b, h]
      top = residual[np.argsort(-scores)[:k]].tolist()
      out, lse = ref.subset_attention(qq[b, h], keys[b, h // 2], values[b, h // 2], exact + top)
      assert ref.relative_error(res.out[b, h], out) <= 1e-5
      assert abs(float(res.lse[b, h]) - lse) <= 1e-4
  assert bool(jnp.all(res.stats["read_all_keys"]))
  want = (k + sinks + local) / np.asarray(cache.length, np.float32)
  np.testing.assert_allclose(np.asarray(res.density), np.repeat(want[:, None], 4, 1), rtol=1e-6)


def test_topk_fraction_scales_with_each_rows_length():
  q, cache = problem()
  res = sa.topk(fraction=0.1, sinks=4, local=16).attend(q, cache, (), None)
  want = [math.ceil(0.1 * 700) + 20, math.ceil(0.1 * 333) + 20]
  np.testing.assert_array_equal(np.asarray(res.stats["selected"][:, 0]), want)


def test_uniform_sampling_is_unbiased_over_keys():
  # E[D_hat] = D and E[N_hat] = N over the sampling key. 400 keys; |z| <= 3 for the
  # denominator of each of 4 queries (false alarm about 1% in all) and |z| <= 4 for the
  # 4*16 numerator components (Bonferroni, about 0.4%). Fixed seeds.
  q, cache = problem(lengths=(700,), capacity=700)
  est = sa.uniform(0.05, sinks=4, local=16)
  exact_out, exact_lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)
  trials = 400
  outs, lses = jax.lax.map(lambda key: tuple(est.attend(q, cache, (), key)[:2]),
                           jax.random.split(jax.random.PRNGKey(1), trials))
  ratio = np.exp(ref.f64(lses) - exact_lse)
  num = ratio[..., None] * ref.f64(outs)
  assert np.all(np.abs(ratio.mean(0) - 1) <= 3 * ratio.std(0, ddof=1) / math.sqrt(trials))
  z = (num.mean(0) - exact_out) / (num.std(0, ddof=1) / math.sqrt(trials))
  assert np.abs(z).max() <= 4


def test_uniform_same_key_same_result_and_validation():
  q, cache = problem()
  est = sa.uniform(0.1)
  a = est.attend(q, cache, (), jax.random.PRNGKey(3))
  b = est.attend(q, cache, (), jax.random.PRNGKey(3))
  np.testing.assert_array_equal(np.asarray(a.out), np.asarray(b.out))
  with pytest.raises(ValueError, match="rate must be in"):
    sa.uniform(0.0)
  with pytest.raises(ValueError, match="key must be a jax.random key"):
    est.attend(q, cache, (), None)
  with pytest.raises(ValueError, match="exactly one of k or fraction"):
    sa.topk()
  with pytest.raises(ValueError, match="predictor must be a predictor value"):
    sa.topk(k=3, predictor="simhash")
  with pytest.raises(ValueError, match="bits must be a positive multiple of 32"):
    sa.predictors.simhash(bits=48)
