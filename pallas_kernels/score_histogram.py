r"""Per-block histograms of small integer scores (Hamming similarities), for selection by
counting: the exact ``k``-th largest score follows from the summed histogram, and the ties
before any block from the blocks' counts of that score (``sparse_attn._src.selection``).

``hist[r, j, v]`` counts the eligible tokens of block ``j`` (``block`` tokens) of row ``r``
whose score is ``lo + v``, for ``v`` in ``[0, 1024)``; a token is eligible when
``sinks <= position < length - local`` (the residual of an exact window).

The kernel counts with one small matrix product per block: ``v = 32 h + l`` and
``hist[h, l] = sum_t [h_t = h] [l_t = l]``, the product of two one-hot ``[block, 32]``
matrices (exact in float32), so no scatter and no atomics.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

BINS = 1024  # scores lo .. lo + 1023; 32 x 32 one-hot product


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block: int = 1024  # tokens per histogram (and per grid step)


def eligible_mask(positions: jax.Array, length: jax.Array, sinks: int, local: int) -> jax.Array:
  """``positions [..., n]`` and ``length`` broadcastable to ``[..., 1]``."""
  return (positions >= sinks) & (positions < length - local)


def score_histogram_reference(scores: jax.Array, length: jax.Array, lo: int, sinks: int,
                              local: int, block: int) -> jax.Array:
  """The jnp twin: ``scores int32 [B, H, S]``, ``length int32 [B]`` -> ``int32 [B, H,
  ceil(S / block), BINS]``. Scores outside ``[lo, lo + BINS)`` are not allowed."""
  batch, heads, capacity = scores.shape
  blocks = -(-capacity // block)
  padded = jnp.pad(scores, [(0, 0), (0, 0), (0, blocks * block - capacity)])
  positions = jnp.arange(blocks * block, dtype=jnp.int32)[None, None, :]
  ok = eligible_mask(positions, length[:, None, None], sinks, local) & (positions < capacity)
  values = jnp.where(ok, padded - lo, BINS)  # BINS: dropped by the one-hot below
  onehot = values.reshape(batch, heads, blocks, block, 1) == jnp.arange(BINS).reshape(
      1, 1, 1, 1, BINS)
  return jnp.sum(onehot, axis=3, dtype=jnp.int32)


def _kernel(len_ref, s_ref, o_ref, *, block, lo, sinks, local, capacity, masked):
  # len_ref: [1] int32; s_ref: [1, 1, block] int32; o_ref: [1, 1, 1, 32, 32] int32
  positions = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
  inside = positions < capacity
  s = backend.load(s_ref.at[0, 0, :], mask=inside, other=0, masked=masked)
  ok = inside & eligible_mask(positions, len_ref[0], sinks, local)
  v = s - lo
  lanes = jnp.arange(32, dtype=jnp.int32)[None, :]
  high = jnp.where(ok[:, None] & ((v[:, None] >> 5) == lanes), 1.0, 0.0).astype(jnp.bfloat16)
  low = jnp.where((v[:, None] & 31) == lanes, 1.0, 0.0).astype(jnp.bfloat16)
  counts = jax.lax.dot_general(high, low, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)  # [32, 32]
  o_ref[0, 0, 0] = counts.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=["lo", "sinks", "local", "block_sizes", "interpret"])
def score_histogram_kernel(scores: jax.Array, length: jax.Array, lo: int, sinks: int = 0,
                           local: int = 0, block_sizes: BlockSizes = BlockSizes(),
                           interpret: bool | None = None) -> jax.Array:
  """The Pallas kernel: grid over (batch, head, token block); same contract as the
  reference with ``block = block_sizes.block``."""
  batch, heads, capacity = scores.shape
  block = block_sizes.block
  blocks = -(-capacity // block)
  kernel = functools.partial(_kernel, block=block, lo=lo, sinks=sinks, local=local,
                             capacity=capacity, masked=backend.masks_edges(interpret))
  out_shape = jax.ShapeDtypeStruct((batch, heads, blocks, 32, 32), jnp.int32)
  out_spec = pl.BlockSpec((1, 1, 1, 32, 32), lambda b, h, j: (b, h, j, 0, 0))
  if backend.mosaic_layout(interpret):
    hist = backend.pallas_call(
        kernel, out_shape=out_shape, grid=(batch, heads, blocks),
        in_specs=[backend.tpu_scalars((None, None, 1), lambda b, h, j: (b, 0, 0)),
                  tpu_block_spec(block)],
        out_specs=out_spec, interpret=interpret, name="score_histogram")(
            length.astype(jnp.int32).reshape(batch, 1, 1), tpu_blocks(scores, block))
    return hist.reshape(batch, heads, blocks, BINS)
  hist = backend.pallas_call(
      kernel, out_shape=out_shape, grid=(batch, heads, blocks),
      in_specs=[pl.BlockSpec((1,), lambda b, h, j: (b,)),
                pl.BlockSpec((1, 1, block), lambda b, h, j: (b, h, j))],
      out_specs=out_spec, interpret=interpret, name="score_histogram")(
          length.astype(jnp.int32), scores.astype(jnp.int32))
  return hist.reshape(batch, heads, blocks, BINS)


def tpu_blocks(scores: jax.Array, block: int) -> jax.Array:
  """``int32 [B, H, S]`` -> ``[B, H, ceil(S / block), 1, block]`` (padded with 0), for
  ``tpu_block_spec``: the histogram's ``block`` is part of the contract, not a tile size,
  so it need not be a multiple of Mosaic's 128 lanes; as a whole last dimension it may be
  any size."""
  batch, heads, capacity = scores.shape
  padded = jnp.pad(scores.astype(jnp.int32), [(0, 0), (0, 0), (0, -capacity % block)])
  return padded.reshape(batch, heads, -1, 1, block)


def tpu_block_spec(block: int) -> pl.BlockSpec:
  """Block ``(b, h, j)`` of ``tpu_blocks``' array, seen by the kernel as ``[1, 1, block]``."""
  return pl.BlockSpec((1, 1, None, None, block), lambda b, h, j: (b, h, j, 0, 0))
