r"""Dense split-K flash decoding over the cache as stored, ``[B, Hkv, S, D]``.

For each batch row ``b`` and query head ``h`` (KV head ``h // G``), over the valid tokens
``j < length[b]``:

.. math::
   s_j = q \cdot k_j / \sqrt{D}, \quad out = \sum_j e^{s_j} v_j / \sum_j e^{s_j},
   \quad lse = \log \sum_j e^{s_j}.

The grid is (batch, KV head, split): each program walks its slice of ``split`` tokens in
blocks of ``block`` rows with an online softmax, for the whole GQA group at once (the
group's queries are the rows of one matrix product, so each K/V row is read once per
group, and the cache is never copied or transposed). Blocks past ``length`` are not read.
The splits' ``(out, lse)`` pairs are merged outside the kernel by log-sum-exp. A row with
``length == 0`` gives ``out = 0`` and ``lse = -inf``.

Precision: scores accumulate in float32 (a bf16 x bf16 product is exact in float32). The
probabilities multiply bf16 values as two bf16 parts (``p = hi + lo``), so the output keeps
about 16 bits of ``p``, not bf16's 8; float32 caches use float32 products throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend, decode_attention_tpu
from pallas_kernels.sparse_decode_attention import merge_splits

# Rows of the query matrix a program multiplies: a GPU matrix product needs at least 16, and
# Triton wants powers of two; the group's queries are padded with zero rows up to it.
MIN_ROWS = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """``None`` picks by shape (``resolve``)."""
  block: int = 128  # K/V rows per inner step
  split: int | None = None  # tokens per program, a multiple of block
  programs: int = 512  # the default split's grid size: ~4 per SM of an H100/H200 (132 SMs)

  def resolve(self, batch: int, num_kv: int, capacity: int) -> tuple[int, int]:
    """``(block, split)``: the default split gives the grid about ``programs`` programs."""
    block = min(self.block, 1 << (capacity.bit_length() - 1))  # at most capacity
    split = self.split
    if split is None:
      splits = max(1, self.programs // (batch * num_kv))
      split = -(-capacity // splits)
    split = -(-split // block) * block
    return block, min(split, -(-capacity // block) * block)


def decode_attention_reference(q: jax.Array, keys: jax.Array, values: jax.Array,
                               length: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The jnp twin (and CPU path).

  Args:
    q: ``[B, Hq, D]``.
    keys, values: ``[B, Hkv, S, D]``, ``Hq % Hkv == 0`` (a GQA group's heads are adjacent).
    length: ``int32 [B]``: tokens ``[0, length)`` are valid.

  Returns:
    ``(out float32 [B, Hq, D], lse float32 [B, Hq])``; ``out = 0``, ``lse = -inf`` for an
    empty row; ``out`` and ``lse`` NaN for a head with a non-finite score among its valid
    tokens (a NaN or inf key). Rows past ``length`` are masked out of the scores; the
    reference assumes them finite (``0 * NaN`` would reach ``out``), the kernel does not.
  """
  batch, num_q, head_dim = q.shape
  num_kv, capacity = keys.shape[1], keys.shape[2]
  qg = q.astype(jnp.float32).reshape(batch, num_kv, num_q // num_kv, head_dim)
  scores = jnp.einsum("bhgd,bhsd->bhgs", qg, keys.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * (1.0 / math.sqrt(head_dim))
  valid = (jnp.arange(capacity)[None, :] < length[:, None])[:, None, None, :]
  scores = jnp.where(valid, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(valid, jnp.exp(scores - m), 0.0)
  total = jnp.sum(e, axis=-1)
  num = jnp.einsum("bhgs,bhsd->bhgd", e, values.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  safe = jnp.where(total > 0, total, 1.0)
  bad = jnp.any(valid & ~jnp.isfinite(scores), axis=-1)
  out = jnp.where(bad[..., None], jnp.nan, num / safe[..., None])
  lse = jnp.where(bad, jnp.nan, jnp.where(total > 0, m[..., 0] + jnp.log(safe), -jnp.inf))
  return out.reshape(batch, num_q, head_dim), lse.reshape(batch, num_q)


def _dot(a, b, contract):
  """``a . b`` over the given dims, accumulated in float32; float32 operands multiply in
  float32 (HIGHEST: Triton's default for them is TF32)."""
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST)


def query_scores(q, k, scale: float):
  """``q [R, D] . k [n, D]^T * scale``: float32 ``[R, n]``."""
  return _dot(q, k, ((1,), (1,))) * scale


def weighted_values(p, v):
  """``p [R, n] float32 @ v [n, D]`` in float32, for 16-bit ``v`` as two bf16 products."""
  if v.dtype == jnp.float32:
    return _dot(p, v, ((1,), (0,)))
  hi = p.astype(v.dtype)
  lo = (p - hi.astype(jnp.float32)).astype(v.dtype)
  return _dot(hi, v, ((1,), (0,))) + _dot(lo, v, ((1,), (0,)))


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block, split, capacity, scale):
  # len_ref: [1] int32; q_ref: [1, 1, R, D] (R >= 16 rows, the group's queries then zeros)
  # k_ref, v_ref: [1, 1, S, D] (a pointer: rows are read a block at a time, never whole)
  # o_ref: [1, 1, 1, R, D] float32; lse_ref: [1, 1, 1, R] float32
  begin = pl.program_id(2) * split
  n_valid = jnp.clip(len_ref[0] - begin, 0, split)
  q = q_ref[0, 0]  # [R, D]
  rows, head_dim = q.shape

  def body(i, carry):
    m, l, acc, bad = carry
    start = begin + i * block
    # A last block that would reach past S starts earlier instead (no load past the array
    # on any backend); the rows it reads twice are masked out.
    first = jnp.minimum(start, capacity - block)
    positions = first + jnp.arange(block, dtype=jnp.int32)
    k = k_ref[0, 0, pl.ds(first, block), :]  # [block, D]
    v = v_ref[0, 0, pl.ds(first, block), :]
    if k.dtype != q.dtype:
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = query_scores(q, k, scale)  # [R, block]
    valid = ((positions >= start) & (positions < begin + n_valid))[None, :]
    # A NaN or inf key makes its head NaN (an int max: Triton lowers no boolean reduction).
    bad = jnp.maximum(bad, jnp.max(jnp.where(valid & ~jnp.isfinite(s), 1, 0), axis=1))
    s = jnp.where(valid & jnp.isfinite(s), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    shift = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    p = jnp.where(valid, jnp.exp(s - shift[:, None]), 0.0)
    rescale = jnp.where(m > -jnp.inf, jnp.exp(m - shift), 0.0)
    # Rows past length may hold anything (NaN in a fresh buffer): 0 * NaN must not leak.
    v = jnp.where(jnp.broadcast_to(valid[0][:, None], v.shape), v, jnp.zeros_like(v))
    return (m_new, l * rescale + jnp.sum(p, axis=1),
            acc * rescale[:, None] + weighted_values(p, v), bad)

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows, head_dim), jnp.float32), jnp.zeros((rows,), jnp.int32))
  m, l, acc, bad = jax.lax.fori_loop(0, pl.cdiv(n_valid, block), body, init)
  safe = jnp.where(l > 0, l, 1.0)
  o_ref[0, 0, 0] = jnp.where(bad[:, None] > 0, jnp.nan, acc / safe[:, None])
  lse_ref[0, 0, 0] = jnp.where(bad > 0, jnp.nan, jnp.where(l > 0, m + jnp.log(safe), -jnp.inf))


@functools.partial(jax.jit, static_argnames=["block_sizes", "interpret"])
def decode_attention_kernel(q: jax.Array, keys: jax.Array, values: jax.Array,
                            length: jax.Array, block_sizes: BlockSizes = BlockSizes(),
                            interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """The Pallas kernel: grid over (batch, KV head, split); same contract as the reference.

  ``D`` must be a power of two (a Triton block's dims are); ``supported`` says so. On a TPU,
  or with ``interpret`` a ``pltpu.InterpretParams``, the Mosaic variant
  (``decode_attention_tpu``) runs instead of the Triton-shaped body.
  """
  batch, num_q, head_dim = q.shape
  num_kv, capacity = keys.shape[1], keys.shape[2]
  group = num_q // num_kv
  block, split = block_sizes.resolve(batch, num_kv, capacity)
  num_splits = -(-capacity // split)
  rows = max(MIN_ROWS, pl.next_power_of_2(group))
  # The scale is applied to the float32 scores, so bf16 queries stay exact in the product.
  dtype = jnp.promote_types(q.dtype, keys.dtype)
  qg = jnp.pad(q.reshape(batch, num_kv, group, head_dim).astype(dtype),
               [(0, 0), (0, 0), (0, rows - group), (0, 0)])
  if backend.mosaic_layout(interpret):
    out, lse = decode_attention_tpu.decode_splits(
        qg, keys, values, length, block=block, split=split, scale=1.0 / math.sqrt(head_dim),
        interpret=interpret)
    out, lse = merge_splits(out[:, :, :, :group], lse[:, :, :, :group])
    return out.reshape(batch, num_q, head_dim), lse.reshape(batch, num_q)
  out, lse = backend.pallas_call(
      functools.partial(_kernel, block=block, split=split, capacity=capacity,
                        scale=1.0 / math.sqrt(head_dim)),
      out_shape=(jax.ShapeDtypeStruct((batch, num_kv, num_splits, rows, head_dim),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_kv, num_splits, rows), jnp.float32)),
      grid=(batch, num_kv, num_splits),
      in_specs=[pl.BlockSpec((1,), lambda b, h, p: (b,)),
                pl.BlockSpec((1, 1, rows, head_dim), lambda b, h, p: (b, h, 0, 0)),
                pl.BlockSpec((1, 1, capacity, head_dim), lambda b, h, p: (b, h, 0, 0)),
                pl.BlockSpec((1, 1, capacity, head_dim), lambda b, h, p: (b, h, 0, 0))],
      out_specs=(pl.BlockSpec((1, 1, 1, rows, head_dim), lambda b, h, p: (b, h, p, 0, 0)),
                 pl.BlockSpec((1, 1, 1, rows), lambda b, h, p: (b, h, p, 0))),
      interpret=interpret, name="decode_attention")(length.astype(jnp.int32), qg, keys, values)
  out, lse = merge_splits(out[:, :, :, :group], lse[:, :, :, :group])
  return out.reshape(batch, num_q, head_dim), lse.reshape(batch, num_q)


def supported(head_dim: int) -> bool:
  """Whether the kernel takes this head dim (a power of two, at least 16)."""
  return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def decode_attention(q, keys, values, length) -> tuple[jax.Array, jax.Array]:
  """With the kernel where ``backend.use_kernels()`` and the head dim allows, else the
  reference."""
  if backend.use_kernels() and supported(q.shape[-1]):
    return decode_attention_kernel(q, keys, values, length)
  return decode_attention_reference(q, keys, values, length)
