"""Top-k attention: exact attention over sinks + local + the k highest-scoring others.

With the ``"oracle"`` predictor the scores are the exact ``q . k`` over every valid key, so
it reads the whole cache: an upper bound on what a fast top-k predictor can reach, not a
fast method (``stats["read_all_keys"]`` says so).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparse_attn.attention import combine_lse, gather_rows, group_queries, make_result
from sparse_attn.attention import row_scores, softmax_attend
from sparse_attn.streaming import check_window, exact_part, residual_mask
from sparse_attn.types import Estimator, check_query, keep_index, no_index

PREDICTORS = ("oracle",)


def topk(k: int | None = None, fraction: float | None = None, sinks: int = 4, local: int = 64,
         predictor: str = "oracle") -> Estimator:
  """Top-k estimator.

  Args:
    k: number of residual tokens kept per query head; or
    fraction: keep ``ceil(fraction * n)`` of the ``n`` valid tokens of each row.
    sinks, local: sizes of the exact set.
    predictor: how tokens are ranked; ``"oracle"`` (exact ``q . k``).

  Returns:
    An ``Estimator``; ``stats``: ``selected``, ``valid``, ``read_all_keys``.
  """
  if (k is None) == (fraction is None):
    raise ValueError(f"give exactly one of k or fraction, got k={k!r}, fraction={fraction!r}")
  if k is not None and (not isinstance(k, int) or k < 1):
    raise ValueError(f"k must be a positive int, got {k!r}")
  if fraction is not None and not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  if predictor not in PREDICTORS:
    raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
  check_window(sinks, local)

  def attend(q, cache, index, key=None):
    del index, key
    check_query(q, cache)
    return _attend(q, cache)

  @jax.jit
  def _attend(q, cache):
    keys, values, length = cache
    capacity = keys.shape[2]
    qg = group_queries(q, keys.shape[1])
    scores = row_scores(qg, keys)  # the oracle reads every key: [B, Hkv, G, S]
    positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, None, :]
    residual = residual_mask(positions, length, sinks, local)
    k_max = min(capacity, k if k is not None else math.ceil(fraction * capacity))
    top_scores, top_pos = jax.lax.top_k(jnp.where(residual, scores, -jnp.inf), k_max)
    if k is not None:
      keep = k
    else:
      keep = jnp.ceil(fraction * length.astype(jnp.float32)).astype(jnp.int32)
      keep = keep[:, None, None, None]
    top_mask = (jnp.arange(k_max)[None, None, None, :] < keep) & jnp.isfinite(top_scores)
    top_pos = top_pos.astype(jnp.int32)
    out_t, lse_t = softmax_attend(top_scores, top_mask, gather_rows(values, top_pos))
    out_e, lse_e, exact = exact_part(q, cache, sinks, local)
    out, lse = combine_lse([out_e, out_t], [lse_e, lse_t])
    selected = jnp.sum(top_mask, -1).astype(jnp.float32) + exact
    return make_result(q, out, lse, selected, cache,
                       read_all_keys=jnp.ones(lse.shape, jnp.bool_))

  return Estimator(no_index, keep_index, attend)
