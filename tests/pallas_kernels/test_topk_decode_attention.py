"""Retrieval by counting, fused with attention: histogram kernel == reference == numpy, the
counting plan keeps exactly ``selection.top``'s set, and the fused kernel (interpret mode)
== reference == float64 numpy over that set."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import score_histogram as sh
from pallas_kernels import topk_decode_attention as tda
from sparse_attn import selection
from sparse_attn.streaming import residual_mask

SINKS, LOCAL = 4, 16


def problem(seed, dtype=jnp.bfloat16, capacity=700, score_max=20):
  rng = np.random.default_rng(seed)
  batch, num_kv, group, dim = 2, 2, 4, 32
  q = jnp.asarray(rng.normal(size=(batch, num_kv * group, dim)) * 2, dtype)
  keys = jnp.asarray(rng.normal(size=(batch, num_kv, capacity, dim)), dtype)
  values = jnp.asarray(rng.normal(size=(batch, num_kv, capacity, dim)), dtype)
  length = jnp.array([capacity, 333], jnp.int32)
  scores = jnp.asarray(rng.integers(-1, score_max, size=(batch, num_kv, capacity)), jnp.int32)
  keep = jnp.asarray(rng.integers(0, 60, size=(batch, num_kv)), jnp.int32)
  return q, keys, values, length, scores, keep


def numpy_histogram(scores, length, lo, block):
  scores, length = np.asarray(scores), np.asarray(length)
  batch, heads, capacity = scores.shape
  hist = np.zeros((batch, heads, -(-capacity // block), sh.BINS), np.int64)
  for b, h, j in np.ndindex(batch, heads, capacity):
    if SINKS <= j < length[b] - LOCAL:
      hist[b, h, j // block, scores[b, h, j] - lo] += 1
  return hist


@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_kernel_counts_eligible_scores(seed):
  _, _, _, length, scores, _ = problem(seed)
  want = numpy_histogram(scores, length, -1, 128)
  ref = sh.score_histogram_reference(scores, length, -1, SINKS, LOCAL, 128)
  got = sh.score_histogram_kernel(scores, length, -1, SINKS, LOCAL, sh.BlockSizes(block=128),
                                  interpret=True)
  np.testing.assert_array_equal(np.asarray(ref), want)
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("seed", range(4))
def test_counting_plan_keeps_what_top_keeps(seed):
  """Many ties (scores 0..19 over hundreds of tokens), keeps from 0 to past the eligible
  count, an empty-ish row: the plan's set equals ``selection.top``'s, position by position."""
  _, _, _, length, scores, keep = problem(seed, score_max=[3, 20, 300, 1000][seed])
  capacity = scores.shape[-1]
  hist = sh.score_histogram_reference(scores, length, -1, SINKS, LOCAL, 128)
  threshold, need, _ = selection.counting_plan(hist, keep, -1)
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  eligible = residual_mask(positions, length, SINKS, LOCAL)
  top, valid = selection.top(scores, eligible, 60, keep[..., None])
  want = selection.positions_mask(top, valid, capacity) | (
      ~eligible & (positions < length[:, None, None]))
  got = tda.kept_mask(scores, length, threshold, need, SINKS, LOCAL)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def numpy_attention(q, keys, values, kept):
  q, keys, values, kept = (np.asarray(x, np.float64) for x in (q, keys, values, kept))
  batch, num_q, dim = q.shape
  group = num_q // keys.shape[1]
  out, lse = np.zeros((batch, num_q, dim)), np.full((batch, num_q), -np.inf)
  for b, h in np.ndindex(batch, num_q):
    rows = np.flatnonzero(kept[b, h // group])
    if rows.size:
      s = keys[b, h // group, rows] @ q[b, h] / np.sqrt(dim)
      e = np.exp(s - s.max())
      out[b, h] = e @ values[b, h // group, rows] / e.sum()
      lse[b, h] = s.max() + np.log(e.sum())
  return out, lse


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_kernel_attends_over_the_kept_set(dtype):
  q, keys, values, length, scores, keep = problem(2, dtype)
  hist = sh.score_histogram_reference(scores, length, -1, SINKS, LOCAL, 128)
  threshold, need, ties_before = selection.counting_plan(hist, keep, -1)
  kept = tda.kept_mask(scores, length, threshold, need, SINKS, LOCAL)
  want_out, want_lse = numpy_attention(q, keys, values, kept)
  ref = tda.topk_decode_attention_reference(q, keys, values, scores, length, threshold, need,
                                            SINKS, LOCAL)
  # 700 tokens, 6 programs of 128-token histogram blocks: ragged last split and block.
  got = tda.topk_decode_attention_kernel(q, keys, values, scores, length, threshold, need,
                                         ties_before, SINKS, LOCAL, 128,
                                         tda.BlockSizes(block=64, programs=6), interpret=True)
  for out, lse in (ref, got):
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5)
