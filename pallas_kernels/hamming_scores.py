"""Hamming scoring of packed key codes against a GQA group's query codes.

``scores[b, h, s] = sum_g (D - popcount(q[b, h*G + g] ^ k[b, h, s]))`` for ``s < length[b]``
and ``-1`` past it (below every real score). Padding bits past ``D`` are 0 in both codes.
``hamming_similarity``: the same per query (``[B, Hkv, G, S]``, not summed), each key block
read once for its group (SimHash's per-query ranking and vAttention's proxies). Its output
is ``G`` times as large as the summed scores' and the selection's histogram and
kept-positions kernels read it again, so it is ``int16`` (similarities are at most ``bits``,
under ``2**15``): half the bytes of ``int32``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  tokens: int = 512  # key codes per grid step


def hamming_scores_reference(q_codes: jax.Array, k_codes: jax.Array, length: jax.Array,
                             head_dim: int) -> jax.Array:
  """The jnp twin (and CPU path): ``q_codes [B, Hq, W]``, ``k_codes [B, Hkv, S, W]``,
  ``length int32 [B]`` -> ``int32 [B, Hkv, S]``."""
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  qg = q_codes.reshape(batch, num_kv, num_q // num_kv, 1, words)
  diff = jnp.bitwise_xor(qg, k_codes[:, :, None, :, :])
  mismatches = jnp.sum(jax.lax.population_count(diff), axis=(2, 4), dtype=jnp.int32)
  scores = (num_q // num_kv) * head_dim - mismatches
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  return jnp.where(positions < length[:, None, None], scores, -1)


def popcount32(x: jax.Array) -> jax.Array:
  """Set bits of each ``uint32`` by shifts, masks and one multiply: Triton cannot lower
  ``lax.population_count`` (``math.ctpop``), measured with jax 0.11.2 on an H100."""
  x = x - ((x >> 1) & 0x55555555)
  x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
  x = (x + (x >> 4)) & 0x0F0F0F0F
  return ((x * 0x01010101) >> 24).astype(jnp.int32)


def _kernel(len_ref, q_ref, k_ref, o_ref, *, group, words, head_dim, block, capacity, masked):
  # len_ref: [1] int32; q_ref: [1, group, words] uint32; k_ref: [1, 1, block, words] uint32
  # o_ref: [1, 1, block] int32; the last block may reach past ``capacity``
  positions = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
  inside = positions < capacity
  mismatches = jnp.zeros((block,), jnp.int32)
  for w in range(words):
    column = backend.load(k_ref.at[0, 0, :, w], mask=inside, other=0, masked=masked)
    for g in range(group):
      mismatches += popcount32(jnp.bitwise_xor(column, q_ref[0, g, w]))
  backend.store(o_ref.at[0, 0, :],
                jnp.where(positions < len_ref[0], group * head_dim - mismatches, -1),
                mask=inside, masked=masked)


@functools.partial(jax.jit, static_argnames=["head_dim", "block_sizes", "interpret"])
def hamming_scores_kernel(q_codes: jax.Array, k_codes: jax.Array, length: jax.Array,
                          head_dim: int, block_sizes: BlockSizes = BlockSizes(),
                          interpret: bool | None = None) -> jax.Array:
  """The Pallas kernel: grid over (batch, KV head, token blocks); tiles any ``S``."""
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  group = num_q // num_kv
  length = length.astype(jnp.int32)
  if backend.mosaic_layout(interpret):
    return _tpu_call(q_codes, k_codes, length, head_dim, block_sizes, interpret)
  block = min(block_sizes.tokens, pl.next_power_of_2(capacity))
  return backend.pallas_call(
      functools.partial(_kernel, group=group, words=words, head_dim=head_dim, block=block,
                        capacity=capacity,
                        masked=backend.masks_edges(interpret)),
      out_shape=jax.ShapeDtypeStruct((batch, num_kv, capacity), jnp.int32),
      grid=(batch, num_kv, pl.cdiv(capacity, block)),
      in_specs=[pl.BlockSpec((1,), lambda b, h, s: (b,)),
                pl.BlockSpec((1, group, words), lambda b, h, s: (b, h, 0)),
                pl.BlockSpec((1, 1, block, words), lambda b, h, s: (b, h, s, 0))],
      out_specs=pl.BlockSpec((1, 1, block), lambda b, h, s: (b, h, s)),
      interpret=interpret, name="hamming_scores")(length, q_codes, k_codes)


def _tpu_call(q_codes, k_codes, length, head_dim, block_sizes, interpret):
  """The same kernel body with Mosaic's block layout: the token block spans whole lanes
  (a multiple of 128, or all of ``S``); the length and a group's query codes are SMEM
  scalars; the output gains a unit dimension so that its block's last two dimensions are
  ``(1, block)`` of ``(1, S)``."""
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  group = num_q // num_kv
  block = backend.tpu_tile(block_sizes.tokens, capacity, 128)
  out = backend.pallas_call(
      functools.partial(_kernel, group=group, words=words, head_dim=head_dim, block=block,
                        capacity=capacity, masked=False),
      out_shape=jax.ShapeDtypeStruct((batch, num_kv, 1, capacity), jnp.int32),
      grid=(batch, num_kv, pl.cdiv(capacity, block)),
      in_specs=[backend.tpu_scalars((None, None, 1), lambda b, h, s: (b, 0, 0)),
                backend.tpu_scalars((1, group, words), lambda b, h, s: (b * num_kv + h, 0, 0)),
                pl.BlockSpec((1, 1, block, words), lambda b, h, s: (b, h, s, 0))],
      out_specs=pl.BlockSpec((1, 1, None, block), lambda b, h, s: (b, h, 0, s)),
      interpret=interpret, name="hamming_scores")(
          length.reshape(batch, 1, 1), q_codes.reshape(batch * num_kv, group, words), k_codes)
  return out.reshape(batch, num_kv, capacity)


def hamming_similarity_reference(q_codes: jax.Array, k_codes: jax.Array, length: jax.Array,
                                 bits: int) -> jax.Array:
  """Per query, not summed over the group: ``q_codes [B, Hq, W]``, ``k_codes [B, Hkv, S,
  W]``, ``length int32 [B]`` -> ``int16 [B, Hkv, G, S]``, ``bits - popcount(q ^ k)``, and
  ``-1`` at or past ``length``."""
  _check_bits(bits)
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  qg = q_codes.reshape(batch, num_kv, num_q // num_kv, 1, words)
  diff = jnp.bitwise_xor(qg, k_codes[:, :, None, :, :])
  scores = bits - jnp.sum(jax.lax.population_count(diff), axis=-1, dtype=jnp.int32)
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, None, :]
  return jnp.where(positions < length[:, None, None, None], scores, -1).astype(jnp.int16)


def _check_bits(bits):
  if not isinstance(bits, int) or not 0 < bits < 2**15:
    raise ValueError(f"bits must be an int in [1, 2**15) (int16 similarities), got {bits!r}")


def _per_query_kernel(len_ref, q_ref, k_ref, o_ref, *, group, words, bits, block, capacity,
                      masked):
  # len_ref: [1] int32; q_ref: [1, group, words] uint32; k_ref: [1, 1, block, words] uint32
  # o_ref: [1, 1, group, block] int16: each key block read once for the whole group
  positions = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
  inside = positions < capacity
  mismatches = [jnp.zeros((block,), jnp.int32) for _ in range(group)]
  for w in range(words):
    column = backend.load(k_ref.at[0, 0, :, w], mask=inside, other=0, masked=masked)
    for g in range(group):
      mismatches[g] += popcount32(jnp.bitwise_xor(column, q_ref[0, g, w]))
  hashed = positions < len_ref[0]
  for g in range(group):
    backend.store(o_ref.at[0, 0, g, :],
                  jnp.where(hashed, bits - mismatches[g], -1).astype(jnp.int16),
                  mask=inside, masked=masked)


@functools.partial(jax.jit, static_argnames=["bits", "block_sizes", "interpret"])
def hamming_similarity_kernel(q_codes: jax.Array, k_codes: jax.Array, length: jax.Array,
                              bits: int, block_sizes: BlockSizes = BlockSizes(),
                              interpret: bool | None = None) -> jax.Array:
  """The Pallas kernel of ``hamming_similarity_reference`` (grid over batch, KV head and
  token blocks). GPU (Triton) and interpret mode; no TPU layout (the reference there)."""
  _check_bits(bits)
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  group = num_q // num_kv
  block = min(block_sizes.tokens, pl.next_power_of_2(capacity))
  return backend.pallas_call(
      functools.partial(_per_query_kernel, group=group, words=words, bits=bits, block=block,
                        capacity=capacity, masked=backend.masks_edges(interpret)),
      out_shape=jax.ShapeDtypeStruct((batch, num_kv, group, capacity), jnp.int16),
      grid=(batch, num_kv, pl.cdiv(capacity, block)),
      in_specs=[pl.BlockSpec((1,), lambda b, h, s: (b,)),
                pl.BlockSpec((1, group, words), lambda b, h, s: (b, h, 0)),
                pl.BlockSpec((1, 1, block, words), lambda b, h, s: (b, h, s, 0))],
      out_specs=pl.BlockSpec((1, 1, group, block), lambda b, h, s: (b, h, 0, s)),
      interpret=interpret, name="hamming_similarity")(length.astype(jnp.int32), q_codes,
                                                      k_codes)


def hamming_similarity(q_codes, k_codes, length, bits: int) -> jax.Array:
  """Per-query similarities with the kernel where ``backend.use_kernels`` enables it (not
  on a TPU), else the reference."""
  if backend.use_kernels("hamming_similarity") and not backend.mosaic_layout(None):
    return hamming_similarity_kernel(q_codes, k_codes, length, bits)
  return hamming_similarity_reference(q_codes, k_codes, length, bits)


def hamming_scores(q_codes, k_codes, length, head_dim: int) -> jax.Array:
  """Scores with the kernel where ``backend.use_kernels()``, else the reference."""
  if backend.use_kernels():
    return hamming_scores_kernel(q_codes, k_codes, length, head_dim)
  return hamming_scores_reference(q_codes, k_codes, length, head_dim)
