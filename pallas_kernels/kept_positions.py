"""The positions a counting selection keeps, written in ascending order without a sort.

With the threshold ``t``, the ties ``need`` to keep and, per block of ``block`` tokens, the
ties before it and the kept tokens before it (all from ``score_histogram``'s counts,
``sparse_attn._src.selection.counting_plan``), each block writes its kept positions straight to
their slots: block ``j``'s ``i``-th kept token goes to slot ``kept_before[j] + i``. A token
is kept when it is eligible (``sinks <= position < length - local``) and scores above
``t``, or scores ``t`` and fewer than ``need`` eligible ties precede it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels.score_histogram import eligible_mask, tpu_block_spec, tpu_blocks

TPU_SLOT_CHUNK = 512  # output slots per matrix product in the TPU kernel


def kept_positions_reference(scores, length, threshold, need, ties_before, kept_before,
                             sinks: int, local: int, size: int, block: int):
  """The jnp twin.

  Args:
    scores: ``int [B, H, S]`` (any width: the kernel reads narrow scores as they are);
      length: ``int32 [B]``.
    threshold, need: ``int32 [B, H]``.
    ties_before, kept_before: ``int32 [B, H, ceil(S / block)]``.
    sinks, local, size, block: static; ``size`` bounds the kept count.

  Returns:
    ``int32 [B, H, size]``: the kept positions ascending; the slots past the kept count are
    unspecified (0 here, whatever the kernel's buffer held there).
  """
  capacity = scores.shape[-1]
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  eligible = eligible_mask(positions, length[:, None, None], sinks, local)
  tie = eligible & (scores == threshold[..., None])
  blocks = jnp.repeat(jnp.arange(ties_before.shape[-1]), block)[:capacity]
  in_block = lambda x: jnp.cumsum(x.reshape(x.shape[:2] + (-1, block)), -1).reshape(  # noqa: E731
      x.shape[:2] + (-1,))
  padded = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, -capacity % block)])  # noqa: E731
  tie_rank = ties_before[..., blocks] + in_block(padded(tie.astype(jnp.int32)))[..., :capacity]
  kept = eligible & ((scores > threshold[..., None]) | (tie & (tie_rank <= need[..., None])))
  rank = kept_before[..., blocks] + in_block(padded(kept.astype(jnp.int32)))[..., :capacity]
  return written_reference(jnp.where(kept, rank - 1, size),
                           jnp.broadcast_to(positions, scores.shape), size)


def written_reference(slot, values, size: int):
  """``values [B, H, S]`` written to their ``slot [B, H, S]`` of ``[B, H, size]`` (slot
  ``size``: not written); unwritten slots hold 0."""
  out = jnp.zeros(slot.shape[:2] + (size + 1,), values.dtype)
  out = jax.vmap(jax.vmap(lambda o, s, v: o.at[s].set(v)))(out, slot, values)
  return out[..., :size]


def kept_slots(kept, kept_before, size: int):
  """In a kernel: the slot of each token of a block, ``kept_before`` plus its rank among the
  block's kept tokens (a prefix sum), or ``size`` (the spare slot) for the others and for
  kept tokens past the list; one scattered store of each output to these slots writes the
  kept tokens in order."""
  rank = kept_before + jnp.cumsum(kept.astype(jnp.int32))
  return jnp.where(kept, jnp.minimum(rank - 1, size), size)


def _kernel(len_ref, t_ref, need_ref, ties_ref, kept_ref, s_ref, o_ref, *, block, size, sinks,
            local, capacity, masked):
  # len_ref: [1]; t_ref, need_ref: [1, 1]; ties_ref, kept_ref: [1, 1, 1] (this block's);
  # s_ref: [1, 1, block] int (any width); o_ref: [1, 1, size + 1] int32 (slot ``size``
  # takes the tokens not kept: one store per token, no mask)
  positions = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
  inside = positions < capacity
  s = backend.load(s_ref.at[0, 0, :], mask=inside, other=0, masked=masked).astype(jnp.int32)
  eligible = inside & eligible_mask(positions, len_ref[0], sinks, local)
  threshold = t_ref[0, 0]
  tie = eligible & (s == threshold)
  tie_rank = ties_ref[0, 0, 0] + jnp.cumsum(tie.astype(jnp.int32))  # 1-based
  kept = eligible & ((s > threshold) | (tie & (tie_rank <= need_ref[0, 0])))
  o_ref[0, 0, kept_slots(kept, kept_ref[0, 0, 0], size)] = positions


def _tpu_kernel(len_ref, t_ref, need_ref, ties_ref, kept_ref, s_ref, o_ref, *, block, size,
                sinks, local, capacity, chunk):
  """``_kernel`` without a prefix sum or a scattered store, which Mosaic (TPU) lacks.

  Prefix sums are products with an upper-triangular ones matrix (0/1 values in bfloat16,
  float32 sums: exact). The kept token in slot ``k`` is the first one whose kept count
  (``kept_before`` included) exceeds ``k``: its position is the block's start plus the
  number of tokens whose count is at most ``k``, a count taken for a chunk of slots at a
  time (also a matrix product), and only for chunks that may hold this block's slots,
  ``[kept_before, kept_before + block)``.
  """
  # len_ref: [1]; t_ref, need_ref: [1, 1]; ties_ref, kept_ref: [1, 1, 1] (SMEM scalars);
  # s_ref: [1, 1, block] int32; o_ref: [1, 1, size + 1] int32 (slot ``size`` unused here)
  start = pl.program_id(2) * block
  positions = start + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
  s = s_ref[0]
  eligible = (positions < capacity) & eligible_mask(positions, len_ref[0], sinks, local)
  upper = (jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
           <= jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)).astype(jnp.bfloat16)
  prefix = lambda x: jax.lax.dot_general(  # noqa: E731
      x.astype(jnp.bfloat16), upper, (((1,), (0,)), ((), ())),
      preferred_element_type=jnp.float32).astype(jnp.int32)
  threshold, first = t_ref[0, 0], kept_ref[0, 0, 0]
  tie = eligible & (s == threshold)
  tie_rank = ties_ref[0, 0, 0] + prefix(tie)  # 1-based
  kept = eligible & ((s > threshold) | (tie & (tie_rank <= need_ref[0, 0])))
  rank = first + prefix(kept)  # [1, block]
  ones = jnp.ones((1, block), jnp.bfloat16)
  for k0 in range(0, size, chunk):
    width = min(chunk, size - k0)

    @pl.when((first < k0 + width) & (first + block > k0))
    def _():
      slots = k0 + jax.lax.broadcasted_iota(jnp.int32, (width, 1), 0)
      before = jax.lax.dot_general(  # [1, width]: tokens whose count is at most the slot
          ones, (rank <= slots).astype(jnp.bfloat16), (((1,), (1,)), ((), ())),
          preferred_element_type=jnp.float32).astype(jnp.int32)
      row = k0 + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
      mine = (row >= first) & (before < block)  # the slots this block fills
      window = o_ref.at[0, :, k0:k0 + width]
      window[...] = jnp.where(mine, start + before, window[...])


@functools.partial(jax.jit, static_argnames=["sinks", "local", "size", "block", "interpret"])
def kept_positions_kernel(scores, length, threshold, need, ties_before, kept_before,
                          sinks: int, local: int, size: int, block: int,
                          interpret: bool | None = None):
  """The Pallas kernel: grid over (batch, head, token block); same contract as the
  reference."""
  batch, heads, capacity = scores.shape
  blocks = ties_before.shape[-1]
  length, threshold, need, ties_before, kept_before = (
      x.astype(jnp.int32) for x in (length, threshold, need, ties_before, kept_before))
  if backend.mosaic_layout(interpret):
    kernel = functools.partial(_tpu_kernel, block=block, size=size, sinks=sinks, local=local,
                               capacity=capacity, chunk=TPU_SLOT_CHUNK)
    return _tpu_call(kernel, scores, length, threshold, need, ties_before, kept_before,
                     size, block, interpret)
  kernel = functools.partial(_kernel, block=block, size=size, sinks=sinks, local=local,
                             capacity=capacity, masked=backend.masks_edges(interpret))
  out = backend.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((batch, heads, size + 1), jnp.int32),
      grid=(batch, heads, blocks),
      in_specs=[pl.BlockSpec((1,), lambda b, h, j: (b,)),
                pl.BlockSpec((1, 1), lambda b, h, j: (b, h)),
                pl.BlockSpec((1, 1), lambda b, h, j: (b, h)),
                pl.BlockSpec((1, 1, 1), lambda b, h, j: (b, h, j)),
                pl.BlockSpec((1, 1, 1), lambda b, h, j: (b, h, j)),
                pl.BlockSpec((1, 1, block), lambda b, h, j: (b, h, j))],
      out_specs=pl.BlockSpec((1, 1, size + 1), lambda b, h, j: (b, h, 0)),
      interpret=interpret, name="kept_positions")(
          length, threshold, need, ties_before, kept_before, scores)
  return out[..., :size]


def _tpu_call(kernel, scores, length, threshold, need, ties_before, kept_before, size, block,
              interpret):
  """The same kernel body with Mosaic's block layout: the per-row and per-block counts are
  SMEM scalars (their arrays end in ``[..., 1, 1]``), the scores are cut into whole blocks
  (``score_histogram.tpu_blocks``) and the output row gains a unit dimension."""
  batch, heads, _ = scores.shape
  blocks = ties_before.shape[-1]
  per_row = backend.tpu_scalars((None, None, 1, 1), lambda b, h, j: (b, h, 0, 0))
  per_block = backend.tpu_scalars((None, None, 1, 1, 1), lambda b, h, j: (b, h, j, 0, 0))
  out = backend.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((batch, heads, 1, size + 1), jnp.int32),
      grid=(batch, heads, blocks),
      in_specs=[backend.tpu_scalars((None, None, 1), lambda b, h, j: (b, 0, 0)),
                per_row, per_row, per_block, per_block, tpu_block_spec(block)],
      out_specs=pl.BlockSpec((1, 1, None, size + 1), lambda b, h, j: (b, h, 0, 0)),
      interpret=interpret, name="kept_positions")(
          length.reshape(batch, 1, 1), threshold.reshape(batch, heads, 1, 1),
          need.reshape(batch, heads, 1, 1), ties_before.reshape(batch, heads, blocks, 1, 1),
          kept_before.reshape(batch, heads, blocks, 1, 1),
          tpu_blocks(scores.astype(jnp.int32), block))
  return out[:, :, 0, :size]
