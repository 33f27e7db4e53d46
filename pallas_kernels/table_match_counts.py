"""MagicPIG's table-match counting: in how many of ``L`` tables a token's code is the query's.

``counts[b, h, s] = #{l : k_tables[b, h // G, s, l] == q_tables[b, h, l]}`` for
``s < length[b]``, and ``-1`` past it (below every real count). A full scan (``S * L``
compares per query): MagicPIG uses it for the tokens not yet in its bucketed tables.
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
  tokens: int = 256  # key codes per grid step


def table_match_counts_reference(q_tables: jax.Array, k_tables: jax.Array,
                                 length: jax.Array) -> jax.Array:
  """The jnp twin (and CPU path): ``q_tables uint [B, Hq, L]``, ``k_tables uint
  [B, Hkv, S, L]``, ``length int32 [B]`` -> ``int32 [B, Hq, S]``."""
  batch, num_q, tables = q_tables.shape
  num_kv, capacity = k_tables.shape[1], k_tables.shape[2]
  qg = q_tables.astype(jnp.int32).reshape(batch, num_kv, num_q // num_kv, 1, tables)
  equal = k_tables.astype(jnp.int32)[:, :, None, :, :] == qg
  # Counted in the narrowest type that holds L (XLA:CPU materialises the summand array).
  narrow = jnp.uint8 if tables <= 0xFF else jnp.int32
  counts = jnp.sum(equal.astype(narrow), axis=-1, dtype=narrow).astype(jnp.int32)
  counts = counts.reshape(batch, num_q, capacity)
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  return jnp.where(positions < length[:, None, None], counts, -1)


def _kernel(len_ref, q_ref, k_ref, o_ref, *, group, tables, block, capacity, masked):
  # len_ref: [1] int32; q_ref: [1, group, tables] uint; k_ref: [1, 1, block, tables] uint
  # o_ref: [1, group, block] int32; the last block may reach past ``capacity``
  positions = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
  inside = positions < capacity
  for g in range(group):
    counts = jnp.zeros((block,), jnp.int32)
    for l in range(tables):
      column = backend.load(k_ref.at[0, 0, :, l], mask=inside, other=0, masked=masked)
      counts += (column.astype(jnp.int32) == q_ref[0, g, l].astype(jnp.int32)).astype(jnp.int32)
    backend.store(o_ref.at[0, g, :], jnp.where(positions < len_ref[0], counts, -1),
                  mask=inside, masked=masked)


@functools.partial(jax.jit, static_argnames=["block_sizes", "interpret"])
def table_match_counts_kernel(q_tables: jax.Array, k_tables: jax.Array, length: jax.Array,
                              block_sizes: BlockSizes = BlockSizes(),
                              interpret: bool | None = None) -> jax.Array:
  """The Pallas kernel: grid over (batch, KV head, token blocks); tiles any ``S``."""
  batch, num_q, tables = q_tables.shape
  num_kv, capacity = k_tables.shape[1], k_tables.shape[2]
  group = num_q // num_kv
  length = length.astype(jnp.int32)
  if backend.mosaic_layout(interpret):
    return _tpu_call(q_tables, k_tables, length, block_sizes, interpret)
  block = min(block_sizes.tokens, pl.next_power_of_2(capacity))
  return backend.pallas_call(
      functools.partial(_kernel, group=group, tables=tables, block=block, capacity=capacity,
                        masked=backend.masks_edges(interpret)),
      out_shape=jax.ShapeDtypeStruct((batch, num_q, capacity), jnp.int32),
      grid=(batch, num_kv, pl.cdiv(capacity, block)),
      in_specs=[pl.BlockSpec((1,), lambda b, h, s: (b,)),
                pl.BlockSpec((1, group, tables), lambda b, h, s: (b, h, 0)),
                pl.BlockSpec((1, 1, block, tables), lambda b, h, s: (b, h, s, 0))],
      out_specs=pl.BlockSpec((1, group, block), lambda b, h, s: (b, h, s)),
      interpret=interpret, name="table_match_counts")(length, q_tables, k_tables)


def _tpu_call(q_tables, k_tables, length, block_sizes, interpret):
  """The same kernel body with Mosaic's block layout: the token block spans whole lanes
  (a multiple of 128, or all of ``S``); the length and a group's query codes (as int32:
  SMEM holds 32-bit scalars) are SMEM scalars; the output is viewed as
  ``[B, Hkv, G, S]`` so that a block's last two dimensions are ``(G, block)``."""
  batch, num_q, tables = q_tables.shape
  num_kv, capacity = k_tables.shape[1], k_tables.shape[2]
  group = num_q // num_kv
  block = backend.tpu_tile(block_sizes.tokens, capacity, 128)
  out = backend.pallas_call(
      functools.partial(_kernel, group=group, tables=tables, block=block, capacity=capacity,
                        masked=False),
      out_shape=jax.ShapeDtypeStruct((batch, num_kv, group, capacity), jnp.int32),
      grid=(batch, num_kv, pl.cdiv(capacity, block)),
      in_specs=[backend.tpu_scalars((None, None, 1), lambda b, h, s: (b, 0, 0)),
                backend.tpu_scalars((1, group, tables), lambda b, h, s: (b * num_kv + h, 0, 0)),
                pl.BlockSpec((1, 1, block, tables), lambda b, h, s: (b, h, s, 0))],
      out_specs=pl.BlockSpec((1, None, group, block), lambda b, h, s: (b, h, 0, s)),
      interpret=interpret, name="table_match_counts")(
          length.reshape(batch, 1, 1),
          q_tables.astype(jnp.int32).reshape(batch * num_kv, group, tables), k_tables)
  return out.reshape(batch, num_q, capacity)


def table_match_counts(q_tables, k_tables, length) -> jax.Array:
  """Counts with the kernel where ``backend.use_kernels()``, else the reference."""
  if backend.use_kernels():
    return table_match_counts_kernel(q_tables, k_tables, length)
  return table_match_counts_reference(q_tables, k_tables, length)
