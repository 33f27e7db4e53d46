r"""Decode attention over the top-scored tokens, fused with their retrieval.

For a KV head whose tokens carry integer scores ``s_j`` (Hamming similarities, shared by
the GQA group), the kept set is the exact window (the first ``sinks`` and last ``local``
valid tokens) plus, among the other valid tokens, every token scoring above the threshold
``t`` and the first ``need`` (in position order) scoring exactly ``t``:

.. math::
   out = \sum_{j \in K} e^{q \cdot k_j / \sqrt{D}} v_j / \sum_{j \in K} e^{q \cdot k_j /
   \sqrt{D}}.

``t``, ``need`` and the ties before each histogram block come from
``pallas_kernels.score_histogram`` (``sparse_attn.selection.counting_plan``), so the kept
set is exactly ``selection.top``'s. The kernel scans the scores block by block, like dense
split-K decoding, but loads only the kept K/V rows (masked loads on the GPU: the other rows
cost no memory traffic), so no list of positions is ever built. Grid (batch, KV head,
split), splits merged outside by log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels.decode_attention import MIN_ROWS, query_scores, weighted_values
from pallas_kernels.score_histogram import eligible_mask
from pallas_kernels.sparse_decode_attention import merge_splits


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block: int = 64  # rows scanned per inner step
  programs: int = 512  # about this many programs in the grid

  def split(self, batch: int, num_kv: int, capacity: int, hist_block: int) -> int:
    """Tokens per program: a multiple of the histogram block (its tie count starts each)."""
    splits = max(1, self.programs // (batch * num_kv))
    per = -(-capacity // splits)
    return -(-per // hist_block) * hist_block


def kept_mask(scores, length, threshold, need, sinks: int, local: int):
  """``bool [B, H, S]``: the kept set, as defined above (the reference's definition)."""
  capacity = scores.shape[-1]
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  n = length[:, None, None]
  eligible = eligible_mask(positions, n, sinks, local)
  window = (positions < n) & ~eligible
  tie = eligible & (scores == threshold[..., None])
  rank = jnp.cumsum(tie, axis=-1, dtype=jnp.int32) - 1
  return window | (eligible & (scores > threshold[..., None])) | (tie & (rank < need[..., None]))


def topk_decode_attention_reference(q, keys, values, scores, length, threshold, need,
                                    sinks: int, local: int):
  """The jnp twin (a dense masked pass; the kernel's contract, not a fast path).

  Args:
    q: ``[B, Hq, D]``; keys, values: ``[B, Hkv, S, D]``; scores: ``int32 [B, Hkv, S]``;
    length: ``int32 [B]``; threshold, need: ``int32 [B, Hkv]``; sinks, local: static.

  Returns:
    ``(out float32 [B, Hq, D], lse float32 [B, Hq])``; ``(0, -inf)`` where nothing is kept.
  """
  batch, num_q, head_dim = q.shape
  num_kv = keys.shape[1]
  kept = kept_mask(scores, length, threshold, need, sinks, local)  # [B, Hkv, S]
  qg = q.astype(jnp.float32).reshape(batch, num_kv, num_q // num_kv, head_dim)
  s = jnp.einsum("bhgd,bhsd->bhgs", qg, keys.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * (1.0 / math.sqrt(head_dim))
  s = jnp.where(kept[:, :, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(kept[:, :, None], jnp.exp(s - m), 0.0)
  total = jnp.sum(e, axis=-1)
  v = jnp.where(kept[..., None], values.astype(jnp.float32), 0.0)
  num = jnp.einsum("bhgs,bhsd->bhgd", e, v, precision=jax.lax.Precision.HIGHEST)
  safe = jnp.where(total > 0, total, 1.0)
  out = num / safe[..., None]
  lse = jnp.where(total > 0, m[..., 0] + jnp.log(safe), -jnp.inf)
  return out.reshape(batch, num_q, head_dim), lse.reshape(batch, num_q)


def _kernel(len_ref, t_ref, need_ref, ties_ref, q_ref, s_ref, k_ref, v_ref, o_ref, lse_ref, *,
            block, split, hist_block, capacity, scale, sinks, local, masked):
  # len_ref: [1]; t_ref, need_ref: [1, 1]; ties_ref: [1, 1, H] int32 (ties before each
  # histogram block); q_ref: [1, 1, R, D]; s_ref: [1, 1, S] int32; k_ref, v_ref: [1, 1, S, D]
  # (pointers: only kept rows are loaded); o_ref: [1, 1, 1, R, D]; lse_ref: [1, 1, 1, R]
  begin = pl.program_id(2) * split
  length = len_ref[0]
  n_valid = jnp.clip(length - begin, 0, split)
  threshold, need = t_ref[0, 0], need_ref[0, 0]
  q = q_ref[0, 0]
  rows, head_dim = q.shape
  ties_before = ties_ref[0, 0, begin // hist_block]

  def body(i, carry):
    m, l, acc, ties = carry
    start = begin + i * block
    first = jnp.minimum(start, capacity - block)  # never past S (see decode_attention)
    positions = first + jnp.arange(block, dtype=jnp.int32)
    valid = (positions >= start) & (positions < begin + n_valid)
    s = s_ref[0, 0, pl.ds(first, block)]
    eligible = valid & eligible_mask(positions, length, sinks, local)
    tie = eligible & (s == threshold)
    rank = ties + jnp.cumsum(tie.astype(jnp.int32)) - 1
    kept = ((valid & ~eligible) | (eligible & (s > threshold))
            | (tie & (rank < need)))  # [block]
    rows_kept = jnp.broadcast_to(kept[:, None], (block, head_dim))
    k = backend.load(k_ref.at[0, 0, pl.ds(first, block), :], mask=rows_kept, other=0,
                     masked=masked)
    v = backend.load(v_ref.at[0, 0, pl.ds(first, block), :], mask=rows_kept, other=0,
                     masked=masked)
    if k.dtype != q.dtype:
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    v = jnp.where(rows_kept, v, jnp.zeros_like(v))
    sq = query_scores(q, k, scale)  # [R, block]
    sq = jnp.where(kept[None, :], sq, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(sq, axis=1))
    shift = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    p = jnp.where(kept[None, :], jnp.exp(sq - shift[:, None]), 0.0)
    rescale = jnp.where(m > -jnp.inf, jnp.exp(m - shift), 0.0)
    return (m_new, l * rescale + jnp.sum(p, axis=1),
            acc * rescale[:, None] + weighted_values(p, v),
            ties + jnp.sum(tie.astype(jnp.int32)))

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows, head_dim), jnp.float32), ties_before)
  m, l, acc, _ = jax.lax.fori_loop(0, pl.cdiv(n_valid, block), body, init)
  safe = jnp.where(l > 0, l, 1.0)
  o_ref[0, 0, 0] = acc / safe[:, None]
  lse_ref[0, 0, 0] = jnp.where(l > 0, m + jnp.log(safe), -jnp.inf)


@functools.partial(jax.jit, static_argnames=["sinks", "local", "hist_block", "block_sizes",
                                             "interpret"])
def topk_decode_attention_kernel(q, keys, values, scores, length, threshold, need, ties_before,
                                 sinks: int, local: int, hist_block: int,
                                 block_sizes: BlockSizes = BlockSizes(),
                                 interpret: bool | None = None):
  """The Pallas kernel; ``ties_before int32 [B, Hkv, ceil(S / hist_block)]`` counts the
  eligible tokens scoring ``threshold`` before each histogram block. Same result as the
  reference."""
  batch, num_q, head_dim = q.shape
  num_kv, capacity = keys.shape[1], keys.shape[2]
  group = num_q // num_kv
  block = min(block_sizes.block, 1 << (capacity.bit_length() - 1))
  if hist_block % block:
    raise ValueError(f"hist_block={hist_block} must be a multiple of the block {block}")
  split = block_sizes.split(batch, num_kv, capacity, hist_block)
  num_splits = -(-capacity // split)
  rows = max(MIN_ROWS, pl.next_power_of_2(group))
  dtype = jnp.promote_types(q.dtype, keys.dtype)
  qg = jnp.pad(q.reshape(batch, num_kv, group, head_dim).astype(dtype),
               [(0, 0), (0, 0), (0, rows - group), (0, 0)])
  hist_blocks = ties_before.shape[-1]
  out, lse = backend.pallas_call(
      functools.partial(_kernel, block=block, split=split, hist_block=hist_block,
                        capacity=capacity, scale=1.0 / math.sqrt(head_dim), sinks=sinks,
                        local=local, masked=not backend.resolve_interpret(interpret)
                        and backend.platform() == "gpu"),
      out_shape=(jax.ShapeDtypeStruct((batch, num_kv, num_splits, rows, head_dim),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_kv, num_splits, rows), jnp.float32)),
      grid=(batch, num_kv, num_splits),
      in_specs=[pl.BlockSpec((1,), lambda b, h, p: (b,)),
                pl.BlockSpec((1, 1), lambda b, h, p: (b, h)),
                pl.BlockSpec((1, 1), lambda b, h, p: (b, h)),
                pl.BlockSpec((1, 1, hist_blocks), lambda b, h, p: (b, h, 0)),
                pl.BlockSpec((1, 1, rows, head_dim), lambda b, h, p: (b, h, 0, 0)),
                pl.BlockSpec((1, 1, capacity), lambda b, h, p: (b, h, 0)),
                pl.BlockSpec((1, 1, capacity, head_dim), lambda b, h, p: (b, h, 0, 0)),
                pl.BlockSpec((1, 1, capacity, head_dim), lambda b, h, p: (b, h, 0, 0))],
      out_specs=(pl.BlockSpec((1, 1, 1, rows, head_dim), lambda b, h, p: (b, h, p, 0, 0)),
                 pl.BlockSpec((1, 1, 1, rows), lambda b, h, p: (b, h, p, 0))),
      interpret=interpret, name="topk_decode_attention")(
          length.astype(jnp.int32), threshold.astype(jnp.int32), need.astype(jnp.int32),
          ties_before.astype(jnp.int32), qg, scores.astype(jnp.int32), keys, values)
  out, lse = merge_splits(out[:, :, :, :group], lse[:, :, :, :group])
  return out.reshape(batch, num_q, head_dim), lse.reshape(batch, num_q)
