"""Bucketed LSH tables with static shapes: what MagicPIG's CPU retrieval does, under jit.

Per table, the token ids are kept sorted by their K-bit code, with ``2**K + 1`` bucket
offsets (``offsets[c] .. offsets[c+1]`` delimit bucket ``c``). A query reads only its own
``L`` buckets, so retrieval costs about the number of tokens in those buckets, not ``n * L``.

Static shapes need a cap: the ``L`` buckets of a query are laid end to end in one buffer of
``capacity`` entries (one shared budget, so a large bucket can borrow what small ones leave).
Entries past the buffer are *dropped* and counted: a dropped entry can only lower a token's
collision count, so a caller must not use the counts of a lookup that dropped entries
(MagicPIG then counts by a scan of every code).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class HashTables(NamedTuple):
  """Codes sorted per table.

  Attributes:
    sorted_ids: ``int32 [..., L, S]`` token ids ordered by code (stable, so ids ascend
      within a bucket); excluded tokens sort last, past ``offsets[..., 2**K]``.
    offsets: ``int32 [..., L, 2**K + 1]`` bucket starts; ``offsets[c+1] - offsets[c]`` is
      the size of bucket ``c``.
  """

  sorted_ids: jax.Array
  offsets: jax.Array


def build_tables(codes: jax.Array, include: jax.Array, K: int) -> HashTables:
  """Sorts tokens into buckets.

  Args:
    codes: ``uint [..., S, L]`` table codes, each ``< 2**K``.
    include: ``bool [..., S]``, the tokens to put into buckets.
    K: bits per table (``2**K + 1`` offsets per table are stored).

  Returns:
    ``HashTables`` with leading shape ``[...]``.
  """
  num_buckets = 1 << K
  keys = jnp.where(include[..., None], codes.astype(jnp.int32), num_buckets)
  keys = jnp.swapaxes(keys, -1, -2)  # [..., L, S]
  num_tokens = keys.shape[-1]
  if (num_buckets + 1) * num_tokens <= 2**32:
    # Sorting one packed uint32 (code, id) key is several times faster on XLA:CPU than a
    # stable argsort (which sorts a second, index operand); ids stay ascending per bucket.
    packed = keys.astype(jnp.uint32) * jnp.uint32(num_tokens) + jnp.arange(
        num_tokens, dtype=jnp.uint32).reshape((1,) * (keys.ndim - 1) + (num_tokens,))
    sorted_ids = (jnp.sort(packed, axis=-1) % jnp.uint32(num_tokens)).astype(jnp.int32)
  else:
    sorted_ids = jnp.argsort(keys, axis=-1, stable=True).astype(jnp.int32)

  def bucket_sizes(row):  # [S] -> [2**K + 1]
    return jnp.zeros(num_buckets + 1, jnp.int32).at[row].add(1, mode="promise_in_bounds")

  flat = keys.reshape(-1, keys.shape[-1])
  sizes = jax.vmap(bucket_sizes)(flat).reshape(keys.shape[:-1] + (num_buckets + 1,))
  starts = jnp.cumsum(sizes[..., :num_buckets], axis=-1, dtype=jnp.int32)
  offsets = jnp.concatenate([jnp.zeros_like(starts[..., :1]), starts], axis=-1)
  return HashTables(sorted_ids, offsets)


def lookup(tables: HashTables, q_codes: jax.Array,
           capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The entries of one query's ``L`` buckets, end to end in a static buffer.

  Args:
    tables: ``HashTables`` of one KV head (``sorted_ids [L, S]``, ``offsets [L, 2**K+1]``).
    q_codes: ``uint [L]``, the query's code in each table.
    capacity: static buffer size ``E``.

  Returns:
    ``(ids int32 [E], valid bool [E], dropped int32 [])``: entry ``e`` holds a token id
    of table ``l`` where ``l`` is the table whose bucket covers ``e``; a token appears once
    per table it collides in. ``dropped`` counts the entries that did not fit.
  """
  sorted_ids, offsets = tables
  num_tables, capacity_s = sorted_ids.shape
  table = jnp.arange(num_tables)
  codes = q_codes.astype(jnp.int32)
  starts = offsets[table, codes]
  sizes = offsets[table, codes + 1] - starts
  begins = jnp.cumsum(sizes) - sizes  # table l fills entries [begins[l], begins[l] + sizes[l])
  total = begins[-1] + sizes[-1]
  # Entry e of table l's run reads flat position e + shift[l], shift[l] = l S + starts[l] -
  # begins[l]. A prefix sum of the shifts' increments, marked at each run's first entry, gives
  # every entry its run's shift (empty runs share the next run's begin; their increments
  # telescope). associative_scan: XLA:CPU's cumsum is 3-4x slower here.
  shift = table * capacity_s + starts - begins
  marker = jnp.zeros(capacity, jnp.int32).at[begins].add(
      jnp.diff(shift, prepend=0), mode="drop")
  e = jnp.arange(capacity, dtype=jnp.int32)
  valid = e < total
  flat = jnp.where(valid, e + jax.lax.associative_scan(jnp.add, marker), 0)
  ids = sorted_ids.reshape(-1).at[flat].get(mode="promise_in_bounds")
  return ids, valid, jnp.maximum(total - capacity, 0).astype(jnp.int32)


def collision_counts(ids: jax.Array, valid: jax.Array, num_tokens: int,
                     max_count: int) -> jax.Array:
  """How many of a query's bucket entries name each token: its number of table collisions.

  Args:
    ids: ``int32 [H, E]`` bucket entries of ``H`` queries (from ``lookup``).
    valid: ``bool [H, E]``.
    num_tokens: the cache capacity ``S`` (ids lie in ``[0, S)``).
    max_count: the largest possible count (the number of tables ``L``); the counter is the
      narrowest unsigned type that holds it.

  Returns:
    ``uint [H, S]`` counts (uint8 for ``L <= 255``).
  """
  dtype = jnp.uint8 if max_count <= 0xFF else jnp.uint16 if max_count <= 0xFFFF else jnp.uint32
  num_queries = ids.shape[0]
  # One flat counter for all queries, as narrow as possible: on XLA:CPU a flat uint8
  # scatter-add is several times faster than an int32 one or one under vmap. Slot S of each
  # query swallows the padding entries (its count may wrap; it is dropped).
  base = (jnp.arange(num_queries, dtype=jnp.int32) * (num_tokens + 1))[:, None]
  slot = base + jnp.where(valid, ids, num_tokens)
  counts = jnp.zeros(num_queries * (num_tokens + 1), dtype).at[slot].add(
      jnp.ones((), dtype), mode="promise_in_bounds")
  return counts.reshape(num_queries, num_tokens + 1)[:, :num_tokens]
