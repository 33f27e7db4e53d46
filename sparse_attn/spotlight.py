"""Spotlight Attention: retrieve by learned hash codes, attend exactly over the top tokens.

Keys are hashed once (``init``) or as they arrive (``append``) into ``D``-bit codes by the
learned hash heads (``sparse_attn.hash_heads``); a decode query of each KV head's group is
hashed with the same head, every cached token is scored by Hamming similarity summed over
the group (popcount over packed words: ``D / 8`` bytes read per token instead of the key's
``2 D`` or ``4 D``), and the top ``max(min(n, min_tokens), ceil(fraction * n))`` tokens are
attended exactly, shared by the group. Biased like any top-k method; its quality is the
overlap (IoU) of its top set with the exact one, which training raises.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparse_attn import predictors
from sparse_attn.attention import combine_lse, gather_rows, group_queries, make_result
from sparse_attn.attention import row_scores, softmax_attend
from sparse_attn.streaming import check_window, exact_part, residual_mask
from sparse_attn.topk import select_top
from sparse_attn.types import Estimator, check_cache, check_query


def spotlight(params: dict, fraction: float = 0.02, min_tokens: int = 20, sinks: int = 0,
              local: int = 0) -> Estimator:
  """Spotlight estimator.

  Args:
    params: hash-head parameters of this layer (``sa.hash_heads.init_params``, trained with
      ``sa.train.fit_hash_heads``).
    fraction: fraction of the valid tokens kept.
    min_tokens: keep at least ``min(n, min_tokens)`` tokens.
    sinks, local: an optional exact window kept on top of the retrieved tokens.

  Returns:
    An ``Estimator`` whose index holds the parameters and the packed key codes;
    ``stats``: ``selected``, ``valid``, ``read_all_keys`` (False).
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  if not isinstance(min_tokens, int) or min_tokens < 0:
    raise ValueError(f"min_tokens must be a non-negative int, got {min_tokens!r}")
  check_window(sinks, local)
  pred = predictors.spotlight(params)

  def init(cache, key=None):
    check_cache(cache)
    return pred.init(cache, key)

  def attend(q, cache, index, key=None):
    del key
    check_query(q, cache)
    return _attend(q, cache, index)

  @jax.jit
  def _attend(q, cache, index):
    keys, values, length = cache
    capacity = keys.shape[2]
    qg = group_queries(q, keys.shape[1])
    scores = pred.scores(qg, cache, index)[:, :, :1]  # [B, Hkv, 1, S]: shared by the group
    positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, None, :]
    eligible = residual_mask(positions, length, sinks, local)
    n = length.astype(jnp.float32)
    keep = jnp.maximum(jnp.minimum(n, min_tokens), jnp.ceil(fraction * n)).astype(jnp.int32)
    k_max = min(capacity, max(min_tokens, math.ceil(fraction * capacity)))
    top_pos, top_mask = select_top(scores, eligible, k_max, keep[:, None, None, None])
    top_pos, top_mask = top_pos[:, :, 0], top_mask[:, :, :1]  # [B, Hkv, N], [B, Hkv, 1, N]
    out_t, lse_t = softmax_attend(row_scores(qg, gather_rows(keys, top_pos)), top_mask,
                                  gather_rows(values, top_pos))
    out_e, lse_e, exact = exact_part(q, cache, sinks, local)
    out, lse = combine_lse([out_e, out_t], [lse_e, lse_t])
    selected = jnp.broadcast_to(jnp.sum(top_mask, -1).astype(jnp.float32) + exact, lse.shape)
    return make_result(q, out, lse, selected, cache,
                       read_all_keys=jnp.zeros(lse.shape, jnp.bool_))

  return Estimator(init, pred.append, attend)
