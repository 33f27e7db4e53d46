"""MagicPIG's table-match counting: in how many of ``L`` tables a token's code is the query's.

Codes are stored packed (``pack_codes``): table ``l``'s ``K``-bit code is bits
``[l K, (l + 1) K)`` of the token's bit string, held in ``W = ceil(K L / 32)`` uint32 words
(188 bytes per token and KV head for ``K=10, L=150``, against 300 as one uint16 per table
and 512 for the bf16 key and value at ``D = 128``). A table matches where the ``K`` bits of
``query XOR key`` are all zero, a field that may straddle two words.

``counts[b, h, s] = min(cap, #{l : code_l(k[b, h // G, s]) == code_l(q[b, h])})`` for
``s < length[b]``, and ``-1`` past it (below every real count). ``cap`` (default ``L``)
narrows the output: MagicPIG only asks whether a count reaches ``min_collisions``, and a
sum of counts capped at ``m`` reaches ``m`` exactly when the uncapped sum does. A full scan
(``S * W`` words per query group): MagicPIG's retrieval on accelerators, and on the CPU for
the tokens not yet in its bucketed tables.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import backend


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  tokens: int = 256  # key codes per grid step


def code_words(K: int, L: int) -> int:
  """uint32 words per packed code: ``ceil(K L / 32)``."""
  return -(-K * L // 32)


def _fields(K: int, L: int):
  """Per table: ``(word, shift, straddle bits)``: its code starts at bit ``shift`` of
  ``word`` and its last ``straddle`` bits (0 if none) are the low bits of ``word + 1``."""
  for l in range(L):
    word, shift = divmod(l * K, 32)
    yield word, shift, max(0, shift + K - 32)


def _field(word_at, K: int, word: int, shift: int, straddle: int) -> jax.Array:
  """Table code at ``(word, shift, straddle)`` of ``word_at(w)`` (uint32 arrays)."""
  value = word_at(word) >> jnp.uint32(shift)
  if straddle:
    value = value | (word_at(word + 1) << jnp.uint32(K - straddle))
  return value & jnp.uint32((1 << K) - 1)


# The jnp functions below work in chunks of 32 tables: 32 K-bit codes fill exactly K words,
# and every chunk has the same layout (``_fields(K, 32)``), so the traced program has a
# constant number of ops whatever L (unrolling over L tables made L = 1200 compile for
# minutes on a CPU).


def _chunks(n: int) -> int:
  return -(-n // 32)


def pack_codes(codes: jax.Array, K: int) -> jax.Array:
  """``uint [..., L]`` codes (each ``< 2**K``) -> ``uint32 [..., ceil(K L / 32)]``."""
  L = codes.shape[-1]
  codes = codes.astype(jnp.uint32)
  codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 32 * _chunks(L) - L)])
  codes = codes.reshape(*codes.shape[:-1], _chunks(L), 32)
  words = [jnp.uint32(0)] * K
  for l, (word, shift, straddle) in enumerate(_fields(K, 32)):
    words[word] = words[word] | (codes[..., l] << jnp.uint32(shift))
    if straddle:
      words[word + 1] = words[word + 1] | (codes[..., l] >> jnp.uint32(K - straddle))
  words = jnp.stack(words, axis=-1).reshape(*codes.shape[:-2], K * _chunks(L))
  return words[..., :code_words(K, L)]


def _chunked(words: jax.Array, K: int, L: int, past: bool) -> jax.Array:
  """``uint32 [..., W] -> [..., chunks, K]``, zero-padded; with ``past``, the bits after
  the last table's set to 1 (so the fields past table ``L`` are never a zero code)."""
  pad = K * _chunks(L) - words.shape[-1]
  words = jnp.pad(words.astype(jnp.uint32), [(0, 0)] * (words.ndim - 1) + [(0, pad)])
  if past:
    bits = np.zeros(K * _chunks(L), np.uint64)
    for bit in range(K * L, 32 * K * _chunks(L)):
      bits[bit // 32] |= np.uint64(1 << (bit % 32))
    words = words | bits.astype(np.uint32).reshape((1,) * (words.ndim - 1) + (-1,))
  return words.reshape(*words.shape[:-1], _chunks(L), K)


def _chunk_fields(chunked: jax.Array, K: int) -> list[jax.Array]:
  """The 32 fields of each chunk: a list of ``uint32 [..., chunks]``."""
  return [_field(lambda w: chunked[..., w], K, *f) for f in _fields(K, 32)]


def unpack_codes(words: jax.Array, K: int, L: int) -> jax.Array:
  """``pack_codes`` inverted: ``uint32 [..., W] -> uint32 [..., L]``."""
  fields = jnp.stack(_chunk_fields(_chunked(words, K, L, False), K), axis=-1)
  return fields.reshape(*fields.shape[:-2], 32 * _chunks(L))[..., :L]


def count_dtype(cap: int):
  """The narrowest signed type holding ``[-1, cap]``."""
  return jnp.int8 if cap <= 127 else jnp.int16 if cap <= 32767 else jnp.int32


def _check(q_words, k_words, K: int, L: int, cap: int | None) -> int:
  words = code_words(K, L)
  if q_words.shape[-1] != words or k_words.shape[-1] != words:
    raise ValueError(f"packed codes must have ceil(K*L/32) = {words} words for K={K}, L={L}, "
                     f"got q_words {q_words.shape} and k_words {k_words.shape}")
  cap = L if cap is None else cap
  if not 1 <= cap <= L:
    raise ValueError(f"cap must be in [1, L={L}], got {cap}")
  return cap


def table_match_counts_reference(q_words: jax.Array, k_words: jax.Array, length: jax.Array,
                                 K: int, L: int, cap: int | None = None) -> jax.Array:
  """The jnp twin (and CPU path): ``q_words uint32 [B, Hq, W]``, ``k_words uint32
  [B, Hkv, S, W]``, ``length int32 [B]`` -> ``count_dtype(cap) [B, Hq, S]``."""
  cap = _check(q_words, k_words, K, L, cap)
  batch, num_q = q_words.shape[:2]
  num_kv, capacity = k_words.shape[1], k_words.shape[2]
  qg = _chunked(q_words, K, L, False).reshape(batch, num_kv, num_q // num_kv, 1, -1, K)
  x = _chunked(k_words, K, L, True)[:, :, None] ^ qg  # [B, Hkv, G, S, chunks, K]
  narrow = count_dtype(L)  # 32 terms per chunk, summed over chunks (XLA fuses it all)
  counts = sum((f == 0).astype(narrow) for f in _chunk_fields(x, K)).sum(-1, dtype=narrow)
  counts = jnp.minimum(counts, cap).astype(count_dtype(cap)).reshape(batch, num_q, capacity)
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  return jnp.where(positions < length[:, None, None], counts, -1).astype(count_dtype(cap))


def _kernel(len_ref, q_ref, k_ref, o_ref, *, group, K, L, cap, block, capacity, masked,
            dtype):
  # len_ref: [1] int32; q_ref: [1, group, W] (uint32; int32 in SMEM on TPU);
  # k_ref: [1, 1, block, W] uint32; o_ref: [1, group, block]; the last block may reach
  # past ``capacity``
  positions = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
  inside = positions < capacity
  # Each code word is read once for the whole group; word w's XOR with each query is kept
  # until the tables ending in it are counted (a table may straddle words w - 1 and w).
  ends = {}
  for field in _fields(K, L):
    ends.setdefault(field[0] + (1 if field[2] else 0), []).append(field)
  counts = [jnp.zeros((block,), jnp.int32) for _ in range(group)]
  previous = [None] * group
  for w in range(code_words(K, L)):
    column = backend.load(k_ref.at[0, 0, :, w], mask=inside, other=0, masked=masked)
    for g in range(group):
      x = column ^ q_ref[0, g, w].astype(jnp.uint32)
      word_at = {w: x, w - 1: previous[g]}.__getitem__
      for field in ends.get(w, ()):
        counts[g] += (_field(word_at, K, *field) == 0).astype(jnp.int32)
      previous[g] = x
  for g in range(group):
    value = jnp.where(positions < len_ref[0], jnp.minimum(counts[g], cap), -1)
    backend.store(o_ref.at[0, g, :], value.astype(dtype), mask=inside, masked=masked)


@functools.partial(jax.jit, static_argnames=["K", "L", "cap", "block_sizes", "interpret"])
def table_match_counts_kernel(q_words: jax.Array, k_words: jax.Array, length: jax.Array,
                              K: int, L: int, cap: int | None = None,
                              block_sizes: BlockSizes = BlockSizes(),
                              interpret: bool | None = None) -> jax.Array:
  """The Pallas kernel: grid over (batch, KV head, token blocks); tiles any ``S``."""
  cap = _check(q_words, k_words, K, L, cap)
  batch, num_q, words = q_words.shape
  num_kv, capacity = k_words.shape[1], k_words.shape[2]
  group = num_q // num_kv
  length = length.astype(jnp.int32)
  k_words = k_words.astype(jnp.uint32)
  kernel = functools.partial(_kernel, group=group, K=K, L=L, cap=cap, capacity=capacity)
  if backend.mosaic_layout(interpret):
    return _tpu_call(kernel, q_words, k_words, length, cap, block_sizes, interpret)
  block = min(block_sizes.tokens, pl.next_power_of_2(capacity))
  return backend.pallas_call(
      functools.partial(kernel, block=block, masked=backend.masks_edges(interpret),
                        dtype=count_dtype(cap)),
      out_shape=jax.ShapeDtypeStruct((batch, num_q, capacity), count_dtype(cap)),
      grid=(batch, num_kv, pl.cdiv(capacity, block)),
      in_specs=[pl.BlockSpec((1,), lambda b, h, s: (b,)),
                pl.BlockSpec((1, group, words), lambda b, h, s: (b, h, 0)),
                pl.BlockSpec((1, 1, block, words), lambda b, h, s: (b, h, s, 0))],
      out_specs=pl.BlockSpec((1, group, block), lambda b, h, s: (b, h, s)),
      interpret=interpret, name="table_match_counts")(
          length, q_words.astype(jnp.uint32), k_words)


def _tpu_call(kernel, q_words, k_words, length, cap, block_sizes, interpret):
  """The same kernel body with Mosaic's block layout: the token block spans whole lanes
  (a multiple of 128, or all of ``S``); the length and a group's query words (as int32:
  SMEM holds 32-bit scalars) are SMEM scalars; the output is viewed as ``[B, Hkv, G, S]``
  so that a block's last two dimensions are ``(G, block)``, in int32 (narrow types tile
  differently there) narrowed after."""
  batch, num_q, words = q_words.shape
  num_kv, capacity = k_words.shape[1], k_words.shape[2]
  group = num_q // num_kv
  block = backend.tpu_tile(block_sizes.tokens, capacity, 128)
  out = backend.pallas_call(
      functools.partial(kernel, block=block, masked=False, dtype=jnp.int32),
      out_shape=jax.ShapeDtypeStruct((batch, num_kv, group, capacity), jnp.int32),
      grid=(batch, num_kv, pl.cdiv(capacity, block)),
      in_specs=[backend.tpu_scalars((None, None, 1), lambda b, h, s: (b, 0, 0)),
                backend.tpu_scalars((1, group, words), lambda b, h, s: (b * num_kv + h, 0, 0)),
                pl.BlockSpec((1, 1, block, words), lambda b, h, s: (b, h, s, 0))],
      out_specs=pl.BlockSpec((1, None, group, block), lambda b, h, s: (b, h, 0, s)),
      interpret=interpret, name="table_match_counts")(
          length.reshape(batch, 1, 1),
          jax.lax.bitcast_convert_type(q_words.astype(jnp.uint32), jnp.int32).reshape(
              batch * num_kv, group, words), k_words)
  return out.reshape(batch, num_q, capacity).astype(count_dtype(cap))


def table_match_counts(q_words, k_words, length, K: int, L: int,
                       cap: int | None = None) -> jax.Array:
  """Counts with the kernel where ``backend.use_kernels()``, else the reference."""
  if backend.use_kernels():
    return table_match_counts_kernel(q_words, k_words, length, K, L, cap)
  return table_match_counts_reference(q_words, k_words, length, K, L, cap)
