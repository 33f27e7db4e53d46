r"""Decode attention over an index list: only the listed K/V rows are read.

For each list ``i`` (one per KV head, shared by its GQA group, or one per query head), with
``n = count[b, i]`` valid entries ``indices[b, i, :n]`` and per-entry log-weights
``lw`` (importance weights ``1/w`` enter as ``-log w``):

.. math::
   s_j = q \cdot k_{idx_j} / \sqrt{D} - lw_j, \quad
   out = \sum_j e^{s_j} v_{idx_j} / \sum_j e^{s_j}, \quad lse = \log \sum_j e^{s_j}.

The list is split into ``split`` entries per program; each split walks its valid entries in
blocks of ``block`` rows with an online softmax and returns ``(out, lse)``; the splits are
merged outside the kernel by log-sum-exp. Blocks past ``count`` are never read, so a static
list that is mostly padding costs only its valid part. An empty list gives ``out = 0`` and
``lse = -inf`` (never NaN).

Log-weights that depend on the scores themselves (MagicPIG's ``1/w`` from the exact cosine)
are a ``ScoreWeights``: the pass computes them from each gathered key's score, so every
listed key is read once, for its weight and its attention together.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend, sparse_decode_attention_tpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """``None`` picks by shape (``resolve``)."""
  block: int | None = None  # rows gathered per inner step
  split: int | None = None  # list entries per program (a multiple of block)

  def resolve(self, batch: int, lists: int, group: int, n: int) -> tuple[int, int]:
    """``(block, split)``. The default block keeps ``group * block`` at 128, the size of
    the elementwise ``[G, block, D]`` products a program holds at once; the default split
    gives the grid about ``PROGRAMS`` programs, so that a GPU's SMs all get work (on an H100,
    8 lists of 2622 entries split at 1024, 24 programs, took 2.1 ms; 32 lists, 96
    programs, 0.16 ms)."""
    block = self.block or max(16, 128 // group)
    split = self.split
    if split is None:
      per_list = -(-PROGRAMS // (batch * lists))
      split = -(-max(1, -(-n // per_list)) // block) * block
    return block, min(split, -(-n // block) * block)


PROGRAMS = 256


class ScoreWeights(NamedTuple):
  """Per-entry log-weights computed from each listed row's score inside the pass:
  ``lw = fn(s, row, *params)``.

  Attributes:
    fn: a hashable function of float32 arrays that broadcast together (it is a static
      argument of the kernel, which traces it once per block): ``s [..., g, n]`` the scores
      ``q . k / sqrt(D)`` of ``n`` listed rows for the list's ``g`` queries, ``row [..., 1,
      n]`` the entries of ``rows`` at those rows, and ``P`` parameters ``[..., g, 1]``;
      returns ``[..., g, n]``. Elementwise ``jnp``/``lax`` ops only (it runs in a kernel).
    rows: ``float32 [B, Hkv, S]``, one value per cache row (e.g. a key norm).
    params: ``float32 [B, lists, g, P]``, ``P`` values per query.
  """

  fn: Callable
  rows: jax.Array
  params: jax.Array


def _apply(weights: ScoreWeights, scores, row, params):
  """``weights.fn`` on scores ``[..., g, n]``, rows ``[..., n]``, params ``[..., g, P]``."""
  return weights.fn(scores, row[..., None, :],
                    *(params[..., p:p + 1] for p in range(params.shape[-1])))


def _layout(q, keys, indices):
  """``(lists per KV head r, queries per list g)``, validating the shapes."""
  batch, num_q, head_dim = q.shape
  num_kv = keys.shape[1]
  num_lists = indices.shape[1]
  if indices.ndim != 3 or indices.shape[0] != batch or num_lists not in (num_kv, num_q):
    raise ValueError(f"indices must have shape [B={batch}, Hkv={num_kv} or Hq={num_q}, N], "
                     f"got {tuple(indices.shape)}")
  return num_lists // num_kv, num_q // num_lists


def merge_splits(out, lse):
  """Log-sum-exp merge over axis 2 of ``out [B, H, P, G, D]``, ``lse [B, H, P, G]``."""
  m = jnp.max(lse, axis=2, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse - m)  # 0 for empty splits
  total = jnp.sum(w, axis=2)
  safe = jnp.where(total > 0, total, 1.0)
  merged = jnp.sum(w[..., None] * out, axis=2) / safe[..., None]
  lse = jnp.where(total > 0, m[:, :, 0] + jnp.log(safe), -jnp.inf)
  return merged, jnp.where(jnp.isnan(total), jnp.nan, lse)  # a NaN split: a NaN result


def _online_step(carry, s, valid, weighted_sum):
  """One block of the online softmax over scores ``s [..., G, n]``; ``weighted_sum(p)`` is
  ``sum_n p[..., g, n] v[n]``, shaped ``[..., G, D]``."""
  m, l, acc = carry
  s = jnp.where(valid, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  p = jnp.where(valid, jnp.exp(s - shift[..., None]), 0.0)
  rescale = jnp.where(jnp.isfinite(m), jnp.exp(m - shift), 0.0)
  return (m_new, l * rescale + jnp.sum(p, axis=-1),
          acc * rescale[..., None] + weighted_sum(p))


def _finish(m, l, acc):
  safe = jnp.where(l > 0, l, 1.0)
  return acc / safe[..., None], jnp.where(l > 0, m + jnp.log(safe), -jnp.inf)


def gather_float32(x: jax.Array, flat: jax.Array) -> jax.Array:
  """``take_along_axis(x, flat, axis=2)`` in float32, for 16-bit ``x`` too.

  XLA:CPU gathers bf16 by converting the operand to float32, and inside a loop that convert
  of the whole cache is hoisted and paid on every call. Gathering the raw bits (uint16)
  halves that: XLA still hoists the bit cast and materialises it, a copy of the cache. A
  bf16 Spotlight attend at 128K: 760 ms with the convert, 240-440 ms with the bit copy,
  against 24 ms in float32. bf16 caches are not a fast path on XLA:CPU yet.
  """
  if x.dtype == jnp.float32:
    return jnp.take_along_axis(x, flat, axis=2, mode="promise_in_bounds")
  bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
  got = jnp.take_along_axis(bits, flat, axis=2, mode="promise_in_bounds")
  return jax.lax.bitcast_convert_type(got, x.dtype).astype(jnp.float32)


def _walk(q, keys, indices, count, block, step, init_fn):
  """Runs ``step(carry, i, ids [B, Hkv, r, block], scores [B, Hkv, r, g, block], valid)`` over
  the blocks of the lists that hold valid entries (``ceil(max(count) / block)`` of them)."""
  ratio, group = _layout(q, keys, indices)
  batch, num_q, head_dim = q.shape
  num_kv = keys.shape[1]
  padded = -(-indices.shape[2] // block) * block
  indices = jnp.pad(indices.astype(jnp.int32), [(0, 0), (0, 0), (0, padded - indices.shape[2])])
  indices = indices.reshape(batch, num_kv, ratio, padded)
  count = count.astype(jnp.int32).reshape(batch, num_kv, ratio)
  qs = q.astype(jnp.float32).reshape(batch, num_kv, ratio, group, head_dim) / math.sqrt(head_dim)

  def rows(x, ids):  # [B, Hkv, r, block] -> float32 [B, Hkv, r, block, D]
    flat = ids.reshape(batch, num_kv, ratio * block, 1)
    return gather_float32(x, flat).reshape(batch, num_kv, ratio, block, head_dim)

  def body(i, carry):
    ids = jax.lax.dynamic_slice_in_dim(indices, i * block, block, axis=3)
    scores = jnp.einsum("bhrgd,bhrnd->bhrgn", qs, rows(keys, ids),
                        precision=jax.lax.Precision.HIGHEST)
    position = i * block + jnp.arange(block, dtype=jnp.int32).reshape(1, 1, 1, 1, block)
    return step(carry, i, ids, scores, position < count[..., None, None], rows)

  steps = (jnp.max(count, initial=0) + block - 1) // block
  return jax.lax.fori_loop(0, steps, body, init_fn(batch, num_kv, ratio, group, padded))


def _block_weights(weights: ScoreWeights, ids, scores):
  """``weights`` on one block, in the walk's layout: ``ids [B, Hkv, r, n]``, ``scores
  [B, Hkv, r, g, n]`` -> ``[B, Hkv, r, g, n]``."""
  batch, num_kv, ratio, group, _ = scores.shape
  row = jnp.take_along_axis(weights.rows.astype(jnp.float32), ids.reshape(batch, num_kv, -1),
                            axis=-1, mode="promise_in_bounds").reshape(ids.shape)
  params = weights.params.astype(jnp.float32).reshape(batch, num_kv, ratio, group, -1)
  return _apply(weights, scores, row, params)


def sparse_decode_attention_reference(q, keys, values, indices, log_weights, count,
                                      block: int = 128):
  """The jnp twin (and CPU path).

  Args:
    q: ``[B, Hq, D]``.
    keys, values: ``[B, Hkv, S, D]``.
    indices: ``int32 [B, Hkv, N]`` (one list per KV head, shared by its group) or
      ``int32 [B, Hq, N]`` (one list per query head); entries in ``[0, S)``.
    log_weights: ``float32`` like ``indices``, subtracted from the scores; or None for 0;
      or a ``ScoreWeights``, for weights that depend on the scores (MagicPIG's): each
      block's keys are then read once, for the weights and the attention together.
    count: ``int32 [B, Hkv or Hq]``: entries ``[0, count)`` of each list are valid.
    block: rows gathered per loop step. Only ``ceil(max(count) / block)`` steps run, and no
      ``[N, D]`` array of gathered rows is ever materialised.

  Returns:
    ``(out float32 [B, Hq, D], lse float32 [B, Hq])``.
  """
  _layout(q, keys, indices)  # validates the shapes first
  batch, num_q, head_dim = q.shape
  n = indices.shape[2]
  if log_weights is not None and not isinstance(log_weights, ScoreWeights):
    padded = jnp.pad(log_weights.astype(jnp.float32), [(0, 0), (0, 0), (0, -n % block)])
    table = padded.reshape(indices.shape[0], keys.shape[1], -1, padded.shape[-1])

  def step(carry, i, ids, scores, valid, rows):
    if isinstance(log_weights, ScoreWeights):
      scores = scores - _block_weights(log_weights, ids, scores)
    elif log_weights is not None:
      scores = scores - jax.lax.dynamic_slice_in_dim(table, i * block, block, axis=3)[
          :, :, :, None]
    v = rows(values, ids)
    return _online_step(carry, scores, valid, lambda p: jnp.einsum(
        "bhrgn,bhrnd->bhrgd", p, v, precision=jax.lax.Precision.HIGHEST))

  def init(batch, num_kv, ratio, group, padded):
    shape = (batch, num_kv, ratio, group)
    return jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (head_dim,))

  out, lse = _finish(*_walk(q, keys, indices, count, block, step, init))
  return out.reshape(batch, num_q, head_dim), lse.reshape(batch, num_q)


def listed_log_weights(weights: ScoreWeights, q, keys, indices, count, block: int = 128):
  """``ScoreWeights`` evaluated on every valid listed row: ``float32 [B, lists, N]`` (0 past
  ``count``), for the TPU kernel, which takes arrays (one weight per entry: a list per
  query head, or weights the same for a list's queries). Reads the listed keys once."""
  n = indices.shape[2]

  def step(table, i, ids, scores, valid, rows):
    del rows
    lw = _block_weights(weights, ids, scores)[:, :, :, :1]  # the list's first query
    lw = jnp.where(valid[:, :, :, 0], lw[:, :, :, 0], 0.0)
    return jax.lax.dynamic_update_slice_in_dim(table, lw, i * block, axis=3)

  def init(batch, num_kv, ratio, group, padded):
    return jnp.zeros((batch, num_kv, ratio, padded), jnp.float32)

  table = _walk(q, keys, indices, count, block, step, init)
  return table.reshape(indices.shape[0], indices.shape[1], -1)[..., :n]


def _kernel(count_ref, idx_ref, lw_ref, q_ref, k_ref, v_ref, *refs, block, split, scale,
            weight_fn):
  # count_ref: [1, 1] int32; idx_ref, lw_ref: [1, 1, split]; q_ref: [1, 1, G, D]
  # k_ref, v_ref: [1, 1, S, D] (rows are gathered, never copied whole)
  # with ``weight_fn``: rows_ref [1, 1, S] float32 (gathered), params_ref [1, 1, G, P]
  # o_ref: [1, 1, 1, G, D] float32; lse_ref: [1, 1, 1, G] float32
  if weight_fn is None:
    o_ref, lse_ref = refs
  else:
    rows_ref, params_ref, o_ref, lse_ref = refs
    params = [params_ref[0, 0, :, p][:, None] for p in range(params_ref.shape[-1])]
  begin = pl.program_id(2) * split
  n_valid = jnp.clip(count_ref[0, 0] - begin, 0, split)
  q = q_ref[0, 0].astype(jnp.float32) * scale  # [G, D]
  group, head_dim = q.shape

  def body(i, carry):
    ids = idx_ref[0, 0, pl.ds(i * block, block)]  # [block] int32
    k = k_ref[0, 0, ids, :].astype(jnp.float32)  # [block, D]
    v = v_ref[0, 0, ids, :].astype(jnp.float32)
    s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)  # [G, block]
    if weight_fn is None:
      s = s - lw_ref[0, 0, pl.ds(i * block, block)][None, :]
    else:
      s = s - weight_fn(s, rows_ref[0, 0, ids][None, :], *params)
    valid = (i * block + jnp.arange(block, dtype=jnp.int32))[None, :] < n_valid
    # Elementwise products, not dots: G may be below the 16 rows a GPU dot needs.
    return _online_step(carry, s, valid, lambda p: jnp.sum(p[:, :, None] * v[None], axis=1))

  init = (jnp.full((group,), -jnp.inf, jnp.float32), jnp.zeros((group,), jnp.float32),
          jnp.zeros((group, head_dim), jnp.float32))
  out, lse = _finish(*jax.lax.fori_loop(0, pl.cdiv(n_valid, block), body, init))
  o_ref[0, 0, 0] = out
  lse_ref[0, 0, 0] = lse


def sparse_decode_attention_kernel(q, keys, values, indices, log_weights, count,
                                   block_sizes: BlockSizes = BlockSizes(),
                                   interpret: bool | None = None):
  """The Pallas kernel: grid over (batch, list, split); same contract as the reference. On a
  TPU, or with ``interpret`` a ``pltpu.InterpretParams``, the Mosaic variant
  (``sparse_decode_attention_tpu``: rows fetched by DMA) runs instead of the gathering body,
  with its own block sizes (``sparse_decode_attention_tpu.resolve``); ``ScoreWeights`` are
  then evaluated up front (``listed_log_weights``), in the GPU body inside the pass."""
  fused = isinstance(log_weights, ScoreWeights)
  if fused and backend.mosaic_layout(interpret):
    log_weights, fused = listed_log_weights(log_weights, q, keys, indices, count), False
  weight_fn, extra = (log_weights.fn, (log_weights.rows, log_weights.params)) if fused else (
      None, ())
  return _kernel_call(q, keys, values, indices, None if fused else log_weights, count, *extra,
                      block_sizes=block_sizes, interpret=interpret, weight_fn=weight_fn)


@functools.partial(jax.jit, static_argnames=["block_sizes", "interpret", "weight_fn"])
def _kernel_call(q, keys, values, indices, log_weights, count, *weight_arrays, block_sizes,
                 interpret, weight_fn):
  ratio, group = _layout(q, keys, indices)
  batch, num_q, head_dim = q.shape
  num_lists, n = indices.shape[1], indices.shape[2]
  tpu = backend.mosaic_layout(interpret)
  if tpu:
    block, split = sparse_decode_attention_tpu.resolve(block_sizes.block, block_sizes.split, n)
  else:
    block, split = block_sizes.resolve(batch, num_lists, group, n)
  if split % block:
    raise ValueError(f"block_sizes.split={block_sizes.split} must be a multiple of "
                     f"block_sizes.block={block}")
  num_splits = -(-n // split)
  pad = [(0, 0), (0, 0), (0, num_splits * split - n)]
  indices = jnp.pad(indices.astype(jnp.int32), pad)
  log_weights = (jnp.zeros(indices.shape, jnp.float32) if log_weights is None
                 else jnp.pad(log_weights.astype(jnp.float32), pad))
  capacity = keys.shape[2]
  if tpu:
    out, lse = sparse_decode_attention_tpu.sparse_splits(
        q.reshape(batch, num_lists, group, head_dim), keys, values, indices, log_weights,
        count, block=block, split=split, ratio=ratio, scale=1.0 / math.sqrt(head_dim),
        interpret=interpret)
    out, lse = merge_splits(out, lse)
    return out.reshape(batch, num_q, head_dim), lse.reshape(batch, num_q)
  weight_specs = []
  if weight_fn is not None:
    rows, params = weight_arrays
    weight_arrays = (rows.astype(jnp.float32),
                     params.astype(jnp.float32).reshape(batch, num_lists, group, -1))
    weight_specs = [pl.BlockSpec((1, 1, capacity), lambda b, h, p: (b, h // ratio, 0)),
                    pl.BlockSpec((1, 1, group, weight_arrays[1].shape[-1]),
                                 lambda b, h, p: (b, h, 0, 0))]
  out, lse = backend.pallas_call(
      functools.partial(_kernel, block=block, split=split, scale=1.0 / math.sqrt(head_dim),
                        weight_fn=weight_fn),
      out_shape=(jax.ShapeDtypeStruct((batch, num_lists, num_splits, group, head_dim),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_lists, num_splits, group), jnp.float32)),
      grid=(batch, num_lists, num_splits),
      in_specs=[pl.BlockSpec((1, 1), lambda b, h, p: (b, h)),
                pl.BlockSpec((1, 1, split), lambda b, h, p: (b, h, p)),
                pl.BlockSpec((1, 1, split), lambda b, h, p: (b, h, p)),
                pl.BlockSpec((1, 1, group, head_dim), lambda b, h, p: (b, h, 0, 0)),
                pl.BlockSpec((1, 1, capacity, head_dim), lambda b, h, p: (b, h // ratio, 0, 0)),
                pl.BlockSpec((1, 1, capacity, head_dim), lambda b, h, p: (b, h // ratio, 0, 0)),
                *weight_specs],
      out_specs=(pl.BlockSpec((1, 1, 1, group, head_dim), lambda b, h, p: (b, h, p, 0, 0)),
                 pl.BlockSpec((1, 1, 1, group), lambda b, h, p: (b, h, p, 0))),
      interpret=interpret, name="sparse_decode_attention")(
          count.astype(jnp.int32), indices, log_weights,
          q.reshape(batch, num_lists, group, head_dim), keys, values, *weight_arrays)
  out, lse = merge_splits(out, lse)
  return out.reshape(batch, num_q, head_dim), lse.reshape(batch, num_q)


def sparse_decode_attention(q, keys, values, indices, log_weights, count):
  """With the kernel where ``backend.use_kernels()``, else the reference."""
  if backend.use_kernels():
    return sparse_decode_attention_kernel(q, keys, values, indices, log_weights, count)
  return sparse_decode_attention_reference(q, keys, values, indices, log_weights, count)
