r"""MagicPIG: LSH sampling with exact importance weights.

The exact set :math:`\mathcal{G}` (the first ``sinks`` and the last ``local`` tokens) is
attended exactly. Every other valid token ``i`` (the residual) is *sampled*: it is retrieved
when at least ``min_collisions`` of ``L`` SimHash tables of ``K`` bits put it in the query's
bucket, which happens with probability :math:`w_i` = ``lsh.collision_probability`` of the
cosine between ``q`` and the centred key :math:`k_i - \bar k`. With :math:`e_i = e^{s_i}`,

.. math::
   \hat o = \frac{\sum_{\mathcal{G}} e_j v_j + \sum_{\mathcal{S}} (e_i / w_i) v_i}
                 {\sum_{\mathcal{G}} e_j + \sum_{\mathcal{S}} e_i / w_i},

whose numerator and denominator are unbiased over the random planes (Horvitz-Thompson),
then self-normalised. Centring by the mean key :math:`\bar k` of the prefill residual shifts
every score by the same ``q . k_bar`` (the softmax is unchanged) and spreads the keys' angles.

Codes are stored packed, ``K L`` bits per token and KV head (``table_match_counts``).
Retrieval, as ``retrieval`` (or ``backend.magicpig_retrieval``) says:

* ``"tables"`` (the CPU's): reads only the query's ``L`` buckets (``hash_tables``). Tokens
  appended after the tables were built sit in a *tail* of at most ``tail`` tokens that is
  scanned directly; the tables are rebuilt (from stored codes, no rehashing) when the tail
  is full.
* ``"scan"`` (accelerators'): no tables; one pass over every stored code counts each
  token's matching tables (``table_match_counts``, capped at ``min_collisions``), the
  qualifying tokens are listed without a sort (``selection.compact_at_least``) and attended
  with their weights computed inside the attention pass from each key's score
  (``ScoreWeights``): every sampled key is read once. Sorts and scatters suit a GPU badly;
  a scan reads 188 bytes per token for ``K=10, L=150``, against 512 for a bf16 key and
  value at ``D = 128``.

Both give the same sample: the same tokens collide in the same tables.

Static buffers, and what happens when they are too small (never a silent bias). By default
``init`` sizes both from the prefill (``_src/magicpig_buffers``: the prefill's keys stand in
for queries); the index carries the sizes (``index.buffers``).

* ``max_candidates`` bucket entries per query: the ``L`` buckets are read into one buffer.
  When a query's buckets do not fit, the step counts the collisions of the whole batch by a
  scan of every stored code instead (``table_match_counts``): the same counts, slower.
  ``stats["bucket_overflow"]`` counts the entries that did not fit.
* ``max_selected`` sampled tokens per query. By default, when more qualify anywhere in the
  batch, the step attends over a list of ``S`` instead: the same estimate, slower. Given
  explicitly it is a hard cap with a fixed cost: when more qualify, a uniform sample without
  replacement of ``max_selected`` of them is kept and each is weighted by ``qualified /
  max_selected`` on top of ``1 / w`` (two-stage Horvitz-Thompson), so numerator and
  denominator stay unbiased, with more variance. The second stage draws from ``attend``'s
  ``key`` if given, else from a key ``init`` derived from its own (apart from the planes).
  ``stats["selected_overflow"]`` counts the qualified tokens beyond the list.

Non-finite keys: the centring mean is taken over the finite keys only (one NaN key must not
switch the sampling of its whole head off), and a valid hashed token whose key has a NaN or
inf entry makes ``out`` and ``lse`` NaN for every query head of its KV head, whether it was
sampled or not (recorded when it is hashed, ``first_nonfinite``: no pass over the keys at
``attend``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import backend
from pallas_kernels import table_match_counts as tmc
from pallas_kernels.sparse_decode_attention import ScoreWeights
from sparse_attn import lsh
from sparse_attn._src import hash_tables, key_index, magicpig_buffers, selection
from sparse_attn.attention import HIGHEST, attend_rows, combine_lse, group_queries
from sparse_attn.attention import make_result
from sparse_attn.streaming import check_window, exact_part, residual_mask
from sparse_attn.types import Estimator, KVCache, check_cache, check_key, check_query
from sparse_attn.types import configured, donated_index_hint, within_capacity


class MagicPigIndex(NamedTuple):
  """MagicPIG's index (a pytree).

  Attributes:
    planes: ``float32 [D, K*L]`` (or ``[Hkv, D, K*L]`` with ``planes_per_head``).
    key_mean: ``float32 [B, Hkv, D]``, mean of the prefill residual keys (zeros if not
      centring).
    codes: ``uint32 [B, Hkv, S, ceil(K L / 32)]`` codes of the centred keys, packed
      (``table_match_counts.pack_codes``).
    key_norms: ``float32 [B, Hkv, S]``, ``||k_i - k_bar||``, so that ``attend`` gets the
      exact cosine from the score alone, without a second pass over the gathered keys.
    tables: ``HashTables`` with leading shape ``[B, Hkv]``, covering tokens
      ``[sinks, table_length)``; None where retrieval scans every code.
    table_length: ``int32 [B]``, tokens covered by the tables.
    length: ``int32 [B]``, tokens whose codes are in ``codes``.
    first_nonfinite: ``int32 [B, Hkv]``, the first hashed token whose key has a NaN or inf
      entry (``S`` if none): ``attend`` returns NaN for that KV head (module docstring).
    subsample_key: ``uint32`` key data, derived from init's key apart from the planes: the
      second-stage subsample when ``max_selected`` binds and ``attend`` gets no key.
    buffers: static ``Buffers`` (no array; part of the pytree's structure): the bucket
      entries and sampled tokens each query's buffers hold, sized at ``init``.
  """

  planes: jax.Array
  key_mean: jax.Array
  codes: jax.Array
  key_norms: jax.Array
  tables: hash_tables.HashTables
  table_length: jax.Array
  length: jax.Array
  first_nonfinite: jax.Array
  subsample_key: jax.Array
  buffers: magicpig_buffers.Buffers


@configured
def magicpig(K: int = 10, L: int = 150, min_collisions: int = 2, sinks: int = 4,
             local: int = 64, center_keys: bool = True, planes_per_head: bool = False,
             max_selected: float | None = None, max_candidates: float | None = None,
             tail: int = 1024, append_chunk: int = 16,
             retrieval: str | None = None) -> Estimator:
  """MagicPIG estimator (LSH sampling with importance weights).

  Args:
    K: bits per table, in ``[1, 16]`` (each table stores ``2**K + 1`` offsets).
    L: number of tables.
    min_collisions: tables that must collide for a token to be sampled.
    sinks, local: sizes of the exact set.
    center_keys: centre keys by the mean prefill residual key before hashing.
    planes_per_head: draw separate planes for each KV head.
    max_selected: sampled tokens per query, as a fraction of the capacity ``S``. None (the
      default): a list sized by ``init`` from the prefill (1.25 times the most tokens that
      qualify for one of its keys taken as a query), widened to ``S`` for a step where more
      qualify (exact, slower). A number: a hard cap, subsampled in a second stage when it
      binds (unbiased, more variance).
    max_candidates: bucket entries read per query, as a fraction of ``S`` (the ``L``
      buckets share this buffer); a step whose buckets do not fit counts collisions by a
      scan of every code (exact, slower). None (the default): sized by ``init`` from the
      prefill, as ``max_selected``.
    tail: tokens appended since the last table build that are scanned directly; the
      tables are rebuilt when more are pending.
    append_chunk: tokens hashed per step of ``append``'s loop.
    retrieval: ``"tables"`` (bucketed tables and a scanned tail) or ``"scan"`` (a scan of
      every code, no tables); None: ``backend.magicpig_retrieval()`` when ``init`` runs
      (tables on a CPU, the scan on accelerators). The same sample either way.

  Under a traced ``init`` (inside the caller's ``jit``), or with fewer than 256 residual
  tokens in every row, the default sizes are ``2 w(0) + 1/64`` of ``S`` sampled tokens
  (``w(0)`` the inclusion probability of a key orthogonal to the query: 3.5% for K=10,
  L=150) and ``2 L 2**-K`` of ``S`` bucket entries (0.29 for K=10, L=150).

  ``append(index, cache)`` donates ``index`` (updated in place): keep only the returned index.

  Keys: ``init`` consumes its ``key`` (the random planes; required). ``attend``'s optional
  ``key`` only draws the second-stage subsample when an explicit ``max_selected`` binds
  (without it, a key derived at ``init``); otherwise it changes nothing.

  Returns:
    An ``Estimator``. ``attend``'s ``stats``: ``selected`` (exact + sampled tokens),
    ``valid``, ``sampled``, ``bucket_overflow``, ``selected_overflow``, ``unindexed``
    (residual tokens written to the cache but not yet appended to the index).
  """
  if isinstance(K, int) and not isinstance(K, bool) and not 1 <= K <= 16:
    raise ValueError(f"K (bits per table) must be in [1, 16] for MagicPIG's bucketed tables "
                     f"(2**K + 1 offsets each), got {K}")
  lsh.check_table_shape(K, L, min_collisions)
  check_window(sinks, local)
  subsample = max_selected is not None
  if subsample and not 0.0 < max_selected <= 1.0:
    raise ValueError(f"max_selected must be a fraction of S in (0, 1], got {max_selected!r}")
  if max_candidates is not None and not 0.0 < max_candidates <= float(L):
    raise ValueError(
        f"max_candidates must be a fraction of S in (0, L={L}], got {max_candidates!r}")
  for name, value in (("tail", tail), ("append_chunk", append_chunk)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if retrieval not in (None, "tables", "scan"):
    raise ValueError(f"retrieval must be 'tables', 'scan' or None, got {retrieval!r}")
  log_inclusion = lsh.LogInclusion(K, L, min_collisions)

  def hash_queries(x, index_planes):
    """``x [B, Hkv, ..., D] -> uint32 [B, Hkv, ..., L]``."""
    if planes_per_head:
      return jax.vmap(lambda x, w: lsh.simhash(x, w, K, L), in_axes=(1, 0), out_axes=1)(
          x, index_planes)
    return lsh.simhash(x, index_planes, K, L)

  def hash_keys(keys, index_planes, key_mean):
    """``keys [B, Hkv, N, D] -> (packed codes uint32 [B, Hkv, N, W], norms [B, Hkv, N])``."""
    centred = keys.astype(jnp.float32) - key_mean[:, :, None, :]
    codes = tmc.pack_codes(hash_queries(centred, index_planes), K)
    return codes, jnp.linalg.norm(centred, axis=-1)

  def build(codes, length):
    positions = jnp.arange(codes.shape[2], dtype=jnp.int32)
    include = (positions[None, :] >= sinks) & (positions[None, :] < length[:, None])
    include = jnp.broadcast_to(include[:, None, :], codes.shape[:3])
    return hash_tables.build_tables(tmc.unpack_codes(codes, K, L), include, K)

  def match_counts(q_codes, codes, length):
    """``q_codes uint [B, Hkv, G, L]``, packed ``codes [B, Hkv, T, W]`` -> matching tables,
    capped at ``min_collisions`` (all the sample asks), ``int8 [B, Hkv, G, T]``."""
    batch, num_kv_heads, group = q_codes.shape[:3]
    words = tmc.pack_codes(q_codes, K).reshape(batch, num_kv_heads * group, -1)
    return tmc.table_match_counts(words, codes, length, K, L, min_collisions).reshape(
        batch, num_kv_heads, group, -1)

  def init(cache: KVCache, key: jax.Array | None = None) -> MagicPigIndex:
    check_cache(cache)
    check_key(key, purpose="magicpig's init draws its hash planes from it")
    index = _init(cache, key, (retrieval or backend.magicpig_retrieval()) == "tables")
    if subsample and max_candidates is not None:
      return index
    return index._replace(buffers=buffers(cache.keys.shape[2], magicpig_buffers.from_prefill(
        index, cache, hash_queries, match_counts, sinks, local, min_collisions,
        index.buffers)))

  def buffers(capacity, defaults):
    """The explicit sizes, and ``defaults``' where none is given (the one rule for init's
    formula, init's prefill sizes and attend's index sizes)."""
    tokens = lambda fraction: max(1, math.ceil(fraction * capacity))  # noqa: E731
    return magicpig_buffers.Buffers(
        defaults.candidates if max_candidates is None else tokens(max_candidates),
        tokens(max_selected) if subsample else defaults.selected)

  @functools.partial(jax.jit, static_argnums=2)
  def _init(cache, key, with_tables):
    cache, _ = within_capacity(cache)
    keys, _, length = cache
    batch, num_kv_heads, capacity, head_dim = keys.shape
    index_planes = lsh.planes(key, head_dim, K, L, num_kv_heads if planes_per_head else None)
    if center_keys:
      key_mean = key_index.residual_key_mean(cache, sinks, local)
    else:
      key_mean = jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32)
    # Chunk by chunk: all keys at once would hold a [B, Hkv, S, K*L] float32 projection
    # (25 GB at B=8, 64K tokens, K*L=1500).
    empty = (jnp.zeros((batch, num_kv_heads, capacity, tmc.code_words(K, L)), jnp.uint32),
             jnp.zeros((batch, num_kv_heads, capacity), jnp.float32))
    (codes, norms), first = key_index.derive_all(
        empty, cache, lambda rows: hash_keys(rows, index_planes, key_mean), K * L + head_dim)
    subsample_key = jax.random.key_data(jax.random.fold_in(key, 1))
    tables = build(codes, length) if with_tables else None
    return MagicPigIndex(index_planes, key_mean, codes, norms, tables, length,
                         length, first, subsample_key,
                         buffers(capacity, magicpig_buffers.formula(K, L, min_collisions,
                                                                    capacity)))

  def append(index: MagicPigIndex, cache: KVCache) -> MagicPigIndex:
    check_cache(cache)
    key_index.check_same_cache(index.codes, cache)
    with donated_index_hint():
      return _append(index, cache)

  # The index is donated: its buffers are updated in place (a decode step must not copy
  # an index of several hundred bytes per token). Use the returned index, not the argument.
  @functools.partial(jax.jit, donate_argnums=0)
  def _append(index, cache):
    capacity = cache.keys.shape[2]
    (codes, norms), length, first = key_index.append_rows(
        (index.codes, index.key_norms), index.length, cache,
        lambda rows: hash_keys(rows, index.planes, index.key_mean), append_chunk,
        index.first_nonfinite)
    index = index._replace(codes=codes, key_norms=norms, length=length, first_nonfinite=first)
    if index.tables is None:  # retrieval scans every code: nothing to rebuild
      return index._replace(table_length=length)
    # The tail scan covers at most `tail` tokens past the tables: rebuild when more wait.
    # One `cond` for the whole batch (under vmap it would run the sort every step).
    pending = index.length - index.table_length
    return jax.lax.cond(
        jnp.any(pending > min(tail, capacity)),
        lambda idx: idx._replace(tables=build(idx.codes, idx.length), table_length=idx.length),
        lambda idx: idx, index)

  def attend(q: jax.Array, cache: KVCache, index: MagicPigIndex, key=None):
    check_query(q, cache)
    if key is not None:
      check_key(key)
      key = jax.random.key_data(key)
    with donated_index_hint():
      return _attend(q, cache, index, key)

  def collided(q_codes, index, hashed, num_candidates, tail_size):
    """``int8 [B, Hkv, G, S]``: each token's colliding tables, capped at ``min_collisions``
    (-1 where not hashed), and the bucket entries that did not fit the candidate buffer
    ``[B, Hkv, G]``.

    From the tables (plus a scan of the tail appended since their build) when every query's
    buckets fit; else, for the whole batch, from a scan of every stored code: the same
    counts the tables give without a cap, so the buffer only ever costs time."""
    capacity = index.codes.shape[2]
    batch, num_kv_heads, group = q_codes.shape[:3]
    lookup = jax.vmap(hash_tables.lookup, in_axes=(None, 0, None))  # the group's queries
    lookup = jax.vmap(jax.vmap(lookup, in_axes=(0, 0, None)), in_axes=(0, 0, None))
    ids, valid, dropped = lookup(index.tables, q_codes, num_candidates)

    def scan(codes, length):  # [B, Hkv, T, W], [B] -> int8 [B, Hkv, G, T]
      return match_counts(q_codes, codes, length)

    def from_tables():
      counts = hash_tables.collision_counts(
          ids.reshape(-1, num_candidates), valid.reshape(-1, num_candidates), capacity,
          L).reshape(ids.shape[:3] + (capacity,))  # [B, Hkv, G, S]
      # Tokens appended since the last build (not in the tables): match their codes
      # directly and add their counts, over `tail_size` positions from the tables' end.
      start = jnp.clip(index.table_length, 0, capacity - tail_size)  # [B]
      window = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, tail_size, axis=-2))
      tail_counts = scan(window(index.codes, start), jnp.full((batch,), tail_size, jnp.int32))
      tail_pos = start[:, None] + jnp.arange(tail_size, dtype=jnp.int32)[None, :]  # [B, T]
      tail_new = (tail_pos >= index.table_length[:, None]) & (tail_pos < hashed[:, None])
      tail_counts = jnp.where(tail_new[:, None, None, :], tail_counts, 0).astype(counts.dtype)
      add_tail = jax.vmap(lambda c, t, s: jax.lax.dynamic_update_slice_in_dim(
          c, jax.lax.dynamic_slice_in_dim(c, s, tail_size, axis=-1) + t, s, axis=-1))
      counts = add_tail(counts, tail_counts, start)
      return jnp.minimum(counts, min_collisions).astype(jnp.int8)

    by_scan = lambda: scan(index.codes, hashed).astype(jnp.int8)  # noqa: E731
    return jax.lax.cond(jnp.any(dropped > 0), by_scan, from_tables), dropped

  def sampled_part(q, qg, cache, index, counts, keep, qualified, size, subsample_key):
    """Attention over the qualified tokens ``keep [B, Hkv, G, S]`` (those whose ``counts``
    reach ``min_collisions``; ``qualified [B, Hkv, G]`` of them) in a list of ``size``,
    weighted by ``1 / w``: ``(out, lse, sampled tokens [B, Hkv, G])``. More than ``size``
    qualify only under an explicit ``max_selected``: a second stage then subsamples them."""
    batch, num_kv_heads, capacity, head_dim = cache.keys.shape

    def subsample():
      # Two-stage Horvitz-Thompson: a uniform sample without replacement of `size` of the
      # qualified tokens (the lowest of iid uniform priorities), each then weighted by
      # qualified / size on top of 1 / w: unbiased given the first stage.
      u = jax.random.uniform(jax.random.wrap_key_data(subsample_key), keep.shape)
      return selection.top(-u, keep, size, size)

    def listed():  # all of them (they fit)
      return selection.compact_at_least(counts, min_collisions, cache.length, sinks, local,
                                        size)

    # Only when the cap binds somewhere (the first `size` otherwise are all of them).
    sel, sel_mask = jax.lax.cond(jnp.any(qualified > size), subsample, listed)
    second_stage = jnp.minimum(1.0, size / jnp.maximum(qualified, 1).astype(jnp.float32))

    # Importance weights 1/w from the exact centred cosine of each selected key, computed in
    # the attention pass from the score of each row it reads (each key is read once).
    q_mean = jnp.einsum("bhgd,bhd->bhg", qg, index.key_mean, precision=HIGHEST)
    per_query = jnp.stack([jnp.linalg.norm(qg, axis=-1), q_mean, jnp.log(second_stage)], -1)
    weights = ScoreWeights(dataclasses.replace(log_inclusion, head_dim=head_dim),
                           index.key_norms, per_query.reshape(batch, -1, 3))
    count = jnp.sum(sel_mask, axis=-1, dtype=jnp.int32)
    out_s, lse_s = attend_rows(q, cache, sel, count, weights)
    return out_s, lse_s, count.astype(jnp.float32)

  @jax.jit
  def _attend(q, cache, index, key):
    cache, over = within_capacity(cache)
    keys, values, length = cache
    batch, num_kv_heads, capacity, head_dim = keys.shape
    # Explicit sizes are the estimator's own; the defaults come with the index (init's).
    sizes = buffers(capacity, index.buffers)
    num_selected, num_candidates = sizes.selected, sizes.candidates
    tail_size = min(tail, capacity)
    qg = group_queries(q, num_kv_heads)  # [B, Hkv, G, D]
    q_codes = hash_queries(qg, index.planes)
    hashed = jnp.minimum(index.length, length)
    if index.tables is None:
      counts = match_counts(q_codes, index.codes, hashed)
      dropped = jnp.zeros(qg.shape[:3], jnp.int32)
    else:
      counts, dropped = collided(q_codes, index, hashed, num_candidates, tail_size)
    positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, None, :]
    keep = (counts >= min_collisions) & residual_mask(positions, length, sinks, local)
    qualified = jnp.sum(keep, axis=-1, dtype=jnp.int32)
    subsample_key = index.subsample_key if key is None else key
    part = functools.partial(sampled_part, q, qg, cache, index, counts, keep, qualified,
                             subsample_key=subsample_key)
    if subsample:  # an explicit cap: a fixed cost, two stages when it binds
      out_s, lse_s, sampled = part(num_selected)
    else:  # the default: a list of S for the whole batch when one query needs it
      out_s, lse_s, sampled = jax.lax.cond(jnp.any(qualified > num_selected),
                                           lambda: part(capacity), lambda: part(num_selected))

    out_e, lse_e, exact = exact_part(q, cache, sinks, local)
    out, lse = combine_lse([out_e, out_s], [lse_e, lse_s])

    residual_end = jnp.maximum(length - local, sinks)
    unindexed = jnp.maximum(residual_end - jnp.maximum(hashed, sinks), 0).astype(jnp.float32)
    return make_result(
        q, out, lse, exact + sampled, cache, over,
        nonfinite=key_index.has_nonfinite(index.first_nonfinite, hashed)[..., None],
        sampled=sampled,
        bucket_overflow=dropped.astype(jnp.float32),
        selected_overflow=jnp.maximum(qualified - num_selected, 0).astype(jnp.float32),
        unindexed=jnp.broadcast_to(unindexed[:, None, None], sampled.shape))

  return Estimator(init, append, attend)
