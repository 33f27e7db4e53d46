"""The TPU (Mosaic) variant of decode attention over an index list (``sparse_decode_attention``).

Same contract and reference as ``sparse_decode_attention.sparse_decode_attention_kernel``;
the wrapper there picks this variant where ``backend.mosaic_layout(interpret)`` (on a TPU,
or where ``interpret`` is a ``pltpu.InterpretParams``, Pallas' TPU interpret mode). Why a
separate body: the GPU body takes a head's whole ``[S, D]`` cache as one block and gathers rows from
it, which on a TPU would copy every row of the head (128K at long contexts) into VMEM for
the few hundred listed, and its ``(1, 1, split)`` blocks of the list break Mosaic's tiling
rule. Here:

* K and V stay in HBM (``memory_space=pl.ANY``). Each listed row is fetched by its own DMA
  (``pltpu.make_async_copy``) into a VMEM buffer of ``block`` rows; the buffers are doubled,
  so the DMAs of block ``i + 1`` run while block ``i`` is computed. Only rows below
  ``count`` are fetched (an index past the cache is clamped to its last row, never read
  past it).
* The counts and the index lists are scalar-prefetched into SMEM, where the DMA loop reads
  them as scalars. The per-entry log-weights, a vector operand, come as VMEM blocks laid out
  ``[blocks of the split, block]``, so a step reads its ``[1, block]`` row at a sublane
  offset (any multiple of 16 rows is a legal block; 128 fills the MXU's lanes).
* Scores and the weighted values are float32 matrix products (HIGHEST) of the group's
  queries, padded to 8 rows, with the block's rows; shapes stay 2-D (``[G, 1]`` columns).
* By default one split per list: double buffering overlaps DMAs only within a program, so a
  program per 128-row block (the GPU default's grid) would expose every DMA's latency.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend

ROW_TILE = 16  # a bf16 VMEM tile's rows (float32: 8); a block is a multiple of it
DEFAULT_BLOCK = 128
QUERY_ROWS = 8  # the group's queries are padded with zero rows up to a multiple of this


def resolve(block: int | None, split: int | None, n: int) -> tuple[int, int]:
  """``(block, split)`` for the TPU: ``block`` rounded up to whole tiles (default 128),
  ``split`` to whole blocks (default: the whole list, one program per list)."""
  block = -(-(block or DEFAULT_BLOCK) // ROW_TILE) * ROW_TILE
  whole = -(-n // block) * block
  split = whole if split is None else -(-split // block) * block
  return block, min(split, whole)


def _dot(a, b, contract):
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST)


def _kernel(count_ref, idx_ref, lw_ref, q_ref, k_hbm, v_hbm, o_ref, lse_ref, k_buf, v_buf,
            sems, *, block, split, num_lists, num_splits, ratio, capacity, scale):
  # count_ref: SMEM int32 [B * L]; idx_ref: SMEM int32 [B * L * P * split]
  # lw_ref: [1, 1, 1, split // block, block] float32; q_ref: [1, 1, G, D]
  # k_hbm, v_hbm: [B, Hkv, S, D] in HBM; k_buf, v_buf: VMEM [2, block, D]; sems: DMA [2, 2]
  # o_ref: [1, 1, 1, G, D] float32; lse_ref: [1, 1, 1, G, 1] float32
  b, h, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lst = b * num_lists + h
  n_valid = jnp.clip(count_ref[lst] - p * split, 0, split)
  first = (lst * num_splits + p) * split  # the split's first entry in idx_ref
  num_blocks = pl.cdiv(n_valid, block)

  def row_copies(i, slot, action):
    """Starts (or waits for) the DMAs of block ``i``'s valid rows into buffer ``slot``."""
    def row(r, carry):
      idx = jnp.clip(idx_ref[first + i * block + r], 0, capacity - 1)
      for j, (src, dst) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
        copy = pltpu.make_async_copy(src.at[b, h // ratio, pl.ds(idx, 1)],
                                     dst.at[slot, pl.ds(r, 1)], sems.at[j, slot])
        if action == "start":
          copy.start()
        else:
          copy.wait()
      return carry
    jax.lax.fori_loop(0, jnp.minimum(block, n_valid - i * block), row, 0)

  @pl.when(num_blocks > 0)
  def _prefetch_first():
    row_copies(0, 0, "start")

  q = q_ref[0, 0].astype(jnp.float32) * scale  # [G, D]
  group, head_dim = q.shape

  def body(i, carry):
    m, l, acc = carry
    slot = i % 2

    @pl.when(i + 1 < num_blocks)
    def _prefetch_next():
      row_copies(i + 1, 1 - slot, "start")

    row_copies(i, slot, "wait")
    positions = i * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    valid = positions < n_valid  # [1, block]
    # Rows past count were not fetched: the buffer holds stale rows or garbage there.
    rows_valid = (i * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)) < n_valid
    k = jnp.where(rows_valid, k_buf[slot].astype(jnp.float32), 0.0)  # [block, D]
    v = jnp.where(rows_valid, v_buf[slot].astype(jnp.float32), 0.0)
    s = _dot(q, k, ((1,), (1,))) - lw_ref[0, 0, 0, pl.ds(i, 1), :]  # [G, block]
    s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    e = jnp.where(valid, jnp.exp(s - shift), 0.0)
    rescale = jnp.where(jnp.isfinite(m), jnp.exp(m - shift), 0.0)
    return (m_new, l * rescale + jnp.sum(e, axis=1, keepdims=True),
            acc * rescale + _dot(e, v, ((1,), (0,))))

  init = (jnp.full((group, 1), -jnp.inf, jnp.float32), jnp.zeros((group, 1), jnp.float32),
          jnp.zeros((group, head_dim), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  safe = jnp.where(l > 0, l, 1.0)
  o_ref[0, 0, 0] = acc / safe
  lse_ref[0, 0, 0] = jnp.where(l > 0, m + jnp.log(safe), -jnp.inf)


def sparse_splits(q, keys, values, indices, log_weights, count, *, block: int, split: int,
                  ratio: int, scale: float, interpret):
  """Per-split ``(out float32 [B, L, P, g, D], lse float32 [B, L, P, g])`` for the queries
  ``q [B, L, g, D]`` of ``L`` lists (``ratio`` per KV head), ``indices`` and
  ``log_weights`` padded to ``[B, L, P * split]``, as the GPU ``pallas_call`` returns them
  (the wrapper merges the splits)."""
  batch, num_lists, group, head_dim = q.shape
  capacity = keys.shape[2]
  num_splits = indices.shape[2] // split
  rows = -(-group // QUERY_ROWS) * QUERY_ROWS
  q = jnp.pad(q, [(0, 0), (0, 0), (0, rows - group), (0, 0)])
  log_weights = log_weights.reshape(batch, num_lists, num_splits, split // block, block)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, num_lists, num_splits),
      in_specs=[pl.BlockSpec((1, 1, 1, split // block, block),
                             lambda b, h, p, *_: (b, h, p, 0, 0)),
                pl.BlockSpec((1, 1, rows, head_dim), lambda b, h, p, *_: (b, h, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=(pl.BlockSpec((1, 1, 1, rows, head_dim), lambda b, h, p, *_: (b, h, p, 0, 0)),
                 pl.BlockSpec((1, 1, 1, rows, 1), lambda b, h, p, *_: (b, h, p, 0, 0))),
      scratch_shapes=[pltpu.VMEM((2, block, head_dim), keys.dtype),
                      pltpu.VMEM((2, block, head_dim), values.dtype),
                      pltpu.SemaphoreType.DMA((2, 2))])
  out, lse = backend.tpu_pallas_call(
      functools.partial(_kernel, block=block, split=split, num_lists=num_lists,
                        num_splits=num_splits, ratio=ratio, capacity=capacity, scale=scale),
      out_shape=(jax.ShapeDtypeStruct((batch, num_lists, num_splits, rows, head_dim),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_lists, num_splits, rows, 1), jnp.float32)),
      grid_spec=grid_spec, dimension_semantics=("parallel", "parallel", "parallel"),
      interpret=interpret, name="sparse_decode_attention_tpu")(
          count.astype(jnp.int32).reshape(-1), indices.reshape(-1), log_weights, q, keys,
          values)
  return out[:, :, :, :group], lse[:, :, :, :group, 0]
