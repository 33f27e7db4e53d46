"""Exact attention, merging, validation and the streaming estimator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_attn as sa
from tests import reference as ref


def random_problem(seed, batch=3, num_kv=2, group=3, capacity=96, head_dim=16,
                   lengths=(96, 50, 1), dtype=jnp.float32, scale=1.0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = scale * jax.random.normal(k1, (batch, num_kv * group, head_dim))
  keys = jax.random.normal(k2, (batch, num_kv, capacity, head_dim))
  values = jax.random.normal(k3, (batch, num_kv, capacity, head_dim))
  cache = sa.KVCache(keys.astype(dtype), values.astype(dtype), jnp.array(lengths, jnp.int32))
  return q.astype(dtype), cache


def test_dense_matches_float64_reference_gqa_ragged():
  q, cache = random_problem(0, scale=3.0)
  res = sa.dense_attention(q, cache)
  out, lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)
  assert res.out.dtype == jnp.float32 and res.out.shape == q.shape
  # 1e-6 on CPU (the CI contract). XLA:GPU's float32 exp is not correctly rounded: an
  # H200 measured 1.1e-6 on this case, so other backends get 2e-6.
  bound = 1e-6 if jax.default_backend() == "cpu" else 2e-6
  assert ref.relative_error(res.out, out).max() <= bound
  np.testing.assert_allclose(np.asarray(res.lse), lse, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(res.density), 1.0)
  np.testing.assert_array_equal(np.asarray(res.stats["valid"][:, 0]), [96, 50, 1])


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
def test_dense_low_precision_accumulates_in_float32(dtype, tol):
  q, cache = random_problem(1, dtype=dtype, scale=3.0)
  res = sa.dense_attention(q, cache)
  assert res.out.dtype == dtype and res.lse.dtype == jnp.float32
  # Reference on the same (rounded) inputs: only accumulation and output rounding differ.
  out, lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)
  assert ref.relative_error(res.out, out).max() <= tol
  np.testing.assert_allclose(np.asarray(res.lse), lse, rtol=1e-5, atol=1e-4)


def test_dense_extreme_scores_bf16_no_nan():
  q, cache = random_problem(2, dtype=jnp.bfloat16, scale=1e4)
  res = sa.dense_attention(q, cache)
  assert np.isfinite(np.asarray(res.out, np.float32)).all()
  assert np.isfinite(np.asarray(res.lse)).all()


def test_merge_of_two_halves_equals_whole():
  q, cache = random_problem(3, lengths=(96, 70, 60), scale=2.0)
  half = 48
  first = sa.KVCache(cache.keys[:, :, :half], cache.values[:, :, :half],
                     jnp.minimum(cache.length, half))
  second = sa.KVCache(cache.keys[:, :, half:], cache.values[:, :, half:], cache.length - half)
  merged = sa.merge([sa.dense_attention(q, first), sa.dense_attention(q, second)])
  whole = sa.dense_attention(q, cache)
  np.testing.assert_allclose(np.asarray(merged.out), np.asarray(whole.out), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(merged.lse), np.asarray(whole.lse), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(merged.density), 1.0)
  np.testing.assert_array_equal(np.asarray(merged.stats["valid"]),
                                np.asarray(whole.stats["valid"]))


def test_merge_with_an_empty_part_under_jit():
  q, cache = random_problem(4, lengths=(96, 40, 10))
  empty = cache._replace(length=jnp.zeros_like(cache.length))  # empty rows are valid
  merged = jax.jit(lambda q, a, b: sa.merge([sa.dense_attention(q, a), sa.dense_attention(q, b)]))(
      q, cache, empty)
  whole = sa.dense_attention(q, cache)
  np.testing.assert_allclose(np.asarray(merged.out), np.asarray(whole.out), rtol=1e-6, atol=1e-7)
  lone = jax.jit(sa.dense_attention)(q, empty)
  assert np.all(np.asarray(lone.lse) == -np.inf) and np.all(np.asarray(lone.out) == 0)


@pytest.mark.parametrize("bad,match", [
    (lambda q, c: (q[:, :, :-1], c), r"q must have shape \[B=3, Hq, D=16\]"),
    (lambda q, c: (q[0], c), r"q must have shape \[B, Hq, D\]"),
    (lambda q, c: (q[:, :5], c), r"multiple of the cache's Hkv = 2"),
    (lambda q, c: (q.astype(jnp.int32), c), "q must be bfloat16, float16 or float32"),
    (lambda q, c: (q, c._replace(values=c.values[:, :, :10])), r"cache.values must have"),
    (lambda q, c: (q, c._replace(length=c.length[:2])), r"cache.length must have shape \[B\]"),
    (lambda q, c: (q, c._replace(length=c.length.astype(jnp.float32))), "integer array"),
    (lambda q, c: (q, c._replace(length=jnp.array([96, -1, 3], jnp.int32))), r"\[0, S=96\]"),
    (lambda q, c: (q, c._replace(length=jnp.array([97, 1, 3], jnp.int32))), r"\[0, S=96\]"),
    (lambda q, c: (q, sa.KVCache(c.keys[:, :, :0], c.values[:, :, :0], c.length)),
     "cache is empty"),
    (lambda q, c: (q, tuple(c)), "must be a sparse_attn.KVCache"),
])
def test_bad_input_raises_value_error_naming_argument(bad, match):
  q, cache = random_problem(5)
  q, cache = bad(q, cache)
  with pytest.raises(ValueError, match=match):
    sa.dense_attention(q, cache)


def test_merge_rejects_mismatched_parts():
  q, cache = random_problem(6)
  a = sa.dense_attention(q, cache)
  with pytest.raises(ValueError, match="non-empty"):
    sa.merge([])
  with pytest.raises(ValueError, match=r"results\[1\] has out"):
    sa.merge([a, a._replace(out=a.out[:, :2], lse=a.lse[:, :2])])


@pytest.mark.parametrize("lengths", [(96, 50, 20), (3, 1, 70)])
def test_streaming_equals_attention_over_sinks_and_local(lengths):
  sinks, local = 4, 16
  q, cache = random_problem(7, lengths=lengths, scale=2.0)
  est = sa.streaming(sinks=sinks, local=local)
  res = est.attend(q, cache, est.init(cache, None), None)
  group = q.shape[1] // cache.keys.shape[1]
  for b, n in enumerate(lengths):
    positions = ref.exact_set(n, sinks, local)
    for h in range(q.shape[1]):
      out, lse = ref.subset_attention(q[b, h], cache.keys[b, h // group],
                                      cache.values[b, h // group], positions)
      assert ref.relative_error(res.out[b, h], out) <= 1e-6
      assert abs(float(res.lse[b, h]) - lse) <= 1e-5
      assert float(res.stats["selected"][b, h]) == len(positions)
  # A cache shorter than sinks + local is attended whole: streaming equals dense there.
  short = np.asarray(cache.length) <= sinks + local
  dense = sa.dense_attention(q, cache)
  np.testing.assert_allclose(np.asarray(res.out)[short], np.asarray(dense.out)[short],
                             rtol=1e-5, atol=1e-6)


def test_estimator_factories_validate_arguments():
  with pytest.raises(ValueError, match="sinks must be a non-negative int"):
    sa.streaming(sinks=-1)
  with pytest.raises(ValueError, match="sinks \\+ local > 0"):
    sa.streaming(sinks=0, local=0)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(split=st.integers(1, 95), lengths=st.lists(st.integers(1, 96), min_size=3, max_size=3))
def test_merge_of_any_split_equals_whole(split, lengths):
  q, cache = random_problem(8, lengths=tuple(lengths), scale=2.0)
  n = cache.length
  parts = [sa.KVCache(cache.keys[:, :, :split], cache.values[:, :, :split],
                      jnp.minimum(n, split)),
           sa.KVCache(cache.keys[:, :, split:], cache.values[:, :, split:],
                      jnp.maximum(n - split, 0))]
  # A part may be empty for some rows: legal under jit, where lengths are traced.
  merged = jax.jit(lambda q, a, b: sa.merge([sa.dense_attention(q, a),
                                             sa.dense_attention(q, b)]))(q, *parts)
  whole = sa.dense_attention(q, cache)
  np.testing.assert_allclose(np.asarray(merged.out), np.asarray(whole.out), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(merged.lse), np.asarray(whole.lse), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(merged.density), 1.0)
