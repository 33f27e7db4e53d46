"""The TPU (Mosaic) variant of dense split-K decode attention (``decode_attention``).

Same contract and reference as ``decode_attention.decode_attention_kernel``; the wrapper
there picks this variant where ``backend.mosaic_layout(interpret)`` (on a TPU, or where
``interpret`` is a ``pltpu.InterpretParams``, Pallas' TPU interpret mode). Why a separate
body:

* Mosaic takes no rank-1 ``[1]`` block of ``length`` (a rank-1 block must be the whole
  array or a multiple of 1024 elements): the lengths are scalar-prefetched into SMEM, where
  the index maps can read them too.
* The GPU body takes a head's whole ``[S, D]`` cache as one block, which on a TPU would copy
  every row into VMEM. Here the K/V blocks are grid steps of ``block`` rows: the grid is
  (batch, KV head, split, block of the split), Pallas double-buffers the blocks' DMAs, and
  the online softmax state lives in VMEM scratch across the last (sequential) axis. A
  block past ``length`` maps to the last valid block, so its DMA is skipped (Pallas does not
  fetch a block again when its index is unchanged) and its step does no work.
* Shapes stay 2-D (``[R, 1]`` columns instead of ``[R]`` vectors), Mosaic's native layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend


def _dot(a, b, contract):
  """``a . b`` over the given dims in float32 (HIGHEST: float32 operands in full)."""
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST)


def _weighted_values(p, v):
  """``p [R, n] float32 @ v [n, D]``; 16-bit ``v`` as two bf16 products (``p = hi + lo``),
  as the GPU body does, so the output keeps about 16 bits of ``p``."""
  if v.dtype == jnp.float32:
    return _dot(p, v, ((1,), (0,)))
  hi = p.astype(v.dtype)
  lo = (p - hi.astype(jnp.float32)).astype(v.dtype)
  return _dot(hi, v, ((1,), (0,))) + _dot(lo, v, ((1,), (0,)))


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, bad_ref, *,
            block, blocks_per_split, capacity, scale):
  # len_ref: SMEM int32 [B]; q_ref: [1, 1, R, D]; k_ref, v_ref: [1, 1, block, D]
  # o_ref: [1, 1, 1, R, D] float32; lse_ref: [1, 1, 1, R, 1] float32
  # scratch m, l, bad: [R, 1] float32; acc: [R, D] float32
  b, i = pl.program_id(0), pl.program_id(3)
  length = jnp.minimum(len_ref[b], capacity)
  start = (pl.program_id(2) * blocks_per_split + i) * block

  @pl.when(i == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    bad_ref[...] = jnp.zeros(bad_ref.shape, jnp.float32)

  @pl.when(start < length)
  def _step():
    q = q_ref[0, 0]  # [R, D]
    k, v = k_ref[0, 0], v_ref[0, 0]  # [block, D]
    if k.dtype != q.dtype:
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = _dot(q, k, ((1,), (1,))) * scale  # [R, block]
    positions = start + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    valid = positions < length  # [1, block]; rows past the array's edge are padding
    finite = jnp.abs(s) < jnp.inf  # False for NaN and +-inf
    bad_ref[...] = jnp.maximum(bad_ref[...], jnp.max(
        jnp.where(valid & ~finite, 1.0, 0.0), axis=1, keepdims=True))
    s = jnp.where(valid & finite, s, -jnp.inf)
    m = m_ref[...]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    shift = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    p = jnp.where(valid, jnp.exp(s - shift), 0.0)
    rescale = jnp.where(m > -jnp.inf, jnp.exp(m - shift), 0.0)
    # Rows past length (or past S) may hold anything: 0 * NaN must not leak.
    rows_valid = (start + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)) < length
    v = jnp.where(rows_valid, v, jnp.zeros_like(v))
    m_ref[...] = m_new
    l_ref[...] = l_ref[...] * rescale + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = acc_ref[...] * rescale + _weighted_values(p, v)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    l, bad = l_ref[...], bad_ref[...] > 0
    safe = jnp.where(l > 0, l, 1.0)
    o_ref[0, 0, 0] = jnp.where(bad, jnp.nan, acc_ref[...] / safe)
    lse_ref[0, 0, 0] = jnp.where(bad, jnp.nan,
                                 jnp.where(l > 0, m_ref[...] + jnp.log(safe), -jnp.inf))


def decode_splits(qg: jax.Array, keys: jax.Array, values: jax.Array, length: jax.Array, *,
                  block: int, split: int, scale: float, interpret):
  """Per-split ``(out float32 [B, Hkv, P, R, D], lse float32 [B, Hkv, P, R])`` for the
  group-padded queries ``qg [B, Hkv, R, D]``, as the GPU ``pallas_call`` returns them (the
  wrapper merges the splits). ``split`` is a multiple of ``block``."""
  batch, num_kv, rows, head_dim = qg.shape
  capacity = keys.shape[2]
  num_splits = -(-capacity // split)
  per_split = split // block

  def kv_block(b, h, p, i, len_ref):
    # Past length: the last valid block again (no new DMA); the step itself does nothing.
    last = jnp.maximum(pl.cdiv(jnp.minimum(len_ref[b], capacity), block) - 1, 0)
    return b, h, jnp.minimum(p * per_split + i, last), 0

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(batch, num_kv, num_splits, per_split),
      in_specs=[pl.BlockSpec((1, 1, rows, head_dim), lambda b, h, p, i, n: (b, h, 0, 0)),
                pl.BlockSpec((1, 1, block, head_dim), kv_block),
                pl.BlockSpec((1, 1, block, head_dim), kv_block)],
      out_specs=(pl.BlockSpec((1, 1, 1, rows, head_dim), lambda b, h, p, i, n: (b, h, p, 0, 0)),
                 pl.BlockSpec((1, 1, 1, rows, 1), lambda b, h, p, i, n: (b, h, p, 0, 0))),
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, head_dim), jnp.float32),
                      pltpu.VMEM((rows, 1), jnp.float32)])
  out, lse = backend.tpu_pallas_call(
      functools.partial(_kernel, block=block, blocks_per_split=per_split, capacity=capacity,
                        scale=scale),
      out_shape=(jax.ShapeDtypeStruct((batch, num_kv, num_splits, rows, head_dim),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_kv, num_splits, rows, 1), jnp.float32)),
      grid_spec=grid_spec, dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="decode_attention_tpu")(
          length.astype(jnp.int32), qg, keys, values)
  return out, lse[..., 0]
