"""Sparse decode attention: kernel (interpret mode) == reference == float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_decode_attention as sda


def numpy_attention(q, keys, values, indices, log_weights, count):
  """float64: softmax over each list's first ``count`` entries of ``q.k/sqrt(D) - lw``."""
  q, keys, values = (np.asarray(x, np.float64) for x in (q, keys, values))
  batch, num_q, dim = q.shape
  num_kv, num_lists = keys.shape[1], indices.shape[1]
  out, lse = np.zeros((batch, num_q, dim)), np.full((batch, num_q), -np.inf)
  for b in range(batch):
    for h in range(num_q):
      lst = h * num_lists // num_q  # the list serving query head h
      kv = lst * num_kv // num_lists
      ids = np.asarray(indices[b, lst, :count[b, lst]])
      if ids.size == 0:
        continue
      s = keys[b, kv, ids] @ q[b, h] / np.sqrt(dim)
      if log_weights is not None:
        s = s - np.asarray(log_weights[b, lst, :count[b, lst]], np.float64)
      m = s.max()
      e = np.exp(s - m)
      out[b, h] = e @ values[b, kv, ids] / e.sum()
      lse[b, h] = m + np.log(e.sum())
  return out, lse


def problem(per_query_head, dtype, n=300, capacity=257, seed=0, dim=32):
  rng = np.random.default_rng(seed)
  batch, num_kv, group = 2, 2, 3
  lists = num_kv * group if per_query_head else num_kv
  q = jnp.asarray(rng.normal(size=(batch, num_kv * group, dim)) * 2, dtype)
  keys = jnp.asarray(rng.normal(size=(batch, num_kv, capacity, dim)), dtype)
  values = jnp.asarray(rng.normal(size=(batch, num_kv, capacity, dim)), dtype)
  indices = jnp.asarray(rng.integers(0, capacity, size=(batch, lists, n)), jnp.int32)
  log_weights = jnp.asarray(rng.normal(size=(batch, lists, n)) * 3, jnp.float32)
  count = rng.integers(0, n + 1, size=(batch, lists)).astype(np.int32)
  count[0, 0], count[1, -1] = 0, n  # an empty list and a full one
  return q, keys, values, indices, log_weights, jnp.asarray(count)


@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_and_reference_equal_float64(per_query_head, dtype):
  args = problem(per_query_head, dtype)
  want_out, want_lse = numpy_attention(*args)
  ref_out, ref_lse = sda.sparse_decode_attention_reference(*args, block=64)
  # N = 300 is no multiple of the block (32) or the split (96): padding and a ragged split.
  got_out, got_lse = sda.sparse_decode_attention_kernel(
      *args, block_sizes=sda.BlockSizes(block=32, split=96), interpret=True)
  for out, lse in ((ref_out, ref_lse), (got_out, got_lse)):
    assert out.dtype == lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], rtol=2e-5, atol=2e-5)
  empty = np.asarray(args[-1])[0, 0] == 0
  assert empty and np.all(np.asarray(got_out)[0, 0] == 0)  # an empty list: 0, never NaN


def test_extreme_log_weights_give_no_nan():
  q, keys, values, indices, _, count = problem(False, jnp.float32, n=40)
  log_weights = jnp.full(indices.shape, 60.0).at[:, :, ::2].set(-60.0)  # 1/w up to e^60
  for out, lse in (sda.sparse_decode_attention_reference(q, keys, values, indices,
                                                          log_weights, count),
                   sda.sparse_decode_attention_kernel(q, keys, values, indices, log_weights,
                                                      count, interpret=True)):
    assert np.isfinite(np.asarray(out)).all()
  want, _ = numpy_attention(q, keys, values, indices, log_weights, count)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)


def test_rejects_lists_that_match_no_head_count():
  q, keys, values, indices, lw, count = problem(False, jnp.float32)
  with pytest.raises(ValueError, match="indices must have shape"):
    sda.sparse_decode_attention_reference(q, keys, values, indices[:, :1], lw[:, :1],
                                          count[:, :1])


def tilted(s, row, a, c):
  """A ``ScoreWeights`` function of the score, the row's value and two per-query values."""
  return jnp.tanh(s) * a + c * row


@pytest.mark.parametrize("per_query_head", [False, True])
def test_score_weights_are_computed_from_the_listed_rows(per_query_head):
  """Score-dependent weights (MagicPIG's): the reference applies them per block, the GPU
  kernel inside its pass, and listed_log_weights (the TPU's path) materialises them; all
  equal float64 numpy, per query head (a shared list's queries have their own weights)."""
  q, keys, values, indices, _, count = problem(per_query_head, jnp.float32)
  rng = np.random.default_rng(5)
  batch, num_q, dim = q.shape
  num_kv, lists = keys.shape[1], indices.shape[1]
  rows = rng.normal(size=keys.shape[:3])
  params = rng.normal(size=(batch, lists, num_q // lists, 2))
  weights = sda.ScoreWeights(tilted, jnp.asarray(rows, jnp.float32),
                             jnp.asarray(params, jnp.float32))
  qq, kk, vv = (np.asarray(x, np.float64) for x in (q, keys, values))
  want_out, want_lw = np.zeros((batch, num_q, dim)), {}
  for b in range(batch):
    for h in range(num_q):
      lst, g = divmod(h, num_q // lists)
      kv = lst * num_kv // lists
      ids = np.asarray(indices[b, lst, :count[b, lst]])
      s = kk[b, kv, ids] @ qq[b, h] / np.sqrt(dim)
      a, c = params[b, lst, g]
      want_lw[b, h] = np.tanh(s) * a + c * rows[b, kv, ids]
      if ids.size:
        e = np.exp(s - want_lw[b, h] - (s - want_lw[b, h]).max())
        want_out[b, h] = e @ vv[b, kv, ids] / e.sum()
  got = sda.sparse_decode_attention_reference(q, keys, values, indices, weights, count, block=64)
  kernel = sda.sparse_decode_attention_kernel(
      q, keys, values, indices, weights, count, block_sizes=sda.BlockSizes(block=32, split=96),
      interpret=True)
  for out, _ in (got, kernel):
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=2e-5, atol=2e-5)
  if per_query_head:
    table = sda.listed_log_weights(weights, q, keys, indices, count, block=64)
    for b in range(batch):
      for h in range(num_q):
        n = int(count[b, h])
        np.testing.assert_allclose(np.asarray(table[b, h, :n]), want_lw[b, h], rtol=1e-5,
                                   atol=1e-5)
        assert np.all(np.asarray(table[b, h, n:]) == 0)
