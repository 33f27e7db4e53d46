"""vAttention: budget rule, unbiasedness, clipping (coverage: tests/benchmarks/test_verify.py)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from sparse_attn import synthetic
from sparse_attn._src.budget import finite_population_size
from tests import reference as ref


def problem(lengths=(2048, 1500), capacity=2048, scale=0.7, dtype=jnp.float32):
  return synthetic.llm_like(jax.random.PRNGKey(0), batch=len(lengths), num_kv_heads=2, group=2,
                            capacity=capacity, head_dim=32, length=jnp.array(lengths, jnp.int32),
                            query_scale=scale, dtype=dtype)


def test_budget_is_the_finite_population_corrected_sample_size():
  n0 = jnp.array([0.0, 10.0, 500.0, 1e9, jnp.inf])
  n_s = jnp.array([1000, 1000, 1000, 1000, 1000], jnp.int32)
  want = [0.0, 10 / (1 + 9 / 1000), 500 / (1 + 499 / 1000), 1000.0, 1000.0]
  np.testing.assert_allclose(np.asarray(finite_population_size(n0, n_s)), want, rtol=1e-5)


def test_full_budget_is_exact():
  # epsilon so small that the budget is the whole residual: weights n_s/b = 1, no error.
  q, cache = problem()
  est = sa.vattention(1e-6, 0.05, max_fraction=1.0, guarantee="output")
  res = est.attend(q, cache, est.init(cache, None), jax.random.PRNGKey(1))
  out, lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)
  assert ref.relative_error(res.out, out).max() <= 1e-5
  np.testing.assert_allclose(np.asarray(res.lse), lse, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(res.stats["budget"]), np.asarray(res.stats["residual"]))
  assert not bool(jnp.any(res.stats["budget_clipped"]))
  np.testing.assert_allclose(np.asarray(res.density), 1.0)


def test_unbiased_numerator_and_denominator_over_sampling_keys():
  # E[D_hat] = D and E[N_hat] = N given the budget rule (the final sample is independent of
  # the base sample that sets b). 400 keys on 4 queries: |z| <= 3 for each denominator
  # (false alarm about 1% in all), |z| <= 4 for the 4*32 numerator components (about 0.8%).
  q, cache = problem(scale=0.4)
  est = sa.vattention(0.1, 0.1, topk_fraction=0.01, base_rate=0.01, max_fraction=0.1)
  index = est.init(cache, None)
  exact_out, exact_lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)
  trials = 400
  outs, lses, budgets = jax.lax.map(
      jax.jit(lambda k: (lambda r: (r.out, r.lse, r.stats["budget"]))(
          est.attend(q, cache, index, k))), jax.random.split(jax.random.PRNGKey(2), trials))
  assert float(jnp.std(budgets.astype(jnp.float32), axis=0).max()) > 0  # b really varies
  deviation, se, z = ref.monte_carlo_bias(outs, lses, exact_out, exact_lse)
  assert np.all(np.abs(deviation) <= 3 * se), (deviation, se)
  assert np.abs(z).max() <= 4


def test_clipping_is_flagged_and_bounded():
  q, cache = problem(scale=0.2)
  est = sa.vattention(0.001, 0.05, max_fraction=0.05, base_rate=0.01, min_base=2)
  res = est.attend(q, cache, est.init(cache, None), jax.random.PRNGKey(3))
  assert bool(jnp.all(res.stats["budget_clipped"]))
  cap = np.ceil(0.05 * np.asarray(res.stats["residual"]))
  np.testing.assert_array_equal(np.asarray(res.stats["budget"]), cap)
  np.testing.assert_array_less(np.asarray(res.stats["read"]),
                               np.asarray(res.stats["valid"]) + 1)


def test_bf16_short_cache_and_orthogonal_query_no_nan():
  q, cache = problem(lengths=(2048, 40), dtype=jnp.bfloat16)
  for guarantee in ("denominator", "numerator", "output"):
    est = sa.vattention(0.05, 0.05, guarantee=guarantee)
    res = est.attend(q, cache, est.init(cache, None), jax.random.PRNGKey(4))
    assert res.out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(res.out, np.float32)).all()
    assert float(res.density[1, 0]) == 1.0  # 40 tokens < sinks + local: all exact
    res = est.attend(jnp.zeros_like(q), cache, (), jax.random.PRNGKey(4))
    assert np.isfinite(np.asarray(res.out, np.float32)).all()


def test_one_compile_per_shape_and_vmap_over_queries(caplog):
  q, cache = problem()
  est = sa.vattention(0.05, 0.05, guarantee="output")
  key = jax.random.PRNGKey(5)
  est.attend(q, cache, (), key)  # compiles
  q2, other = q * 2, cache._replace(length=jnp.array([1000, 2000], jnp.int32))
  key2 = jax.random.PRNGKey(6)
  with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
    caplog.clear()
    est.attend(q2, other, (), key2)  # new values, same shapes: nothing compiles
    assert not [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  qs = jnp.stack([q, 2 * q, -q])
  batched = jax.vmap(lambda x: est.attend(x, cache, (), key).out)(qs)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(batched[i]),
                               np.asarray(est.attend(qs[i], cache, (), key).out),
                               rtol=1e-5, atol=1e-6)


def test_validation():
  with pytest.raises(ValueError, match="guarantee must be one of"):
    sa.vattention(0.05, 0.05, guarantee="vibes")
  with pytest.raises(ValueError, match=r"delta must be in \(0, 0.21\)"):
    sa.vattention(0.05, 0.3, guarantee="output")
  with pytest.raises(ValueError, match="base_rate <= max_fraction"):
    sa.vattention(0.05, 0.05, base_rate=0.5, max_fraction=0.25)
  q, cache = problem()
  with pytest.raises(ValueError, match="key must be a jax.random key"):
    sa.vattention(0.05, 0.05).attend(q, cache, (), None)


def test_base_sample_has_a_floor():
  # m0 = min(n_s, max(min_base, ceil(base_rate n_s))): 20 tokens of a 1000-token residual
  # cannot estimate the spread of heavy-tailed weights (see the module docstring).
  q, cache = problem(lengths=(2048, 300))
  for min_base, base_rate in ((128, 0.02), (2, 0.02), (128, 0.1)):
    est = sa.vattention(0.05, 0.05, min_base=min_base, base_rate=base_rate)
    res = est.attend(q, cache, est.init(cache, None), jax.random.PRNGKey(5))
    n_s = np.asarray(res.stats["residual"])
    want = np.minimum(n_s, np.maximum(min_base, np.ceil(base_rate * n_s)))
    np.testing.assert_array_equal(np.asarray(res.stats["base"]), want)
  with pytest.raises(ValueError, match="min_base"):
    sa.vattention(0.05, 0.05, min_base=1)
