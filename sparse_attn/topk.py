"""Top-k and top-p attention: exact attention over the best-ranked tokens only.

``topk`` keeps the sinks, the local window and the ``k`` residual tokens ranked highest by
a predictor (``sparse_attn.predictors``), and attends exactly (true keys) over them. With
the oracle predictor the ranking is the exact ``q . k``, so it reads the whole cache:
an upper bound on what a fast top-k predictor can reach, not a fast method
(``stats["read_all_keys"]`` says so). ``topp`` is the oracle's top-p: the smallest set
holding attention mass at least ``p``.

Biased by design (the unselected tokens are dropped): these are the deterministic part of
vAttention and the comparison points for the sampling estimators.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparse_attn import predictors
from sparse_attn._src import scoring, selection
from sparse_attn.attention import attend_rows, combine_lse, group_queries
from sparse_attn.attention import make_result, row_scores, softmax_attend
from sparse_attn.streaming import check_window, exact_part, residual_mask
from sparse_attn.types import Estimator, check_cache, check_query, configured, keep_index
from sparse_attn.types import donated_index_hint, no_index, within_capacity


@configured
def topk(k: int | None = None, fraction: float | None = None, sinks: int = 4, local: int = 64,
         predictor: predictors.Predictor = predictors.oracle(),
         min_tokens: int = 0) -> Estimator:
  """Top-k estimator.

  Args:
    k: number of residual tokens kept per query head; or
    fraction: keep ``max(min(n, min_tokens), ceil(fraction * n))`` for the ``n`` valid
      tokens of each row.
    sinks, local: sizes of the exact set.
    predictor: how tokens are ranked: ``sa.predictors.oracle()`` (exact scores, reads every
      key), ``sa.predictors.simhash(bits=128)`` or ``sa.predictors.spotlight(params)``.
    min_tokens: with ``fraction``, keep at least ``min(n, min_tokens)`` tokens.

  Returns:
    An ``Estimator`` (its index is the predictor's state); ``stats``: ``selected``,
    ``valid``, ``read_all_keys``. Keys: ``attend`` draws nothing; ``init`` consumes its
    ``key`` only with the SimHash predictor (the planes; then required). When the
    predictor scores a GQA group alike (Spotlight), the group shares one selection and its
    rows are gathered once.
  """
  if (k is None) == (fraction is None):
    raise ValueError(f"give exactly one of k or fraction, got k={k!r}, fraction={fraction!r}")
  if k is not None and (not isinstance(k, int) or k < 1):
    raise ValueError(f"k must be a positive int, got {k!r}")
  if fraction is not None and not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  if not isinstance(min_tokens, int) or min_tokens < 0:
    raise ValueError(f"min_tokens must be a non-negative int, got {min_tokens!r}")
  check_window(sinks, local)
  pred = predictors.check(predictor).scorer(sinks, local)

  def init(cache, key=None):  # only the "simhash" predictor draws from the key
    check_cache(cache)
    return pred.init(cache, key)

  def attend(q, cache, index, key=None):
    del key
    check_query(q, cache)
    with donated_index_hint():
      return _attend(q, cache, index)

  @jax.jit
  def _attend(q, cache, index):
    cache, over = within_capacity(cache)
    keys, values, length = cache
    capacity = keys.shape[2]
    qg = group_queries(q, keys.shape[1])
    score_range = pred.score_range and pred.score_range(qg.shape[2], qg.shape[3])
    counting = selection.counts_with_kernels(score_range)
    hist = None
    if counting and pred.counted is not None:  # histograms counted as the scores are made
      scores, hist = pred.counted(qg, cache, index,
                                  selection.histogram_for(score_range, sinks, local))
    else:
      scores = pred.scores(qg, cache, index)  # [B, Hkv, G, S]
    if pred.shared_by_group:
      scores = scores[:, :, :1]
    positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, None, :]
    residual = residual_mask(positions, length, sinks, local)
    if k is not None:
      k_max, keep = min(capacity, k), k
    else:
      k_max = min(capacity, max(min_tokens, math.ceil(fraction * capacity)))
      n = length.astype(jnp.float32)
      keep = jnp.maximum(jnp.minimum(n, min_tokens), jnp.ceil(fraction * n)).astype(jnp.int32)
      keep = keep[:, None, None, None]
    if counting:
      top_pos, top_mask = selection.top_of_residual(scores, length, sinks, local, k_max, keep,
                                                    score_range, hist)
    else:
      top_pos, top_mask = selection.top(scores, residual, k_max, keep, score_range)
    count = jnp.sum(top_mask, axis=-1, dtype=jnp.int32)  # valid entries come first
    if pred.shared_by_group:  # one list per KV head: its rows are read once for the group
      top_pos, count = top_pos[:, :, 0], count[:, :, 0]
    out_t, lse_t = attend_rows(q, cache, top_pos, count)
    out_e, lse_e, exact = exact_part(q, cache, sinks, local)
    out, lse = combine_lse([out_e, out_t], [lse_e, lse_t])
    selected = jnp.broadcast_to(jnp.sum(top_mask, -1).astype(jnp.float32) + exact, lse.shape)
    return make_result(q, out, lse, selected, cache, over,
                       scoring.nonfinite_keys(pred, index, scores, length),
                       read_all_keys=jnp.full(lse.shape, pred.reads_all_keys))

  return Estimator(init, pred.append, attend)


@configured
def topp(p: float) -> Estimator:
  """Oracle top-p: exact attention over the smallest set of tokens holding mass >= ``p``.

  Reads every key and value (an upper bound for comparisons). Ties at the threshold score
  are all kept. ``stats``: ``selected``, ``valid``, ``read_all_keys``.

  Args:
    p: attention mass to keep, in (0, 1].
  """
  if not 0.0 < p <= 1.0:
    raise ValueError(f"p must be in (0, 1], got {p!r}")

  def attend(q, cache, index, key=None):
    del index, key
    check_query(q, cache)
    return _attend(q, cache)

  @jax.jit
  def _attend(q, cache):
    cache, over = within_capacity(cache)
    keys, values, length = cache
    scores = row_scores(group_queries(q, keys.shape[1]), keys)
    positions = jnp.arange(keys.shape[2], dtype=jnp.int32)[None, None, None, :]
    valid = positions < length[:, None, None, None]
    masked = jnp.where(valid, scores, -jnp.inf)
    ordered = -jnp.sort(-masked, axis=-1)  # descending
    probs = jax.nn.softmax(ordered, axis=-1, where=jnp.isfinite(ordered))
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each rank
    count = jnp.sum((before < p) & jnp.isfinite(ordered), axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, jnp.maximum(count - 1, 0), axis=-1)
    mask = valid & (scores >= threshold)
    out, lse = softmax_attend(scores, mask, values)
    nonfinite = jnp.any(valid & ~jnp.isfinite(scores), axis=-1)
    return make_result(q, out, lse, jnp.sum(mask, -1).astype(jnp.float32), cache, over,
                       nonfinite,
                       read_all_keys=jnp.ones(lse.shape, jnp.bool_))

  return Estimator(no_index, keep_index, attend)
