"""Retrieval by counting: the histogram kernel (interpret mode) == reference == numpy, the
counting plan drawn from the histograms keeps exactly ``selection.top``'s set, and the
kept-positions kernel writes ``top``'s list from it."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import hamming_scores as hs
from pallas_kernels import kept_positions as kp
from pallas_kernels import pack_signs as ps
from pallas_kernels import score_histogram as sh
from sparse_attn._src import selection
from sparse_attn.streaming import residual_mask

SINKS, LOCAL = 4, 16


def problem(seed, capacity=700, score_max=20):
  """Scores in [-1, score_max) on a full row and a ragged one; keeps from 0 to 59."""
  rng = np.random.default_rng(seed)
  length = jnp.array([capacity, 333], jnp.int32)
  scores = jnp.asarray(rng.integers(-1, score_max, size=(2, 2, capacity)), jnp.int32)
  keep = jnp.asarray(rng.integers(0, 60, size=(2, 2)), jnp.int32)
  return length, scores, keep


def numpy_histogram(scores, length, lo, block, bins=sh.BINS):
  scores, length = np.asarray(scores), np.asarray(length)
  batch, heads, capacity = scores.shape
  hist = np.zeros((batch, heads, -(-capacity // block), bins), np.int64)
  for b, h, j in np.ndindex(batch, heads, capacity):
    if SINKS <= j < length[b] - LOCAL:
      hist[b, h, j // block, scores[b, h, j] - lo] += 1
  return hist


@pytest.mark.parametrize("seed, bins, chunk", [(0, 1024, 128), (1, 1024, 32), (2, 512, 64),
                                               (3, 256, 128)])
def test_histogram_kernel_counts_eligible_scores(seed, bins, chunk):
  """Every bin size, with scores up to its top bin (``lo + bins - 1``); blocks of 128
  tokens counted whole or in chunks."""
  length, scores, _ = problem(seed, score_max=bins - 1)
  want = numpy_histogram(scores, length, -1, 128, bins)
  assert want[..., -1].sum() > 0  # the top bin is reached
  ref = sh.score_histogram_reference(scores, length, -1, SINKS, LOCAL, 128, bins)
  got = sh.score_histogram_kernel(scores, length, -1, SINKS, LOCAL,
                                  sh.BlockSizes(block=128, chunk=chunk), interpret=True,
                                  bins=bins)
  np.testing.assert_array_equal(np.asarray(ref), want)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_bins_hold_the_score_range():
  assert [sh.bins_for(n) for n in (1, 130, 256, 257, 514, 1024)] == [256, 256, 256, 512,
                                                                     1024, 1024]
  with pytest.raises(ValueError, match="values must be an int in"):
    sh.bins_for(1025)
  length, scores, _ = problem(0)
  with pytest.raises(ValueError, match="bins must be one of"):
    sh.score_histogram_kernel(scores, length, -1, bins=128, interpret=True)
  with pytest.raises(ValueError, match="bins must be one of"):
    sh.score_histogram_reference(scores, length, -1, 0, 0, 128, bins=300)
  with pytest.raises(ValueError, match="block_sizes.chunk must divide"):
    sh.score_histogram_kernel(scores, length, -1, block_sizes=sh.BlockSizes(128, 96),
                              interpret=True)
  with pytest.raises(ValueError, match="scores must be int16 or int32"):
    sh.score_histogram_kernel(scores.astype(jnp.uint8), length, -1, interpret=True)


def test_histogram_kernel_takes_int16_scores():
  """``hamming_similarity``'s int16 similarities are counted as they are (no widening pass)."""
  length, scores, _ = problem(5, score_max=255)
  want = numpy_histogram(scores, length, -1, 128, 256)
  got = sh.score_histogram_kernel(scores.astype(jnp.int16), length, -1, SINKS, LOCAL,
                                  sh.BlockSizes(block=128), interpret=True, bins=256)
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("seed", range(4))
def test_counting_plan_keeps_what_top_keeps(seed):
  """Many ties (scores 0..19 over hundreds of tokens), keeps from 0 to past the eligible
  count, an empty-ish row: the plan's set equals ``selection.top``'s, position by position."""
  length, scores, keep = problem(seed, score_max=[3, 20, 300, 1000][seed])
  capacity = scores.shape[-1]
  hist = sh.score_histogram_reference(scores, length, -1, SINKS, LOCAL, 128)
  threshold, need, ties_before, kept_before = selection.counting_plan(hist, keep, -1)
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  eligible = residual_mask(positions, length, SINKS, LOCAL)
  top, valid = selection.top(scores, eligible, 60, keep[..., None])
  want = selection.positions_mask(top, valid, capacity) | (
      ~eligible & (positions < length[:, None, None]))
  got = kept_by_plan(np.asarray(scores), np.asarray(length), np.asarray(threshold),
                     np.asarray(need))
  np.testing.assert_array_equal(got, np.asarray(want))
  # The kept positions, written per block from the counts, are top's list (the window
  # excluded), in the same order.
  args = (scores, length, threshold, need, ties_before, kept_before, SINKS, LOCAL, 60, 128)
  count = np.asarray(valid).sum(-1)
  for positions in (kp.kept_positions_reference(*args),
                    kp.kept_positions_kernel(*args, interpret=True)):
    for b, h in np.ndindex(count.shape):
      np.testing.assert_array_equal(np.asarray(positions)[b, h, :count[b, h]],
                                    np.asarray(top)[b, h, :count[b, h]])


def kept_by_plan(scores, length, threshold, need):
  """numpy: the exact window, every eligible token above the threshold, and the first
  ``need`` eligible ones at it."""
  kept = np.zeros(scores.shape, bool)
  for b, h in np.ndindex(scores.shape[:2]):
    ties = 0
    for j in range(length[b]):
      if not SINKS <= j < length[b] - LOCAL:
        kept[b, h, j] = True
      elif scores[b, h, j] > threshold[b, h]:
        kept[b, h, j] = True
      elif scores[b, h, j] == threshold[b, h]:
        kept[b, h, j] = ties < need[b, h]
        ties += 1
  return kept


@pytest.mark.parametrize("bins", [256, 1024])
def test_top_of_residual_lists_what_top_lists(bins):
  """The whole counting path (histograms, plan, kept positions) against ``selection.top``,
  with rows shorter than the exact window and keeps past the eligible count: the same valid
  slots, the same positions in them."""
  rng = np.random.default_rng(bins)
  capacity, size = 700, 80
  length = jnp.array([700, 333, SINKS + LOCAL - 3, 0], jnp.int32)
  scores = jnp.asarray(rng.integers(-1, bins - 1, size=(4, 3, capacity)), jnp.int32)
  keep = jnp.asarray(rng.integers(0, 2 * size, size=(4, 3, 1)), jnp.int32)
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  want_pos, want_valid = selection.top(scores, residual_mask(positions, length, SINKS, LOCAL),
                                       size, jnp.minimum(keep, size))
  got_pos, got_valid = selection.top_of_residual(scores, length, SINKS, LOCAL, size, keep,
                                                 (-1, bins - 2))
  np.testing.assert_array_equal(np.asarray(got_valid), np.asarray(want_valid))
  np.testing.assert_array_equal(np.where(want_valid, got_pos, 0),
                                np.where(want_valid, want_pos, 0))
  assert 0 < np.asarray(want_valid).sum() < want_valid.size  # full rows and capped ones


@pytest.mark.parametrize("per_query, chunk", [(False, 512), (True, 256), (False, 1024)])
def test_scoring_kernels_count_what_score_histogram_counts(per_query, chunk):
  """The fused variants of the Hamming kernels: the same scores, and block histograms equal
  to numpy's of those scores, eligible by the cache's length, which runs past the hashed
  length (those tokens score -1 and count); 2,500 tokens: a ragged last block of 1024,
  counted in chunks of ``chunk`` tokens."""
  group, dim, capacity = 4, 64, 2500
  rng = np.random.default_rng(9)
  q = ps.pack_signs_reference(jnp.asarray(rng.normal(size=(2, 2 * group, dim))))
  k = ps.pack_signs_reference(jnp.asarray(rng.normal(size=(2, 2, capacity, dim))))
  hashed = jnp.array([2400, 1000], jnp.int32)
  cache_length = jnp.array([2500, 1300], jnp.int32)
  lo, top = -1, (dim if per_query else group * dim)
  spec = sh.Histogram(lo, SINKS, LOCAL, sh.bins_for(top - lo + 1))
  kernel, reference = ((hs.hamming_similarity_kernel, hs.hamming_similarity_reference)
                       if per_query else (hs.hamming_scores_kernel, hs.hamming_scores_reference))
  scores, hist = kernel(q, k, hashed, dim, hs.BlockSizes(tokens=chunk), interpret=True,
                        histogram=spec, cache_length=cache_length)
  want_scores = reference(q, k, hashed, dim)
  np.testing.assert_array_equal(np.asarray(scores), np.asarray(want_scores))
  rows = want_scores.reshape(2, -1, capacity)
  want = numpy_histogram(rows, cache_length, lo, 1024, spec.bins)
  assert want[..., 0].sum() > 0  # unhashed eligible tokens, counted at -1
  np.testing.assert_array_equal(np.asarray(hist).reshape(want.shape), want)
  assert hist.shape == (2, 2, group if per_query else 1, 3, spec.bins)
  with pytest.raises(ValueError, match="cache_length must be"):
    kernel(q, k, hashed, dim, interpret=True, histogram=spec)
  with pytest.raises(ValueError, match="block_sizes.tokens must divide"):
    kernel(q, k, hashed, dim, hs.BlockSizes(tokens=384), interpret=True, histogram=spec,
           cache_length=cache_length)


def test_counted_scores_fused_or_not_agree(monkeypatch):
  """``hamming_*_counted``: the fused kernel (every kernel on) and the scores followed by
  ``score_histogram_kernel`` (the fused variant not enabled) give the same pair."""
  rng = np.random.default_rng(11)
  q = jnp.asarray(rng.integers(0, 2**32, size=(2, 8, 2), dtype=np.uint32))
  k = jnp.asarray(rng.integers(0, 2**32, size=(2, 2, 1500, 2), dtype=np.uint32))
  hashed, cache_length = jnp.array([1500, 600], jnp.int32), jnp.array([1500, 900], jnp.int32)
  for counted, top in ((hs.hamming_scores_counted, 4 * 64), (hs.hamming_similarity_counted, 64)):
    spec = sh.Histogram(-1, SINKS, LOCAL, sh.bins_for(top + 2))
    monkeypatch.setenv("SPARSE_ATTN_PALLAS", "0")
    want = counted(q, k, hashed, 64, cache_length, spec)
    monkeypatch.setenv("SPARSE_ATTN_PALLAS", "1")
    got = counted(q, k, hashed, 64, cache_length, spec)
    for a, b in zip(got, want):
      assert a.shape == b.shape
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
