"""Static-size lists of token positions: the top ``k`` by score, or every marked token.

Under ``jit`` a selection is a list of ``size`` positions plus a validity mask. XLA:CPU's
``lax.top_k`` and scatter-based compaction cost several times more than the attention over
the selected rows at 128K tokens, so both selections here are built from passes that
vectorise: a bisection for the score threshold (``compare`` and ``sum``), the chosen
tokens packed 32 to a word, a prefix sum of the words' popcounts, and a binary search of
each output slot in it (then within its word). At 128K tokens: the top 2% of 8 rows of
Hamming scores in 4 ms against 10 ms for ``lax.top_k``; 32 rows compacted into 4588 slots in
3.6 ms against 34 ms for cumsum + scatter. The positions come back in ascending order
(which also makes the row gathers that follow read memory in order).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import backend, kept_positions, score_histogram
from pallas_kernels.pack_signs import pack_signs_reference

_INT32_MIN = -(2**31)


def order_keys(scores: jax.Array) -> jax.Array:
  """``int32`` keys that order like ``scores`` (float or int): ``a < b`` iff ``key(a) < key(b)``.

  Floats are mapped through their bit pattern (negative floats reversed), so ``-inf`` and
  ``inf`` order correctly; NaN is not a valid score.
  """
  if jnp.issubdtype(scores.dtype, jnp.integer):
    return scores.astype(jnp.int32)
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, jnp.int32(_INT32_MIN) - bits - 1, bits)


def _pack(mask: jax.Array) -> jax.Array:
  """``bool [..., S] -> uint32 [..., ceil(S/32)]``, bit ``j`` of word ``w`` = ``mask[32 w + j]``."""
  return pack_signs_reference(mask.astype(jnp.int8))


def _low_bits(x: jax.Array, n: jax.Array) -> jax.Array:
  """The lowest ``n`` bits of ``x`` (``0 <= n <= 32``)."""
  ones = jnp.uint32(0xFFFFFFFF)
  return jnp.where(n >= 32, x, x & ~(ones << jnp.minimum(n, 31).astype(jnp.uint32)))


def _nth_set_bits(words: jax.Array, ranks: jax.Array) -> jax.Array:
  """Position of the ``r``-th set bit (``r >= 1``) of the bit string ``words [..., W]``,
  for each ``r`` in ``ranks int32 [..., N]``; ``32 W`` (past the end) where there are
  fewer than ``r``.

  Work is ``O(W)`` per row for the popcount prefix, then ``O(N log W)``: much less than a
  prefix sum over the ``32 W`` positions themselves.
  """
  counts = jax.lax.population_count(words).astype(jnp.int32)
  cumulative = jax.lax.associative_scan(jnp.add, counts, axis=-1)  # set bits in words <= w
  num_words = words.shape[-1]
  flat_cum = cumulative.reshape(-1, num_words)
  flat_ranks = ranks.reshape(-1, ranks.shape[-1])
  # The default binary search is a loop: on an accelerator every trip is a launch.
  method = "scan" if backend.platform() == "cpu" else "scan_unrolled"
  word = jax.vmap(lambda c, r: jnp.searchsorted(c, r, side="left", method=method))(
      flat_cum, flat_ranks)
  word = word.astype(jnp.int32).reshape(ranks.shape)
  past_end = word >= num_words
  word = jnp.minimum(word, num_words - 1)
  x = jnp.take_along_axis(words, word, axis=-1)
  before = jnp.take_along_axis(cumulative, word, axis=-1) - jnp.take_along_axis(
      counts, word, axis=-1)
  r = ranks - before  # rank within the word, 1..popcount(x)
  # Smallest bit b with popcount(low b+1 bits) >= r: five halvings of [0, 31].
  lo, hi = jnp.zeros_like(r), jnp.full_like(r, 31)
  for _ in range(5):
    mid = (lo + hi) // 2
    enough = jax.lax.population_count(_low_bits(x, mid + 1)).astype(jnp.int32) >= r
    lo, hi = jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
  return jnp.where(past_end, 32 * num_words, 32 * word + lo)


def compact(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The first ``size`` True positions of ``mask [..., S]``, in ascending order.

  Returns:
    ``(positions int32 [..., size], valid bool [..., size], overflow int32 [...])``;
    ``overflow`` counts the True positions that did not fit. Invalid slots hold legal
    (in-bounds, possibly repeated) positions.
  """
  words = _pack(mask)
  total = jnp.sum(jax.lax.population_count(words).astype(jnp.int32), axis=-1)
  ranks = jnp.broadcast_to(jnp.arange(1, size + 1, dtype=jnp.int32), mask.shape[:-1] + (size,))
  positions = jnp.minimum(_nth_set_bits(words, ranks), mask.shape[-1] - 1)
  valid = ranks <= total[..., None]
  return positions, valid, jnp.maximum(total - size, 0)


def top(scores: jax.Array, eligible: jax.Array, size: int,
        keep: jax.Array | int, score_range: tuple[int, int] | None = None,
        counting: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """The ``keep`` highest-scoring eligible tokens, in a static list of ``size``.

  Ties at the threshold score go to the lowest positions. Exactly
  ``min(keep, number eligible)`` slots are valid.

  Args:
    scores: ``[..., S]``, float (no NaN) or integer.
    eligible: ``bool [..., S]``.
    size: static list size, ``1 <= size <= S``.
    keep: how many to keep (``<= size``): an int or an int array broadcastable to ``[..., 1]``.
    score_range: ``(lo, hi)`` for integer scores whose eligible values all lie in
      ``[lo, hi]`` (Hamming similarities, table matches): the threshold may then come from
      counting (``counting_threshold``) instead of a bisection. Static.
    counting: use counting (needs ``score_range``); None: where it is the faster way
      (``prefers_counting``).

  Returns:
    ``(positions int32 [..., size], valid bool [..., size])``, positions ascending.
  """
  keys = jnp.where(eligible, order_keys(scores), _INT32_MIN)
  want = jnp.minimum(jnp.asarray(keep, jnp.int32), size)
  if counting is None:
    counting = score_range is not None and prefers_counting()
  if counting:
    if score_range is None or not jnp.issubdtype(scores.dtype, jnp.integer):
      raise ValueError("counting selection needs integer scores and score_range, got "
                       f"{scores.dtype} scores and score_range={score_range!r}")
    lo, hi = score_range
    want, threshold = counting_threshold(jnp.where(eligible, keys - lo, -1), eligible, want,
                                         hi - lo)
    threshold = threshold + lo
  else:
    want, threshold = _threshold(keys, eligible, want)
  above = (keys > threshold) & eligible
  ties = (keys == threshold) & eligible
  # Every token above the threshold, and the first (want - count above) of the ties: those
  # before the position of that tie.
  need = want - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
  last_tie = _nth_set_bits(_pack(ties), jnp.maximum(need, 1))
  positions = jnp.arange(keys.shape[-1], dtype=jnp.int32).reshape((1,) * (keys.ndim - 1) + (-1,))
  chosen = above | (ties & (positions <= last_tie) & (need > 0))
  return compact(chosen, size)[:2]


def kth_largest(scores: jax.Array, eligible: jax.Array, keep: jax.Array) -> jax.Array:
  """``float32 [...]``: the ``keep [...]``-th largest eligible score of ``scores [..., S]``
  (float, no NaN); the smallest eligible one when fewer are eligible, ``-inf`` when none,
  ``inf`` when ``keep < 1``."""
  keep = jnp.asarray(keep, jnp.int32)
  keys = jnp.where(eligible, order_keys(scores), _INT32_MIN)
  _, key = _threshold(keys, eligible, jnp.maximum(keep, 1)[..., None])
  bits = jnp.where(key < 0, jnp.int32(_INT32_MIN) - key - 1, key)  # order_keys inverted
  value = jax.lax.bitcast_convert_type(bits, jnp.float32)[..., 0]
  return jnp.where(keep < 1, jnp.inf, jnp.where(jnp.any(eligible, -1), value, -jnp.inf))


def counts_with_kernels(score_range: tuple[int, int] | None) -> bool:
  """Whether ``top_of_residual`` takes integer scores in ``score_range``: on accelerators
  whose kernels are used, for ranges that fit the histograms."""
  return (score_range is not None and score_range[1] - score_range[0] < score_histogram.BINS
          and backend.use_kernels("kept_positions"))


def histogram_for(score_range: tuple[int, int], sinks: int,
                  local: int) -> score_histogram.Histogram:
  """What ``top_of_residual`` counts: the residual's scores in ``score_range``, in the
  fewest bins that hold it."""
  lo, hi = score_range
  return score_histogram.Histogram(lo, sinks, local, score_histogram.bins_for(hi - lo + 1))


def top_of_residual(scores: jax.Array, length: jax.Array, sinks: int, local: int, size: int,
                    keep: jax.Array | int, score_range: tuple[int, int],
                    hist: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``top(scores, residual, size, keep, score_range)`` for the residual of an exact window
  (``sinks <= position < length - local``), by three kernels and no pass of XLA over the
  tokens: per-block score histograms, the plan drawn from them (``counting_plan``), and
  each block writing its kept positions to their slots (``pallas_kernels.kept_positions``).

  Args:
    scores: integer ``[B, ..., S]`` in ``[lo, hi] = score_range`` where eligible.
    length: ``int32 [B]``.
    sinks, local, size, score_range: static.
    keep: an int or an int array broadcastable to ``[B, ..., 1]``.
    hist: the scores' block histograms (``[B, ..., blocks, bins]`` of
      ``histogram_for(score_range, sinks, local)``), counted as they were scored
      (``Scorer.counted``), or None to count them here.

  Returns:
    ``(positions int32 [B, ..., size], valid bool [B, ..., size])``, as ``top``.
  """
  lead, capacity = scores.shape[:-1], scores.shape[-1]
  flat = scores.reshape(lead[0], -1, capacity)
  lo = score_range[0]
  block = score_histogram.BlockSizes().block
  if hist is None:
    bins = histogram_for(score_range, sinks, local).bins
    hist = score_histogram.score_histogram_kernel(flat, length, lo, sinks, local, bins=bins)
  hist = hist.reshape(flat.shape[:2] + hist.shape[-2:])
  keep = jnp.minimum(jnp.asarray(keep, jnp.int32), size)
  want = jnp.broadcast_to(keep, lead + (1,)).reshape(flat.shape[:2])
  threshold, need, ties_before, kept_before = counting_plan(hist, want, lo)
  positions = kept_positions.kept_positions_kernel(
      flat, length, threshold, need, ties_before, kept_before, sinks, local, size, block)
  # The histograms count every eligible token: no pass over them needed for their number.
  eligible = jnp.maximum(jnp.minimum(length.astype(jnp.int32) - local, capacity) - sinks, 0)
  count = jnp.minimum(want, eligible[:, None])
  valid = jnp.arange(size, dtype=jnp.int32)[None, None, :] < count[..., None]
  positions = jnp.where(valid, positions, 0)  # the contract's legal positions
  return positions.reshape(lead + (size,)), valid.reshape(lead + (size,))


def compact_at_least(scores: jax.Array, minimum: int, length: jax.Array, sinks: int,
                     local: int, size: int) -> tuple[jax.Array, jax.Array]:
  """Every residual token (``sinks <= position < length - local``) whose integer score is
  at least ``minimum``, ascending, in a list of ``size``: ``compact`` of that mask.

  Where the kernels are used, without ``compact``'s dozen small passes: the marked tokens
  are counted per block (one reduction), and each block writes its own to their slots
  (``pallas_kernels.kept_positions`` with the threshold ``minimum - 1`` and no ties).

  Args:
    scores: integer ``[B, ..., S]`` (any width); length: ``int32 [B]``.
    minimum, sinks, local, size: static.

  Returns:
    ``(positions int32 [B, ..., size], valid bool [B, ..., size])``; the marked tokens past
    ``size`` are dropped (the caller counts them).
  """
  lead, capacity = scores.shape[:-1], scores.shape[-1]
  positions = jnp.arange(capacity, dtype=jnp.int32).reshape((1,) * len(lead) + (capacity,))
  length = length.reshape((-1,) + (1,) * len(lead))
  marked = ((scores >= minimum) & (positions >= sinks) & (positions < length - local))
  if not backend.use_kernels("kept_positions"):
    return compact(marked, size)[:2]
  flat = scores.reshape(lead[0], -1, capacity)
  block = score_histogram.BlockSizes().block
  blocks = -(-capacity // block)
  per_block = jnp.sum(jnp.pad(marked.reshape(flat.shape), [(0, 0), (0, 0), (
      0, blocks * block - capacity)]).reshape(flat.shape[:2] + (blocks, block)), axis=-1,
                      dtype=jnp.int32)
  rows = flat.shape[:2]
  out = kept_positions.kept_positions_kernel(
      flat, length.reshape(-1), jnp.full(rows, minimum - 1, jnp.int32),
      jnp.zeros(rows, jnp.int32), jnp.zeros(rows + (blocks,), jnp.int32),
      jnp.cumsum(per_block, axis=-1, dtype=jnp.int32) - per_block, sinks, local, size, block)
  count = jnp.sum(per_block, axis=-1)
  valid = jnp.arange(size, dtype=jnp.int32)[None, None, :] < count[..., None]
  out = jnp.where(valid, out, 0)  # the contract's legal positions
  return out.reshape(lead + (size,)), valid.reshape(lead + (size,))


def prefers_counting() -> bool:
  """Whether small-integer scores should be thresholded by counting, not by bisection.

  On an accelerator each bisection step is a dependent pass (and a loop trip); counting
  makes two passes in all (H200, 128K tokens x 8 rows with the selection that follows: 175
  against 349 us). On XLA:CPU the bisection is the faster (4K tokens: 0.4-0.7 against
  1.8-4.2 ms; ``benchmarks/gpu_decode.py --small``).
  """
  return backend.platform() != "cpu"


def counting_threshold(keys: jax.Array, eligible: jax.Array, want: jax.Array,
                       score_range: int) -> tuple[jax.Array, jax.Array]:
  """``_threshold`` for integer keys in ``[0, score_range]`` (where eligible), by counting.

  The exact ``want``-th largest key follows from the counts ``#{keys >= t}``: a first pass
  counts against ``ceil((R + 1) / w)`` coarse edges ``t = 0, w, 2w, ...`` (``w`` about
  ``sqrt(R + 1)``), which brackets the threshold in one bucket of ``w`` values; a second
  pass counts against those ``w`` values. Two passes over the keys, no loop, no sort.

  Returns:
    ``(want, t)``, both ``[..., 1]``, as ``_threshold``.
  """
  count = jnp.sum(eligible, axis=-1, keepdims=True, dtype=jnp.int32)
  want = jnp.broadcast_to(jnp.minimum(want, count), keys.shape[:-1] + (1,))
  width = 1 << max(0, (math.isqrt(score_range) + 1).bit_length() - 1)
  lead = keys.shape[:-1]
  edges = jnp.broadcast_to(jnp.arange(0, score_range + 1, width, dtype=jnp.int32),
                           lead + (-(-(score_range + 1) // width),))

  def buckets_reaching(lower):  # [..., T]: how many edges t have #{keys >= t} >= want
    at_least = jnp.sum(keys[..., None, :] >= lower[..., :, None], axis=-1, dtype=jnp.int32)
    return jnp.sum(at_least >= want, axis=-1, keepdims=True, dtype=jnp.int32)

  # Counts fall as t rises, so the edges that reach want are a prefix; the last one is the
  # bucket (the first when want is 0).
  base = jnp.maximum(buckets_reaching(edges) - 1, 0) * width  # [..., 1]
  fine = base + jnp.arange(width, dtype=jnp.int32).reshape((1,) * len(lead) + (width,))
  return want, base + jnp.maximum(buckets_reaching(fine) - 1, 0)


def counting_plan(hist: jax.Array, want: jax.Array,
                  lo: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What ``top`` keeps, from per-block histograms of integer scores (no pass over tokens).

  Args:
    hist: ``int32 [..., blocks, V]``: ``hist[..., j, v]`` eligible tokens of block ``j``
      scoring ``lo + v`` (``pallas_kernels.score_histogram``).
    want: ``int [...]``: how many to keep (capped at the eligible count here).
    lo: the score of bin 0.

  Returns:
    ``(threshold, need, ties_before, kept_before)``: keep every eligible token scoring above
    ``threshold [...]`` and the first ``need [...]`` scoring exactly it, in position order;
    ``ties_before [..., blocks]`` and ``kept_before [..., blocks]`` count the eligible tokens
    scoring ``threshold``, and the kept ones, in the blocks before each block. The kept set
    is ``top``'s, ties included.
  """
  total = jnp.sum(hist, axis=-2)  # [..., V]
  at_least = jnp.flip(jnp.cumsum(jnp.flip(total, -1), axis=-1), -1)  # #{score >= lo + v}
  want = jnp.minimum(jnp.asarray(want, jnp.int32), at_least[..., 0])
  # Counts fall as v rises: the bins reaching want are a prefix, the last is the threshold.
  bin_ = jnp.maximum(jnp.sum(at_least >= want[..., None], axis=-1, dtype=jnp.int32) - 1, 0)
  above = jnp.take_along_axis(at_least, bin_[..., None], -1)[..., 0] - jnp.take_along_axis(
      total, bin_[..., None], -1)[..., 0]
  ties = jnp.take_along_axis(hist, jnp.broadcast_to(bin_[..., None, None],
                                                    hist.shape[:-1] + (1,)), -1)[..., 0]
  ties_before = jnp.cumsum(ties, axis=-1, dtype=jnp.int32) - ties
  need = want - above
  bins = jnp.arange(hist.shape[-1], dtype=jnp.int32).reshape((1,) * (hist.ndim - 1) + (-1,))
  above_in_block = jnp.sum(jnp.where(bins > bin_[..., None, None], hist, 0), axis=-1,
                           dtype=jnp.int32)
  kept = above_in_block + jnp.clip(need[..., None] - ties_before, 0, ties)
  return bin_ + lo, need, ties_before, jnp.cumsum(kept, axis=-1, dtype=jnp.int32) - kept


def _threshold(keys, eligible, want):
  """``(want, t)``, both ``[..., 1]``: ``want`` capped at the eligible count and the largest
  key ``t`` with ``count(keys >= t) >= want``."""
  count = jnp.sum(eligible, axis=-1, keepdims=True, dtype=jnp.int32)
  want = jnp.broadcast_to(jnp.minimum(want, count), keys.shape[:-1] + (1,))

  # Bisection over [min, max] of the eligible keys (about log2 of the key range passes: ~10
  # for Hamming scores).
  lo = jnp.min(jnp.where(eligible, keys, jnp.iinfo(jnp.int32).max), axis=-1, keepdims=True)
  hi = jnp.max(keys, axis=-1, keepdims=True)
  lo = jnp.minimum(lo, hi)

  def bisect(bounds):
    lo, hi = bounds
    # mid = lo + ceil((hi - lo) / 2) in uint32 arithmetic: hi - lo can exceed 2**31 for
    # float keys, and the wrap-around of the sum is exact since mid lies in [lo, hi].
    lo_u, hi_u = (jax.lax.bitcast_convert_type(x, jnp.uint32) for x in (lo, hi))
    mid = jax.lax.bitcast_convert_type(lo_u + (hi_u - lo_u) // 2 + (hi_u - lo_u) % 2,
                                       jnp.int32)
    enough = jnp.sum(keys >= mid, axis=-1, keepdims=True, dtype=jnp.int32) >= want
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

  # Each pass at least halves [lo, hi] (2**32 keys at most): 33 passes end every search; the
  # static bound makes termination independent of the keys.
  threshold, _, _ = jax.lax.while_loop(
      lambda b: jnp.any(b[0] < b[1]) & (b[2] < 33),
      lambda b: bisect(b[:2]) + (b[2] + 1,), (lo, hi, jnp.int32(0)))
  return want, threshold


def positions_mask(positions: jax.Array, valid: jax.Array, num_tokens: int) -> jax.Array:
  """``bool [..., num_tokens]``: True at the valid ``positions [..., N]``. Positions may
  repeat (invalid slots of ``top``/``compact``): a max-scatter, so an invalid repeat never
  unmarks a valid one."""
  lead = positions.shape[:-1]
  flat_pos = positions.reshape(-1, positions.shape[-1])
  flat_val = valid.reshape(-1, valid.shape[-1]).astype(jnp.int8)
  marks = jax.vmap(lambda p, v: jnp.zeros(num_tokens, jnp.int8).at[p].max(
      v, mode="promise_in_bounds"))(flat_pos, flat_val)
  return marks.reshape(lead + (num_tokens,)) > 0
