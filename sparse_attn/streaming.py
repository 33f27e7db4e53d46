"""The exact set every sparse estimator keeps: attention sinks plus a local window.

StreamingLLM's observation, reused by MagicPIG and vAttention: the first few tokens
("sinks") and the most recent ones carry much of the attention mass, so they are attended
exactly and the estimators only approximate the rest (the *residual*).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_attn.attention import gather_rows, group_queries, make_result, row_scores
from sparse_attn.attention import softmax_attend
from sparse_attn.types import Estimator, KVCache, check_query, keep_index, no_index
from sparse_attn.types import configured, within_capacity


def check_window(sinks: int, local: int) -> None:
  """Raises ``ValueError`` unless ``sinks`` and ``local`` are non-negative ints."""
  for name, value in (("sinks", sinks), ("local", local)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def exact_positions(length: jax.Array, sinks: int, local: int,
                    capacity: int) -> tuple[jax.Array, jax.Array]:
  """Positions of the exact set: the first ``sinks`` and the last ``local`` valid tokens.

  Args:
    length: ``int32 [B]`` valid tokens per batch row.
    sinks, local: static sizes of the two windows.
    capacity: the cache capacity ``S``.

  Returns:
    ``(positions int32 [B, sinks + local], mask bool [B, sinks + local])``; a position that is
    invalid or already in the sink window (a cache shorter than ``sinks + local``) is masked
    and points at row 0, so that every position is a legal gather index.
  """
  sink_pos = jnp.broadcast_to(jnp.arange(sinks, dtype=jnp.int32), (length.shape[0], sinks))
  sink_ok = sink_pos < length[:, None]
  local_pos = length[:, None] - local + jnp.arange(local, dtype=jnp.int32)[None, :]
  local_ok = local_pos >= sinks
  positions = jnp.concatenate([sink_pos, local_pos], axis=1)
  mask = jnp.concatenate([sink_ok, local_ok], axis=1)
  positions = jnp.where(mask, jnp.clip(positions, 0, capacity - 1), 0)
  return positions, mask


def residual_mask(positions: jax.Array, length: jax.Array, sinks: int, local: int) -> jax.Array:
  """True where a token position is valid and outside the exact set (the residual).

  ``positions`` has shape ``[B, ...]``; ``length`` has shape ``[B]``.
  """
  n = length.reshape(length.shape + (1,) * (positions.ndim - 1))
  return (positions >= sinks) & (positions < n - local)


def exact_part(q: jax.Array, cache: KVCache, sinks: int, local: int):
  """Exact attention over the sinks and the local window, shared by each KV head's group.

  Returns:
    ``(out float32 [B, Hkv, G, D], lse float32 [B, Hkv, G], count float32 [B, 1, 1])``, the
    partial result of the exact set (to merge with an estimate of the residual) and its size.
  """
  keys, values, length = cache
  batch, num_kv_heads, capacity, head_dim = keys.shape
  if sinks + local == 0:  # no exact window: an empty part (merges as nothing)
    group = q.shape[1] // num_kv_heads
    return (jnp.zeros((batch, num_kv_heads, group, head_dim), jnp.float32),
            jnp.full((batch, num_kv_heads, group), -jnp.inf), jnp.zeros((batch, 1, 1)))
  positions, mask = exact_positions(length, sinks, local, capacity)
  positions = jnp.broadcast_to(positions[:, None, :], (batch, num_kv_heads, positions.shape[-1]))
  mask = mask[:, None, None, :]
  scores = row_scores(group_queries(q, num_kv_heads), gather_rows(keys, positions))
  out, lse = softmax_attend(scores, mask, gather_rows(values, positions))
  return out, lse, jnp.sum(mask, axis=-1).astype(jnp.float32)


@configured
def streaming(sinks: int = 4, local: int = 64) -> Estimator:
  """StreamingLLM: exact attention over the sinks and the local window only.

  Biased by design (the residual is dropped); a floor for comparisons and the exact part of
  the sampling estimators. ``stats``: ``selected``, ``valid``. Draws nothing: ``init`` and
  ``attend`` ignore their optional ``key``.

  Args:
    sinks: number of leading tokens kept.
    local: number of most recent tokens kept.
  """
  check_window(sinks, local)
  if sinks + local == 0:
    raise ValueError("streaming needs sinks + local > 0, got sinks=0 and local=0")

  def attend(q, cache, index, key=None):
    del index, key
    check_query(q, cache)
    return _attend(q, cache)

  @jax.jit
  def _attend(q, cache):
    cache, over = within_capacity(cache)
    out, lse, count = exact_part(q, cache, sinks, local)
    return make_result(q, out, lse, jnp.broadcast_to(count, lse.shape), cache, over)

  return Estimator(no_index, keep_index, attend)
