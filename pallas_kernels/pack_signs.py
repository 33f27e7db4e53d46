"""Sign packing: ``[..., D]`` floats -> ``uint32 [..., ceil(D/32)]``, LSB-first.

Bit ``j`` of word ``w`` is ``x[..., 32 w + j] > 0`` (``sign(0)`` counts as negative; padding
bits past ``D`` are 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  rows: int = 256  # vectors per grid step


def pack_signs_reference(x: jax.Array) -> jax.Array:
  """The jnp twin (and CPU path) of ``pack_signs``."""
  d = x.shape[-1]
  words = math.ceil(d / 32)
  bits = (x > 0).astype(jnp.uint32)
  bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, 32 * words - d)])
  bits = bits.reshape(x.shape[:-1] + (words, 32))
  shifts = jnp.arange(32, dtype=jnp.uint32).reshape((1,) * (bits.ndim - 1) + (32,))
  return jnp.sum(jnp.left_shift(bits, shifts), axis=-1, dtype=jnp.uint32)


def _kernel(x_ref, o_ref, *, words, signed):
  # x_ref: [rows, 32 * words] float; o_ref: [rows, words] uint32. With ``signed`` (Mosaic
  # has no unsigned reductions) the bits are summed as int32: distinct powers of two, so
  # the wrapped sum has the same bits, reinterpreted as uint32.
  dtype = jnp.int32 if signed else jnp.uint32
  shifts = jnp.arange(32, dtype=dtype)[None, :]
  for w in range(words):
    bits = (x_ref[:, 32 * w:32 * (w + 1)] > 0).astype(dtype)
    packed = jnp.sum(jnp.left_shift(bits, shifts), axis=-1, dtype=dtype)
    o_ref[:, w] = jax.lax.bitcast_convert_type(packed, jnp.uint32) if signed else packed


@functools.partial(jax.jit, static_argnames=["block_sizes", "interpret"])
def pack_signs_kernel(x: jax.Array, block_sizes: BlockSizes = BlockSizes(),
                      interpret: bool | None = None) -> jax.Array:
  """The Pallas kernel: any leading shape, any ``D`` (padded to a multiple of 32)."""
  lead, d = x.shape[:-1], x.shape[-1]
  words = math.ceil(d / 32)
  flat = x.reshape(-1, d)
  n = flat.shape[0]
  tpu = backend.mosaic_layout(interpret)
  if tpu:  # whole sublane tiles: 8 rows of 32-bit values, 16 of 16-bit ones
    rows = backend.tpu_tile(block_sizes.rows, n, 8 * max(1, 4 // x.dtype.itemsize))
  else:
    rows = min(block_sizes.rows, pl.next_power_of_2(max(n, 1)))
  # Whole blocks only: the Triton lowering does not clip a partial last block.
  flat = jnp.pad(flat, [(0, -n % rows), (0, 32 * words - d)])
  out = backend.pallas_call(
      functools.partial(_kernel, words=words, signed=tpu),
      out_shape=jax.ShapeDtypeStruct((flat.shape[0], words), jnp.uint32),
      grid=(flat.shape[0] // rows,),
      in_specs=[pl.BlockSpec((rows, 32 * words), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((rows, words), lambda i: (i, 0)),
      interpret=interpret, name="pack_signs")(flat)
  return out[:n].reshape(lead + (words,))


def pack_signs(x: jax.Array) -> jax.Array:
  """Packs signs with the kernel where ``backend.use_kernels()``, else the reference."""
  return pack_signs_kernel(x) if backend.use_kernels() else pack_signs_reference(x)
