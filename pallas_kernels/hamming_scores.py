"""Hamming scoring of packed key codes against a GQA group's query codes.

``scores[b, h, s] = sum_g (D - popcount(q[b, h*G + g] ^ k[b, h, s]))`` for ``s < length[b]``
and ``-1`` past it (below every real score). Padding bits past ``D`` are 0 in both codes.
``hamming_similarity``: the same per query (``[B, Hkv, G, S]``, not summed), each key block
read once for its group (SimHash's per-query ranking and vAttention's proxies). Its output
is ``G`` times as large as the summed scores' and the selection's histogram and
kept-positions kernels read it again, so it is ``int16`` (similarities are at most ``bits``,
under ``2**15``): half the bytes of ``int32``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend, score_histogram


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  tokens: int = 512  # key codes per grid step


def hamming_scores_reference(q_codes: jax.Array, k_codes: jax.Array, length: jax.Array,
                             head_dim: int) -> jax.Array:
  """The jnp twin (and CPU path): ``q_codes [B, Hq, W]``, ``k_codes [B, Hkv, S, W]``,
  ``length int32 [B]`` -> ``int32 [B, Hkv, S]``."""
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  qg = q_codes.reshape(batch, num_kv, num_q // num_kv, 1, words)
  diff = jnp.bitwise_xor(qg, k_codes[:, :, None, :, :])
  mismatches = jnp.sum(jax.lax.population_count(diff), axis=(2, 4), dtype=jnp.int32)
  scores = (num_q // num_kv) * head_dim - mismatches
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
  return jnp.where(positions < length[:, None, None], scores, -1)


def popcount32(x: jax.Array) -> jax.Array:
  """Set bits of each ``uint32`` by shifts, masks and one multiply: Triton cannot lower
  ``lax.population_count`` (``math.ctpop``), measured with jax 0.11.2 on an H100."""
  x = x - ((x >> 1) & 0x55555555)
  x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
  x = (x + (x >> 4)) & 0x0F0F0F0F
  return ((x * 0x01010101) >> 24).astype(jnp.int32)


def _kernel(len_ref, q_ref, k_ref, *refs, group, words, top, summed, block, chunk, capacity,
            masked, histogram):
  # len_ref: [1] int32; q_ref: [1, group, words] uint32; k_ref: [1, 1, block, words] uint32
  # refs: o_ref (summed: [1, 1, block] int32, else [1, 1, group, block] int16; the last block
  # may reach past ``capacity``), or with a histogram (cache_len_ref [1] int32, o_ref, h_ref
  # [1, 1, rows, 1, high, low] int32). Each key block is read once for the whole group.
  o_ref = refs[-2 if histogram else 0]
  rows_out = 1 if summed else group
  counts = [0] * rows_out
  for rows, positions, inside in score_histogram.chunks(block, chunk, capacity):
    mismatches = [jnp.zeros((chunk,), jnp.int32) for _ in range(rows_out)]
    for w in range(words):
      column = backend.load(k_ref.at[0, 0, rows, w], mask=inside, other=0, masked=masked)
      for g in range(group):
        mismatches[0 if summed else g] += popcount32(jnp.bitwise_xor(column, q_ref[0, g, w]))
    for r in range(rows_out):
      scores = jnp.where(positions < len_ref[0], top - mismatches[r], -1)
      backend.store(o_ref.at[0, 0, rows] if summed else o_ref.at[0, 0, r, rows],
                    scores.astype(o_ref.dtype), mask=inside, masked=masked)
      if histogram:
        counts[r] += score_histogram.block_counts(scores, positions, inside, refs[0][0],
                                                  histogram)
  if histogram:
    for r in range(rows_out):
      refs[-1][0, 0, r, 0] = counts[r]


def _histogram_call(kernel, rows, grid, in_specs, out_shape, out_spec, histogram, name,
                    interpret, *args):
  """``pallas_call`` of a scoring kernel, with ``histogram`` its fused variant: the cache's
  length as a fourth input and ``[B, Hkv, rows, blocks, bins]`` block histograms as a
  second output (``rows``: 1 summed, ``G`` per query)."""
  if histogram is None:
    return backend.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                               out_specs=out_spec, interpret=interpret, name=name)(*args)
  batch, num_kv, blocks = grid
  high, low = histogram.widths
  scores, hist = backend.pallas_call(
      kernel, out_shape=(out_shape, jax.ShapeDtypeStruct((batch, num_kv, rows, blocks, high,
                                                          low), jnp.int32)),
      grid=grid, in_specs=in_specs + [pl.BlockSpec((1,), lambda b, h, s: (b,))],
      out_specs=(out_spec, pl.BlockSpec((1, 1, rows, 1, high, low),
                                        lambda b, h, s: (b, h, 0, s, 0, 0))),
      interpret=interpret, name=name + "_counted")(*args)
  return scores, hist.reshape(batch, num_kv, rows, blocks, histogram.bins)


def _token_block(histogram, block_sizes, capacity):
  """``(block, chunk)``: the tokens of a grid step, the histogram's block where fused (in
  chunks of ``block_sizes.tokens``: each chunk's one-hot product is staged in shared
  memory), else up to ``block_sizes.tokens`` (one chunk)."""
  if histogram is not None:
    block = score_histogram.BlockSizes().block
    chunk = min(block_sizes.tokens, block)
    if block % chunk:
      raise ValueError(f"block_sizes.tokens must divide {block} with histogram, got {chunk}")
    return block, chunk
  block = min(block_sizes.tokens, pl.next_power_of_2(capacity))
  return block, block


def _inputs(length, q_codes, k_codes, histogram, cache_length):
  """The kernels' inputs; the fused variant's fourth, the cache's length, checked."""
  args = (length.astype(jnp.int32), q_codes, k_codes)
  if histogram is None:
    return args
  if cache_length is None or jnp.shape(cache_length) != jnp.shape(length):
    raise ValueError(f"cache_length must be an int array shaped like length {jnp.shape(length)}"
                     f" with histogram, got {cache_length!r}")
  return args + (jnp.asarray(cache_length).astype(jnp.int32),)


@functools.partial(jax.jit, static_argnames=["head_dim", "block_sizes", "interpret",
                                             "histogram"])
def hamming_scores_kernel(q_codes: jax.Array, k_codes: jax.Array, length: jax.Array,
                          head_dim: int, block_sizes: BlockSizes = BlockSizes(),
                          interpret: bool | None = None,
                          histogram: score_histogram.Histogram | None = None,
                          cache_length: jax.Array | None = None):
  """The Pallas kernel: grid over (batch, KV head, token blocks); tiles any ``S``.

  With ``histogram`` (and ``cache_length int32 [B]``, whose residual is eligible), the
  fused variant: ``(scores, hist int32 [B, Hkv, 1, blocks, bins])``, ``hist`` equal to
  ``score_histogram_reference(scores, cache_length, ...)`` over blocks of
  ``score_histogram.BlockSizes().block`` tokens, so the selection reads no score to count
  them. GPU (Triton) and interpret mode only."""
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  group = num_q // num_kv
  length = length.astype(jnp.int32)
  if backend.mosaic_layout(interpret):
    if histogram is not None:
      raise ValueError("histogram: no fused variant on a TPU (score_histogram_kernel there)")
    return _tpu_call(q_codes, k_codes, length, head_dim, block_sizes, interpret)
  block, chunk = _token_block(histogram, block_sizes, capacity)
  grid = (batch, num_kv, pl.cdiv(capacity, block))
  args = _inputs(length, q_codes, k_codes, histogram, cache_length)
  return _histogram_call(
      functools.partial(_kernel, group=group, words=words, top=group * head_dim, summed=True,
                        block=block, chunk=chunk, capacity=capacity,
                        masked=backend.masks_edges(interpret), histogram=histogram), 1, grid,
      [pl.BlockSpec((1,), lambda b, h, s: (b,)),
       pl.BlockSpec((1, group, words), lambda b, h, s: (b, h, 0)),
       pl.BlockSpec((1, 1, block, words), lambda b, h, s: (b, h, s, 0))],
      jax.ShapeDtypeStruct((batch, num_kv, capacity), jnp.int32),
      pl.BlockSpec((1, 1, block), lambda b, h, s: (b, h, s)), histogram, "hamming_scores",
      interpret, *args)


def _tpu_call(q_codes, k_codes, length, head_dim, block_sizes, interpret):
  """The same kernel body with Mosaic's block layout: the token block spans whole lanes
  (a multiple of 128, or all of ``S``); the length and a group's query codes are SMEM
  scalars; the output gains a unit dimension so that its block's last two dimensions are
  ``(1, block)`` of ``(1, S)``."""
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  group = num_q // num_kv
  block = backend.tpu_tile(block_sizes.tokens, capacity, 128)
  out = backend.pallas_call(
      functools.partial(_kernel, group=group, words=words, top=group * head_dim, summed=True,
                        block=block, chunk=block, capacity=capacity, masked=False,
                        histogram=None),
      out_shape=jax.ShapeDtypeStruct((batch, num_kv, 1, capacity), jnp.int32),
      grid=(batch, num_kv, pl.cdiv(capacity, block)),
      in_specs=[backend.tpu_scalars((None, None, 1), lambda b, h, s: (b, 0, 0)),
                backend.tpu_scalars((1, group, words), lambda b, h, s: (b * num_kv + h, 0, 0)),
                pl.BlockSpec((1, 1, block, words), lambda b, h, s: (b, h, s, 0))],
      out_specs=pl.BlockSpec((1, 1, None, block), lambda b, h, s: (b, h, 0, s)),
      interpret=interpret, name="hamming_scores")(
          length.reshape(batch, 1, 1), q_codes.reshape(batch * num_kv, group, words), k_codes)
  return out.reshape(batch, num_kv, capacity)


def hamming_similarity_reference(q_codes: jax.Array, k_codes: jax.Array, length: jax.Array,
                                 bits: int) -> jax.Array:
  """Per query, not summed over the group: ``q_codes [B, Hq, W]``, ``k_codes [B, Hkv, S,
  W]``, ``length int32 [B]`` -> ``int16 [B, Hkv, G, S]``, ``bits - popcount(q ^ k)``, and
  ``-1`` at or past ``length``."""
  _check_bits(bits)
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  qg = q_codes.reshape(batch, num_kv, num_q // num_kv, 1, words)
  diff = jnp.bitwise_xor(qg, k_codes[:, :, None, :, :])
  scores = bits - jnp.sum(jax.lax.population_count(diff), axis=-1, dtype=jnp.int32)
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, None, :]
  return jnp.where(positions < length[:, None, None, None], scores, -1).astype(jnp.int16)


def _check_bits(bits):
  if not isinstance(bits, int) or not 0 < bits < 2**15:
    raise ValueError(f"bits must be an int in [1, 2**15) (int16 similarities), got {bits!r}")


@functools.partial(jax.jit, static_argnames=["bits", "block_sizes", "interpret", "histogram"])
def hamming_similarity_kernel(q_codes: jax.Array, k_codes: jax.Array, length: jax.Array,
                              bits: int, block_sizes: BlockSizes = BlockSizes(),
                              interpret: bool | None = None,
                              histogram: score_histogram.Histogram | None = None,
                              cache_length: jax.Array | None = None):
  """The Pallas kernel of ``hamming_similarity_reference`` (grid over batch, KV head and
  token blocks). GPU (Triton) and interpret mode; no TPU layout (the reference there).
  With ``histogram``, the fused variant, as ``hamming_scores_kernel``'s: ``(similarities,
  hist int32 [B, Hkv, G, blocks, bins])``."""
  _check_bits(bits)
  batch, num_q, words = q_codes.shape
  num_kv, capacity = k_codes.shape[1], k_codes.shape[2]
  group = num_q // num_kv
  block, chunk = _token_block(histogram, block_sizes, capacity)
  grid = (batch, num_kv, pl.cdiv(capacity, block))
  args = _inputs(length, q_codes, k_codes, histogram, cache_length)
  return _histogram_call(
      functools.partial(_kernel, group=group, words=words, top=bits, summed=False,
                        block=block, chunk=chunk, capacity=capacity,
                        masked=backend.masks_edges(interpret), histogram=histogram), group, grid,
      [pl.BlockSpec((1,), lambda b, h, s: (b,)),
       pl.BlockSpec((1, group, words), lambda b, h, s: (b, h, 0)),
       pl.BlockSpec((1, 1, block, words), lambda b, h, s: (b, h, s, 0))],
      jax.ShapeDtypeStruct((batch, num_kv, group, capacity), jnp.int16),
      pl.BlockSpec((1, 1, group, block), lambda b, h, s: (b, h, 0, s)), histogram,
      "hamming_similarity", interpret, *args)


def hamming_similarity(q_codes, k_codes, length, bits: int) -> jax.Array:
  """Per-query similarities with the kernel where ``backend.use_kernels`` enables it (not
  on a TPU), else the reference."""
  if backend.use_kernels("hamming_similarity") and not backend.mosaic_layout(None):
    return hamming_similarity_kernel(q_codes, k_codes, length, bits)
  return hamming_similarity_reference(q_codes, k_codes, length, bits)


def hamming_scores(q_codes, k_codes, length, head_dim: int) -> jax.Array:
  """Scores with the kernel where ``backend.use_kernels()``, else the reference."""
  if backend.use_kernels():
    return hamming_scores_kernel(q_codes, k_codes, length, head_dim)
  return hamming_scores_reference(q_codes, k_codes, length, head_dim)


def hamming_scores_counted(q_codes, k_codes, length, head_dim: int, cache_length,
                           histogram: score_histogram.Histogram):
  """``(scores [B, Hkv, S], hist [B, Hkv, 1, blocks, bins])``: ``hamming_scores`` and the
  block histograms of its scores eligible by ``cache_length``; the fused kernel where the
  kernels are used outside a TPU, else the scores and then ``score_histogram_kernel``."""
  return _counted(hamming_scores_kernel, hamming_scores, q_codes, k_codes, length, head_dim,
                  cache_length, histogram)


def hamming_similarity_counted(q_codes, k_codes, length, bits: int, cache_length,
                               histogram: score_histogram.Histogram):
  """``(similarities [B, Hkv, G, S], hist [B, Hkv, G, blocks, bins])``: as
  ``hamming_scores_counted``, per query."""
  return _counted(hamming_similarity_kernel, hamming_similarity, q_codes, k_codes, length,
                  bits, cache_length, histogram)


def _counted(fused, unfused, q_codes, k_codes, length, size, cache_length, histogram):
  if backend.use_kernels("hamming_counted") and not backend.mosaic_layout(None):
    return fused(q_codes, k_codes, length, size, histogram=histogram,
                 cache_length=cache_length)
  out = unfused(q_codes, k_codes, length, size)
  batch, num_kv, capacity = out.shape[0], out.shape[1], out.shape[-1]
  hist = score_histogram.score_histogram_kernel(
      out.reshape(batch, -1, capacity), cache_length, histogram.lo, histogram.sinks,
      histogram.local, bins=histogram.bins)
  return out, hist.reshape((batch, num_kv, -1) + hist.shape[-2:])
