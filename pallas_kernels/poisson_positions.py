r"""A Poisson draw of token positions by counter-based uniforms, written in ascending order
without a sort (vAttention's base and residual samples, ``sparse_attn._src.importance``).

Token ``i`` of row ``r`` is kept when :math:`u_{r,i} < \pi_{r,i}` (``prob``), with
:math:`u_{r,i}` the top 24 bits of ``counter_bits(seed_r, i)`` over :math:`2^{24}`: a keyed
bijective integer hash of the position (murmur3's ``fmix32`` finaliser, twice), so a row's
uniforms are computed where they are needed, by the kernel or by ``jnp``, identically, and
never stored. For fixed ``seed_r`` the hash is a bijection of the position: no two tokens
of a row share their bits.

*Fallback* rows (``fallback``: a fixed-rate uniform sample that must not come back empty)
also keep their token of smallest hash among those with :math:`0 < \pi < 1`. Where those
tokens share one probability (a uniform rate) that changes only an empty draw, since the
smallest hash has the smallest uniform: it then keeps one token, uniformly distributed
among them.

Two passes over the probabilities: per block of ``block`` tokens, the kept count and the
smallest such hash; then, from the prefix of the counts, each block writes its kept
positions and their :math:`\log \pi` straight to their slots
(``kept_positions.kept_slots``), as ``kept_positions`` does for a selection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels.kept_positions import kept_slots, written_reference

BLOCK = 1024  # tokens per grid step
_NONE = 0xFFFFFFFF  # "no token": above every hash a block's minimum is compared with


def fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection of ``uint32`` with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def counter_bits(seed: jax.Array, positions: jax.Array) -> jax.Array:
  """``uint32`` random bits of ``positions`` (int) under ``seed`` (``uint32``, broadcast):
  ``fmix32(fmix32(seed + 0x9E3779B9 i) ^ seed)``, a bijection of ``i`` for each seed."""
  x = positions.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + seed
  return fmix32(fmix32(x) ^ seed)


def uniform(bits: jax.Array) -> jax.Array:
  """``float32`` uniforms in ``[0, 1)`` on a grid of ``2**-24`` from ``uint32`` bits."""
  return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def _rest(prob):
  """Tokens a fallback may pick: drawn with a probability strictly between 0 and 1."""
  return (prob > 0.0) & (prob < 1.0)


def poisson_positions_reference(prob, seeds, fallback, size: int):
  r"""The jnp twin.

  Args:
    prob: ``float32 [B, R, S]`` inclusion probabilities (0: never; 1: always).
    seeds: ``uint32 [B, R]``; fallback: ``bool [B, R]``.
    size: static, the list size.

  Returns:
    ``(positions int32 [B, R, size], log_prob float32 [B, R, size], count int32 [B, R])``:
    the kept positions ascending and their :math:`\log \pi`, in the first
    ``min(count, size)`` slots (the others unspecified: 0 here); ``count`` counts every
    kept token, those past ``size`` too.
  """
  capacity = prob.shape[-1]
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  bits = counter_bits(seeds[..., None], positions)
  kept = uniform(bits) < prob
  rest_min = jnp.min(jnp.where(_rest(prob), bits, jnp.uint32(_NONE)), axis=-1)
  kept = kept | (fallback[..., None] & _rest(prob) & (bits == rest_min[..., None]))
  slot = jnp.where(kept, jnp.cumsum(kept, -1, dtype=jnp.int32) - 1, size)
  slot = jnp.minimum(slot, size)
  return (written_reference(slot, jnp.broadcast_to(positions, prob.shape), size),
          written_reference(slot, jnp.log(prob), size),
          jnp.sum(kept, -1, dtype=jnp.int32))


def _count_kernel(seed_ref, p_ref, c_ref, m_ref, k_ref, *, block, capacity, masked):
  # seed_ref: [1, 1] uint32; p_ref: [1, 1, block] float32; c_ref: [1, 1, 1] int32 (kept);
  # m_ref: [1, 1, 1] uint32 (the smallest hash of a token with 0 < prob < 1); k_ref:
  # [1, 1, 1] int32 (1 if that token is kept)
  positions = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
  inside = positions < capacity
  prob = backend.load(p_ref.at[0, 0, :], mask=inside, other=0.0, masked=masked)
  bits = counter_bits(seed_ref[0, 0], positions)
  kept = inside & (uniform(bits) < prob)
  c_ref[...] = jnp.sum(kept.astype(jnp.int32)).reshape(1, 1, 1)
  rest = inside & _rest(prob)
  smallest = jnp.min(jnp.where(rest, bits, jnp.uint32(_NONE)))
  m_ref[...] = smallest.reshape(1, 1, 1)
  k_ref[...] = jnp.sum((kept & rest & (bits == smallest)).astype(jnp.int32)).reshape(1, 1, 1)


def _write_kernel(seed_ref, pick_ref, picking_ref, kept_ref, p_ref, o_ref, lp_ref, *, block,
                  size, capacity, masked):
  # seed_ref, pick_ref: [1, 1] uint32 (pick: the hash to keep beside, where picking_ref:
  # [1, 1] int32 is 1);
  # kept_ref: [1, 1, 1] int32 (kept tokens before this block); p_ref: [1, 1, block]
  # float32; o_ref: [1, 1, size + 1] int32, lp_ref: [1, 1, size + 1] float32 (slot
  # ``size`` takes the tokens not kept: one store per token, no mask)
  positions = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
  inside = positions < capacity
  prob = backend.load(p_ref.at[0, 0, :], mask=inside, other=0.0, masked=masked)
  bits = counter_bits(seed_ref[0, 0], positions)
  picked = (picking_ref[0, 0] != 0) & _rest(prob) & (bits == pick_ref[0, 0])
  kept = inside & ((uniform(bits) < prob) | picked)
  slot = kept_slots(kept, kept_ref[0, 0, 0], size)
  o_ref[0, 0, slot] = positions
  lp_ref[0, 0, slot] = jnp.log(prob)


@functools.partial(jax.jit, static_argnames=["size", "block", "interpret"])
def poisson_positions_kernel(prob, seeds, fallback, size: int, block: int = BLOCK,
                             interpret: bool | None = None):
  """The Pallas kernels (a counting pass, then a writing pass; grid over batch, row and
  token block); same contract as the reference. GPU (Triton) and interpret mode; no TPU
  variant (Mosaic has no scattered store): use the reference there."""
  batch, rows, capacity = prob.shape
  blocks = -(-capacity // block)
  prob = prob.astype(jnp.float32)
  seeds = seeds.astype(jnp.uint32)
  masked = backend.masks_edges(interpret)
  per_row = pl.BlockSpec((1, 1), lambda b, r, j: (b, r))
  per_block = pl.BlockSpec((1, 1, 1), lambda b, r, j: (b, r, j))
  tokens = pl.BlockSpec((1, 1, block), lambda b, r, j: (b, r, j))
  counts, mins, min_kept = backend.pallas_call(
      functools.partial(_count_kernel, block=block, capacity=capacity, masked=masked),
      out_shape=(jax.ShapeDtypeStruct((batch, rows, blocks), jnp.int32),
                 jax.ShapeDtypeStruct((batch, rows, blocks), jnp.uint32),
                 jax.ShapeDtypeStruct((batch, rows, blocks), jnp.int32)),
      grid=(batch, rows, blocks), in_specs=[per_row, tokens],
      out_specs=(per_block, per_block, per_block), interpret=interpret,
      name="poisson_positions_count")(seeds, prob)
  # A fallback row also keeps its smallest hash: one more in the block that holds it, unless
  # the draw kept it already.
  rest_min = jnp.min(mins, -1)
  picking = fallback & (rest_min != jnp.uint32(_NONE))
  at_min = mins == rest_min[..., None]
  counts = counts + (picking[..., None] & at_min & (min_kept == 0)).astype(jnp.int32)
  kept_before = jnp.cumsum(counts, -1, dtype=jnp.int32) - counts
  row = pl.BlockSpec((1, 1, size + 1), lambda b, r, j: (b, r, 0))
  positions, log_prob = backend.pallas_call(
      functools.partial(_write_kernel, block=block, size=size, capacity=capacity,
                        masked=masked),
      out_shape=(jax.ShapeDtypeStruct((batch, rows, size + 1), jnp.int32),
                 jax.ShapeDtypeStruct((batch, rows, size + 1), jnp.float32)),
      grid=(batch, rows, blocks), in_specs=[per_row, per_row, per_row, per_block, tokens],
      out_specs=(row, row), interpret=interpret, name="poisson_positions")(
          seeds, rest_min, picking.astype(jnp.int32), kept_before, prob)
  return positions[..., :size], log_prob[..., :size], jnp.sum(counts, -1, dtype=jnp.int32)
