"""MagicPIG's per-query buffers, sized from the prefill.

Static shapes need two buffers per query: the entries of its ``L`` buckets (``candidates``)
and the tokens it samples (``selected``). What a query needs depends on how its keys spread:
on LLM-shaped synthetic keys at head dim 128, a query's buckets hold about 17% of the tokens
and 1.6% qualify; on the reference model's attention (head dim 32) a query's
buckets hold up to 107% and up to 15% qualify. A buffer that is too small costs time only
(``magicpig``: an exact wider path), but a default that is too small for real attention
takes the wide path at most steps.

So ``init`` sizes the defaults from the prefill, with the prefill's own keys standing in for
the queries to come: ``PROXIES`` evenly spaced residual keys of each row and KV head are
hashed as queries; each buffer is ``MARGIN`` times the largest need among them, as a
fraction of the row's tokens, times ``S``, rounded up to a ladder of sizes (few distinct
sizes, so few compiled steps). On the reference model's attention and on LLM-shaped keys,
the largest proxy need fell at most 5% short of the real queries' (``docs/magicpig.md``).
A traced ``init`` (under the caller's ``jit``) cannot choose shapes
from data and keeps the ``formula`` sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from sparse_attn import lsh
from sparse_attn.streaming import residual_mask

PROXIES = 32  # keys per row and KV head that stand in for queries
MARGIN = 1.25  # on the largest need among them
MIN_TOKENS = 256  # fewer residual tokens in every row: too little to go by, keep the formula


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Buffers:
  """Static per-query sizes: ``candidates`` bucket entries, ``selected`` sampled tokens.

  A pytree node with no leaves: it travels in the index's structure, so ``attend`` reads
  the sizes as Python ints under ``jit``, and a new size compiles a new step."""

  candidates: int
  selected: int


def formula(K: int, L: int, min_collisions: int, capacity: int) -> Buffers:
  """The sizes without data: ``2 L 2**-K`` of ``S`` bucket entries (twice a uniform
  spread's) and ``2 w(0) + 1/64`` of ``S`` tokens (twice what a key orthogonal to the query
  would bring)."""
  with jax.ensure_compile_time_eval():  # a constant, also when called under a trace
    selected = 2.0 * float(lsh.collision_probability(0.0, K, L, min_collisions)) + 1 / 64
  return Buffers(candidates=_tokens(2.0 * L * 2.0**-K, capacity, L * capacity),
                 selected=_tokens(selected, capacity, capacity))


def _tokens(fraction: float, capacity: int, most: int) -> int:
  """``fraction * S`` rounded up to the ladder ``2**(j/4) / 256`` of ``S`` (steps of 19%),
  in ``[1, most]``: each size compiles its own decode step, so prefills of one model must
  give few distinct sizes (a need between 1/256 and all of ``S`` has 33 rungs)."""
  rung = math.ceil(4 * math.log2(max(fraction, 2.0**-8) * 256) - 1e-9)
  return int(min(most, max(1, math.ceil(2.0 ** (rung / 4 - 8) * capacity))))


def from_prefill(index, cache, hash_queries: Callable, match_counts: Callable, sinks: int,
                 local: int, min_collisions: int, fallback: Buffers) -> Buffers:
  """The sizes the prefill's keys ask for (module docstring); ``fallback`` when ``cache``
  or ``index`` is traced (e.g. ``init`` under ``jit`` with a traced key) or no row has
  ``MIN_TOKENS`` residual tokens, and ``fallback``'s candidates where the index has no
  tables (retrieval by a scan reads no buckets)."""
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((cache, index))):
    return fallback
  entries, qualified = (float(x) for x in _need(index, cache, hash_queries, match_counts,
                                                sinks, local, min_collisions))
  if qualified < 0:  # no row to go by
    return fallback
  capacity = cache.keys.shape[2]
  candidates = fallback.candidates if index.tables is None else _tokens(
      MARGIN * entries, capacity, index.tables.offsets.shape[-2] * capacity)  # L * S
  return Buffers(candidates=candidates, selected=_tokens(MARGIN * qualified, capacity, capacity))


@functools.partial(jax.jit, static_argnames=("hash_queries", "match_counts", "sinks", "local",
                                             "min_collisions"))
def _need(index, cache, hash_queries, match_counts, sinks, local, min_collisions):
  """``(entries, qualified)``: the largest bucket entries and qualified tokens of a proxy
  query, as fractions of its row's tables and residual, ``-1`` if no row has
  ``MIN_TOKENS`` residual tokens."""
  keys, _, length = cache
  batch, num_kv_heads, capacity, head_dim = keys.shape
  hashed = jnp.minimum(index.length, length)
  begin, end = sinks, jnp.maximum(hashed - local, sinks)  # the residual [begin, end) [B]
  spread = (jnp.arange(PROXIES, dtype=jnp.float32) + 0.5) / PROXIES
  width = (end - begin).astype(jnp.float32)  # [B]
  at = begin + (spread[None, :] * width[:, None]).astype(jnp.int32)  # [B, P]
  at = jnp.broadcast_to(at[:, None, :, None], (batch, num_kv_heads, PROXIES, 1))
  proxies = jnp.take_along_axis(keys, at, axis=2).astype(jnp.float32)  # [B, Hkv, P, D]
  usable = jnp.all(jnp.isfinite(proxies), axis=-1) & (end - begin >= MIN_TOKENS)[:, None, None]
  codes = hash_queries(jnp.where(usable[..., None], proxies, 0.0), index.planes)

  # Bucket entries: the sizes of the proxy's L buckets, from the tables' offsets.
  entries = jnp.zeros(codes.shape[:3], jnp.float32)
  if index.tables is not None:
    offsets = index.tables.offsets[:, :, None]  # [B, Hkv, 1, L, 2**K + 1]
    c = codes.astype(jnp.int32)[..., None]
    sizes = (jnp.take_along_axis(offsets, c + 1, axis=-1)
             - jnp.take_along_axis(offsets, c, axis=-1))[..., 0]
    in_tables = jnp.maximum(index.table_length - sinks, 1).astype(jnp.float32)
    entries = jnp.sum(sizes, axis=-1).astype(jnp.float32) / in_tables[:, None, None]

  # Qualified tokens: a scan of every code, one proxy at a time (all at once would hold
  # [B, Hkv * P, S] counts).
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  residual = residual_mask(positions, hashed, sinks, local)  # [B, 1, S]

  def count(proxy_codes):  # [B, Hkv, L] -> [B, Hkv]
    hits = match_counts(proxy_codes[:, :, None], index.codes, hashed)[:, :, 0] >= min_collisions
    return jnp.sum(hits & residual, axis=-1)

  qualified = jax.lax.map(count, jnp.moveaxis(codes, 2, 0))  # [P, B, Hkv]
  qualified = (jnp.moveaxis(qualified, 0, 2).astype(jnp.float32)
               / jnp.maximum(width, 1.0)[:, None, None])
  missing = jnp.float32(-1.0)
  return (jnp.max(jnp.where(usable, entries, missing)),
          jnp.max(jnp.where(usable, qualified, missing)))
