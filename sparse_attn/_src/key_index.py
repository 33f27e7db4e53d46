"""Per-token key state that is built at prefill and extended at every decode step.

MagicPIG's tables and the SimHash / learned-hash predictors keep, for every cached token, a
few derived values (codes, norms). ``init`` computes them for the prefill; ``append`` must
compute them for the new tokens only (never rehash the whole cache). This module holds the
parts they share: the centring mean and the incremental loop.

Non-finite keys (a NaN or inf entry) are left out of the centring mean, so that one bad key
does not change how the other tokens of its head are hashed; the loop records the position
of the first one it derives (``first_nonfinite``), so that ``attend`` can return NaN for the
heads that hold one (the library's rule: a non-finite key makes its head's ``out`` and
``lse`` NaN) at no cost per query.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from sparse_attn.streaming import residual_mask
from sparse_attn.types import KVCache


def nonfinite_rows(keys: jax.Array) -> jax.Array:
  """``bool [..., N]``: True for the rows of ``keys [..., N, D]`` with a NaN or inf entry."""
  return ~jnp.all(jnp.isfinite(keys), axis=-1)


def residual_key_mean(cache: KVCache, sinks: int, local: int) -> jax.Array:
  """``float32 [B, Hkv, D]``: mean of each row's finite residual keys (zeros if none).

  Centring keys by it shifts every score of a query by the same ``q . mean`` (the softmax is
  unchanged) and spreads the keys' angles, which makes sign-based hashes informative.
  Non-finite keys are left out: one would otherwise make the mean, and so every code of its
  head, NaN.
  """
  keys, _, length = cache
  positions = jnp.arange(keys.shape[2], dtype=jnp.int32)[None, :]
  residual = residual_mask(positions, length, sinks, local)[:, None, :]
  residual = (residual & ~nonfinite_rows(keys))[..., None]
  total = jnp.sum(jnp.where(residual, keys.astype(jnp.float32), 0.0), axis=2)
  count = jnp.sum(residual, axis=2).astype(jnp.float32)
  return total / jnp.maximum(count, 1.0)


def check_same_cache(stored: jax.Array, cache: KVCache) -> None:
  """Raises ``ValueError`` unless ``stored [B, Hkv, S, ...]`` was built for ``cache``'s shape."""
  if stored.shape[:3] != cache.keys.shape[:3]:
    raise ValueError(
        f"index was built for a cache of shape [B, Hkv, S] = {tuple(stored.shape[:3])}, "
        f"got cache.keys {tuple(cache.keys.shape)}")


def _rows_at(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """``x [B, H, S, ...]`` rows ``[start[b], start[b] + size)`` of each batch row, by one
  ``dynamic_slice`` per row. ``vmap`` of the slice is a gather, for which XLA:GPU relayouts
  the whole cache: on an H200 a transpose of the keys before every decode step's append
  (0.21 ms at 128K tokens, 0.68 ms at 512K, batch 1; docs/gpu.md)."""
  return jnp.stack([jax.lax.dynamic_slice_in_dim(x[b], start[b], size, axis=1)
                    for b in range(x.shape[0])])


def append_rows(stored: tuple[jax.Array, ...], length: jax.Array, cache: KVCache,
                derive: Callable[[jax.Array], tuple[jax.Array, ...]],
                chunk: int, first_nonfinite: jax.Array | None = None
                ) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
  """Derives the stored values of the tokens in ``[length, cache.length)``, chunk by chunk.

  Args:
    stored: arrays ``[B, Hkv, S, ...]`` of per-token values.
    length: ``int32 [B]`` tokens already derived.
    cache: the grown cache.
    derive: ``keys [B, Hkv, chunk, D] -> tuple`` of arrays ``[B, Hkv, chunk, ...]``.
    chunk: tokens per loop step (static). A chunk may overlap derived tokens (it is clamped
      to the capacity); recomputing them is harmless, as ``derive`` is deterministic.
    first_nonfinite: ``int32 [B, Hkv]``, the first position of a non-finite key derived so
      far (``S`` if none); None for none.

  Returns:
    ``(stored, length, first_nonfinite)`` with ``length = max(length, min(cache.length, S))``
    and ``first_nonfinite`` lowered by the non-finite keys among the new tokens.
  """
  capacity = cache.keys.shape[2]
  chunk = min(chunk, capacity)
  slice_rows = functools.partial(_rows_at, size=chunk)
  write = jax.vmap(lambda a, x, s: jax.lax.dynamic_update_slice_in_dim(a, x, s, axis=1))
  # Tokens past the capacity can never be derived: the target is clamped to S (a traced
  # length > S would otherwise loop forever), and the trip count is bounded statically.
  target = jnp.clip(cache.length, 0, capacity)
  max_steps = -(-capacity // chunk) + 1

  if first_nonfinite is None:
    first_nonfinite = jnp.full(cache.keys.shape[:2], capacity, jnp.int32)

  def step(carry):
    arrays, done, first, steps = carry
    start = jnp.clip(done, 0, capacity - chunk)
    rows = slice_rows(cache.keys, start)
    new = derive(rows)
    arrays = tuple(write(a, x.astype(a.dtype), start) for a, x in zip(arrays, new))
    positions = start[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]  # [B, chunk]
    bad = nonfinite_rows(rows) & (positions < target[:, None])[:, None, :]
    first = jnp.minimum(first, jnp.min(jnp.where(bad, positions[:, None, :], capacity), -1))
    return (arrays, jnp.maximum(done, jnp.minimum(start + chunk, target)), first, steps + 1)

  def pending(carry):
    _, done, _, steps = carry
    return jnp.any(done < target) & (steps < max_steps)

  arrays, done, first, _ = jax.lax.while_loop(
      pending, step, (stored, length, first_nonfinite.astype(jnp.int32), jnp.int32(0)))
  return arrays, done, first


def has_nonfinite(first_nonfinite: jax.Array, length: jax.Array) -> jax.Array:
  """``bool [B, Hkv]``: a non-finite key lies among the first ``length [B]`` tokens."""
  return first_nonfinite < length[:, None]


def derive_all(stored: tuple[jax.Array, ...], cache: KVCache,
               derive: Callable[[jax.Array], tuple[jax.Array, ...]],
               floats_per_token: int) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """``init``'s version of ``append_rows``: derives every valid token, chunk by chunk.

  Args:
    stored: zero arrays ``[B, Hkv, S, ...]`` to fill.
    cache: the prefilled cache.
    derive: as in ``append_rows``.
    floats_per_token: float32 temporaries ``derive`` holds per token and KV head (a SimHash
      projection of ``K*L`` planes, say): chunks keep them under 256 MB, where deriving the
      whole cache at once would hold ``B * Hkv * S`` times that.

  Returns:
    ``(stored, first_nonfinite)`` (see ``append_rows``).
  """
  batch, num_kv_heads = cache.keys.shape[:2]
  per_token = batch * num_kv_heads * max(1, floats_per_token)
  chunk = 1 << max(4, (2**26 // per_token).bit_length() - 1)
  stored, _, first = append_rows(stored, jnp.zeros_like(cache.length), cache, derive, chunk)
  return stored, first
