"""Per-token key state that is built at prefill and extended at every decode step.

MagicPIG's tables and the SimHash / learned-hash predictors keep, for every cached token, a
few derived values (codes, norms). ``init`` computes them for the prefill; ``append`` must
compute them for the new tokens only (never rehash the whole cache). This module holds the
parts they share: the centring mean and the incremental loop.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sparse_attn.streaming import residual_mask
from sparse_attn.types import KVCache


def residual_key_mean(cache: KVCache, sinks: int, local: int) -> jax.Array:
  """``float32 [B, Hkv, D]``: mean of each row's residual keys (zeros if it has none).

  Centring keys by it shifts every score of a query by the same ``q . mean`` (the softmax is
  unchanged) and spreads the keys' angles, which makes sign-based hashes informative.
  """
  keys, _, length = cache
  positions = jnp.arange(keys.shape[2], dtype=jnp.int32)[None, :]
  residual = residual_mask(positions, length, sinks, local)[:, None, :, None]
  total = jnp.sum(jnp.where(residual, keys.astype(jnp.float32), 0.0), axis=2)
  count = jnp.sum(residual, axis=2).astype(jnp.float32)
  return total / jnp.maximum(count, 1.0)


def check_same_cache(stored: jax.Array, cache: KVCache) -> None:
  """Raises ``ValueError`` unless ``stored [B, Hkv, S, ...]`` was built for ``cache``'s shape."""
  if stored.shape[:3] != cache.keys.shape[:3]:
    raise ValueError(
        f"index was built for a cache of shape [B, Hkv, S] = {tuple(stored.shape[:3])}, "
        f"got cache.keys {tuple(cache.keys.shape)}")


def append_rows(stored: tuple[jax.Array, ...], length: jax.Array, cache: KVCache,
                derive: Callable[[jax.Array], tuple[jax.Array, ...]],
                chunk: int) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Derives the stored values of the tokens in ``[length, cache.length)``, chunk by chunk.

  Args:
    stored: arrays ``[B, Hkv, S, ...]`` of per-token values.
    length: ``int32 [B]`` tokens already derived.
    cache: the grown cache.
    derive: ``keys [B, Hkv, chunk, D] -> tuple`` of arrays ``[B, Hkv, chunk, ...]``.
    chunk: tokens per loop step (static). A chunk may overlap derived tokens (it is clamped
      to the capacity); recomputing them is harmless, as ``derive`` is deterministic.

  Returns:
    ``(stored, length)`` with ``length = max(length, min(cache.length, S))``.
  """
  capacity = cache.keys.shape[2]
  chunk = min(chunk, capacity)
  slice_rows = jax.vmap(lambda k, s: jax.lax.dynamic_slice_in_dim(k, s, chunk, axis=1))
  write = jax.vmap(lambda a, x, s: jax.lax.dynamic_update_slice_in_dim(a, x, s, axis=1))
  # Tokens past the capacity can never be derived: the target is clamped to S (a traced
  # length > S would otherwise loop forever), and the trip count is bounded statically.
  target = jnp.clip(cache.length, 0, capacity)
  max_steps = -(-capacity // chunk) + 1

  def step(carry):
    arrays, done, steps = carry
    start = jnp.clip(done, 0, capacity - chunk)
    new = derive(slice_rows(cache.keys, start))
    arrays = tuple(write(a, x.astype(a.dtype), start) for a, x in zip(arrays, new))
    return arrays, jnp.maximum(done, jnp.minimum(start + chunk, target)), steps + 1

  def pending(carry):
    _, done, steps = carry
    return jnp.any(done < target) & (steps < max_steps)

  arrays, done, _ = jax.lax.while_loop(pending, step, (stored, length, jnp.int32(0)))
  return arrays, done


def derive_all(stored: tuple[jax.Array, ...], cache: KVCache,
               derive: Callable[[jax.Array], tuple[jax.Array, ...]],
               floats_per_token: int) -> tuple[jax.Array, ...]:
  """``init``'s version of ``append_rows``: derives every valid token, chunk by chunk.

  Args:
    stored: zero arrays ``[B, Hkv, S, ...]`` to fill.
    cache: the prefilled cache.
    derive: as in ``append_rows``.
    floats_per_token: float32 temporaries ``derive`` holds per token and KV head (a SimHash
      projection of ``K*L`` planes, say): chunks keep them under 256 MB, where deriving the
      whole cache at once would hold ``B * Hkv * S`` times that.
  """
  batch, num_kv_heads = cache.keys.shape[:2]
  per_token = batch * num_kv_heads * max(1, floats_per_token)
  chunk = 1 << max(4, (2**26 // per_token).bit_length() - 1)
  return append_rows(stored, jnp.zeros_like(cache.length), cache, derive, chunk)[0]
