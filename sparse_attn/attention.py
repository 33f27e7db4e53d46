r"""Exact decode attention, attention over gathered rows, and log-sum-exp merging.

Scores are :math:`s_i = q \cdot k_i / \sqrt{D}`, accumulated in float32 whatever the input
dtype. Every result carries ``lse = log sum_i exp(s_i)`` (over the tokens it covers, with
importance weights where an estimator uses them), which makes partial results mergeable:
``merge([attend(part_a), attend(part_b)])`` over disjoint token sets is the attention over
their union.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import decode_attention, sparse_decode_attention
from sparse_attn.types import AttentionResult, Estimator, KVCache, check_query, keep_index, no_index
from sparse_attn.types import configured, within_capacity

# float32 products stay float32 on every backend (GPUs would otherwise use TF32, whose
# 10-bit mantissa alone costs ~1e-3 relative error). Decode attention is memory-bound,
# so the full-precision FMAs cost little; bf16 inputs are unaffected.
HIGHEST = jax.lax.Precision.HIGHEST


def group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """``[B, Hq, D] -> float32 [B, Hkv, G, D]`` (query heads of a GQA group are adjacent)."""
  batch, num_q_heads, head_dim = q.shape
  return q.astype(jnp.float32).reshape(
      batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)


def gather_rows(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Gathers token rows of a cache array.

  Args:
    x: ``[B, Hkv, S, D]``.
    indices: ``int32 [B, Hkv, N]`` (one list per KV head, shared by its group) or
      ``int32 [B, Hkv, G, N]`` (one list per query head). Must lie in ``[0, S)``.

  Returns:
    ``[B, Hkv, N, D]`` or ``[B, Hkv, G, N, D]``, in ``x.dtype``.
  """
  if indices.ndim == 3:
    return jnp.take_along_axis(x, indices[..., None], axis=2, mode="promise_in_bounds")
  batch, num_kv_heads, group, n = indices.shape
  flat = indices.reshape(batch, num_kv_heads, group * n, 1)
  rows = jnp.take_along_axis(x, flat, axis=2, mode="promise_in_bounds")
  return rows.reshape(batch, num_kv_heads, group, n, x.shape[-1])


def row_scores(qg: jax.Array, k_rows: jax.Array) -> jax.Array:
  """``q.k / sqrt(D)`` in float32: ``qg [B, Hkv, G, D]`` against rows from ``gather_rows``."""
  scale = 1.0 / math.sqrt(qg.shape[-1])
  k32 = k_rows.astype(jnp.float32)
  if k_rows.ndim == 4:
    return jnp.einsum("bhgd,bhnd->bhgn", qg, k32, precision=HIGHEST) * scale
  return jnp.einsum("bhgd,bhgnd->bhgn", qg, k32, precision=HIGHEST) * scale


def attend_rows(q: jax.Array, cache: KVCache, positions: jax.Array, count: jax.Array,
                log_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention over listed cache rows only: the estimators' gather path.

  Reads the first ``count`` listed K/V rows of each list and nothing else
  (``pallas_kernels.sparse_decode_attention``: the Pallas kernel on verified accelerators,
  its chunked jnp twin on CPU, which never materialises the gathered rows either).

  Args:
    q: ``[B, Hq, D]``.
    cache: the ``KVCache``.
    positions: ``int32 [B, Hkv, N]`` (one list per KV head, shared by its group) or
      ``[B, Hkv, G, N]`` (one list per query head); entries in ``[0, S)``.
    count: ``int [B, Hkv]`` or ``[B, Hkv, G]``: entries ``[0, count)`` are valid.
    log_weights: like ``positions``, subtracted from the scores (importance weights
      ``1/w`` enter as ``log w``); None for none; or a ``ScoreWeights`` (weights computed
      from each listed key's score in the same pass; its ``params`` per query head,
      ``[B, Hq, P]``).

  Returns:
    ``(out float32 [B, Hkv, G, D], lse float32 [B, Hkv, G])``, as ``softmax_attend``.
  """
  batch, num_q, head_dim = q.shape
  num_kv = cache.keys.shape[1]
  lists = positions.shape[0], -1, positions.shape[-1]
  if isinstance(log_weights, sparse_decode_attention.ScoreWeights):
    num_lists = math.prod(positions.shape[1:-1])
    log_weights = log_weights._replace(params=log_weights.params.reshape(
        batch, num_lists, num_q // num_lists, log_weights.params.shape[-1]))
  elif log_weights is not None:
    log_weights = log_weights.reshape(lists)
  out, lse = sparse_decode_attention.sparse_decode_attention(
      q, cache.keys, cache.values, positions.reshape(lists), log_weights,
      count.reshape(batch, -1))
  group = num_q // num_kv
  return out.reshape(batch, num_kv, group, head_dim), lse.reshape(batch, num_kv, group)


def softmax_attend(scores: jax.Array, mask: jax.Array,
                   v_rows: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax-weighted sum of value rows, stable for any scores and empty masks.

  Args:
    scores: ``float32 [B, Hkv, G, N]``, already shifted by ``-log w`` where importance
      weights ``1/w`` apply.
    mask: ``bool``, broadcastable to ``scores`` with the same rank; False rows are ignored.
    v_rows: ``[B, Hkv, N, D]`` or ``[B, Hkv, G, N, D]``.

  Returns:
    ``(out float32 [B, Hkv, G, D], lse float32 [B, Hkv, G])``; where no row is valid,
    ``out = 0`` and ``lse = -inf`` (never NaN).
  """
  masked = jnp.where(mask, scores, -jnp.inf)
  m = jnp.max(masked, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(mask, jnp.exp(masked - m), 0.0)
  denom = jnp.sum(e, axis=-1)
  v32 = v_rows.astype(jnp.float32)
  if v_rows.ndim == 4:
    num = jnp.einsum("bhgn,bhnd->bhgd", e, v32, precision=HIGHEST)
  else:
    num = jnp.einsum("bhgn,bhgnd->bhgd", e, v32, precision=HIGHEST)
  safe = jnp.where(denom > 0, denom, 1.0)
  out = num / safe[..., None]
  lse = jnp.where(denom > 0, m[..., 0] + jnp.log(safe), -jnp.inf)
  return out, lse


def combine_lse(outs: Sequence[jax.Array],
                lses: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Log-sum-exp combination of partial ``(out [..., D], lse [...])`` pairs, in float32.

  Parts with ``lse = -inf`` (no token) get weight 0; if every part is empty the result is
  ``(0, -inf)``, never NaN.
  """
  lse = jnp.stack(lses)
  m = jnp.max(lse, axis=0, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse - m)  # exp(-inf) = 0 for empty parts
  total = jnp.sum(w, axis=0)
  num = sum(wi[..., None] * o.astype(jnp.float32) for wi, o in zip(w, outs))
  safe = jnp.where(total > 0, total, 1.0)
  return num / safe[..., None], jnp.where(total > 0, m[0] + jnp.log(safe), -jnp.inf)


def valid_counts(cache: KVCache, num_q_heads: int) -> jax.Array:
  """``float32 [B, Hq]``: the number of valid tokens (at most ``S``), per query head."""
  n = jnp.clip(cache.length, 0, cache.keys.shape[2]).astype(jnp.float32)[:, None]
  return jnp.broadcast_to(n, (n.shape[0], num_q_heads))


def nan_together(out: jax.Array, lse: jax.Array,
                 nonfinite: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(out [..., D], lse [...])`` with both NaN wherever either is not a valid result (a NaN
  or inf in ``out``, a NaN or ``+inf`` ``lse``) or ``nonfinite`` (bool, broadcastable to
  ``lse``) is True. Never changes a result of finite inputs."""
  bad = jnp.isnan(lse) | (lse == jnp.inf) | jnp.any(~jnp.isfinite(out), axis=-1)
  if nonfinite is not None:
    bad = bad | nonfinite
  return jnp.where(bad[..., None], jnp.nan, out), jnp.where(bad, jnp.nan, lse)


def make_result(q: jax.Array, out: jax.Array, lse: jax.Array, selected: jax.Array,
                cache: KVCache, over_capacity: jax.Array | None = None,
                nonfinite: jax.Array | None = None, **stats: jax.Array) -> AttentionResult:
  """Assembles an ``AttentionResult`` from grouped ``[B, Hkv, G, ...]`` arrays.

  ``stats["over_capacity"]`` (bool) is ``over_capacity [B]`` (from ``within_capacity``) or,
  if None, ``cache.length > S``. ``nonfinite`` (bool, broadcastable to ``lse``): heads whose
  valid tokens include a non-finite key; their ``out`` and ``lse`` become NaN, as do those of
  any head whose ``out`` or ``lse`` already is (``nan_together``).
  """
  batch, num_q_heads, head_dim = q.shape
  out, lse = nan_together(out, lse, nonfinite)
  selected = selected.reshape(batch, num_q_heads).astype(jnp.float32)
  valid = valid_counts(cache, num_q_heads)
  density = selected / jnp.maximum(valid, 1.0)
  if over_capacity is None:
    over_capacity = cache.length > cache.keys.shape[2]
  stats = {k: v.reshape(batch, num_q_heads) for k, v in stats.items()}
  stats.update(selected=selected, valid=valid, over_capacity=jnp.broadcast_to(
      over_capacity[:, None], (batch, num_q_heads)))
  return AttentionResult(
      out=out.reshape(batch, num_q_heads, head_dim).astype(q.dtype),
      lse=lse.reshape(batch, num_q_heads),
      density=density,
      stats=stats)


def dense_attention(q: jax.Array, cache: KVCache) -> AttentionResult:
  """Exact decode attention over every valid token (GQA, ragged lengths).

  Args:
    q: ``[B, Hq, D]`` decode queries (bf16, f16 or f32).
    cache: ``KVCache`` with ``keys, values [B, Hkv, S, D]`` and ``length int32 [B]``.

  Returns:
    ``AttentionResult`` with ``density = 1`` (every valid token is read).
  """
  check_query(q, cache)
  return _dense_attention(q, cache)


@jax.jit
def _dense_attention(q: jax.Array, cache: KVCache) -> AttentionResult:
  cache, over = within_capacity(cache)
  keys, values, length = cache
  # The split-K flash-decode kernel on verified accelerators, its jnp twin elsewhere; both
  # make a head NaN (out and lse) when a valid key of it is NaN or inf.
  out, lse = decode_attention.decode_attention(q, keys, values, length)
  selected = jnp.broadcast_to(length.astype(jnp.float32)[:, None], lse.shape)
  return make_result(q, out, lse, selected, cache, over)


def merge(results: Sequence[AttentionResult]) -> AttentionResult:
  r"""Combines results over disjoint token sets of the same queries, exactly.

  ``out = sum_r exp(lse_r - lse) out_r`` with ``lse = logsumexp_r lse_r``. Stats present in
  every part are combined: boolean ones by ``or``, numeric ones by ``+`` (counts such as
  ``selected`` and ``valid`` add up over disjoint parts); ``density`` is recomputed as
  ``selected / valid``.

  Args:
    results: a non-empty sequence of ``AttentionResult`` with equal shapes.

  Returns:
    The merged ``AttentionResult`` (``out`` in the first part's dtype).
  """
  results = list(results)
  if not results:
    raise ValueError("results must be a non-empty sequence of AttentionResult")
  shape = results[0].out.shape
  for i, r in enumerate(results):
    if not isinstance(r, AttentionResult):
      raise ValueError(f"results[{i}] must be an AttentionResult, got {type(r).__name__}")
    if r.out.shape != shape or r.lse.shape != shape[:2]:
      raise ValueError(
          f"results[{i}] has out {tuple(r.out.shape)} / lse {tuple(r.lse.shape)}; expected "
          f"out {tuple(shape)} and lse {tuple(shape[:2])} like results[0]")
    for needed in ("selected", "valid"):
      if needed not in r.stats:
        raise ValueError(f"results[{i}].stats lacks '{needed}', needed to merge density")
  out, merged_lse = combine_lse([r.out for r in results], [r.lse for r in results])
  out, merged_lse = nan_together(out, merged_lse)  # a NaN part makes the whole NaN
  out = out.astype(results[0].out.dtype)
  common = set(results[0].stats).intersection(*(r.stats for r in results[1:]))
  stats = {}
  for name in sorted(common):
    parts = [r.stats[name] for r in results]
    if parts[0].dtype == jnp.bool_:
      stats[name] = jnp.any(jnp.stack(parts), axis=0)
    else:
      stats[name] = sum(parts[1:], parts[0])
  density = stats["selected"] / jnp.maximum(stats["valid"], 1.0)
  return AttentionResult(out, merged_lse, density.astype(jnp.float32), stats)


@configured
def dense() -> Estimator:
  """The exact estimator: ``dense_attention`` behind the ``Estimator`` interface. Draws
  nothing: ``init`` and ``attend`` ignore their optional ``key``."""

  def attend(q, cache, index, key=None):
    del index, key
    return dense_attention(q, cache)

  return Estimator(no_index, keep_index, attend)
