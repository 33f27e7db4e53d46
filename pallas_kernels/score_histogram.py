r"""Per-block histograms of small integer scores (Hamming similarities), for selection by
counting: the exact ``k``-th largest score follows from the summed histogram, and the ties
before any block from the blocks' counts of that score (``sparse_attn._src.selection``).

``hist[r, j, v]`` counts the eligible tokens of block ``j`` (``block`` tokens) of row ``r``
whose score is ``lo + v``, for ``v`` in ``[0, bins)``; a token is eligible when
``sinks <= position < length - local`` (the residual of an exact window). ``bins`` is 256,
512 or 1024 (``bins_for`` picks the fewest that hold a score range): the histograms are
the selection's largest arrays after the scores (``bins`` int32 per 1024 tokens and row),
so SimHash's 130 scores take 256 bins, a quarter of Spotlight's 1024.

The kernel counts with one small matrix product per block (or per chunk of it, summed):
``v = W h + l`` and ``hist[h, l] = sum_t [h_t = h] [l_t = l]``, the product of two one-hot
matrices ``[chunk, bins / W]`` and ``[chunk, W]`` (exact in float32), so no scatter and no
atomics. Both sides are at least 16 wide, the smallest product Triton's ``tl.dot`` takes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

BINS = 1024  # the most bins: scores lo .. lo + 1023; 32 x 32 one-hot product
_SPLITS = {256: (16, 16), 512: (16, 32), 1024: (32, 32)}  # bins: (high, low) one-hot widths


def bins_for(values: int) -> int:
  """The fewest bins (256, 512 or 1024) holding ``values`` consecutive scores."""
  if not isinstance(values, int) or not 1 <= values <= BINS:
    raise ValueError(f"values must be an int in [1, {BINS}], got {values!r}")
  return min(b for b in _SPLITS if b >= values)


def _check_bins(bins):
  if bins not in _SPLITS:
    raise ValueError(f"bins must be one of {sorted(_SPLITS)}, got {bins!r}")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block: int = 1024  # tokens per histogram (and per grid step)
  # tokens per one-hot product (GPU: its operands are staged in shared memory; a TPU
  # counts the whole block at once)
  chunk: int = 1024


@dataclasses.dataclass(frozen=True)
class Histogram:
  """What a scoring kernel counts beside its scores (``hamming_scores``' fused variants):
  per block of ``BlockSizes().block`` tokens, the eligible scores ``lo .. lo + bins - 1``."""

  lo: int
  sinks: int
  local: int
  bins: int

  def __post_init__(self):
    _check_bins(self.bins)

  @property
  def widths(self) -> tuple[int, int]:
    """``(high, low)``: the one-hot widths of ``block_counts``' product."""
    return _SPLITS[self.bins]


def eligible_mask(positions: jax.Array, length: jax.Array, sinks: int, local: int) -> jax.Array:
  """``positions [..., n]`` and ``length`` broadcastable to ``[..., 1]``."""
  return (positions >= sinks) & (positions < length - local)


def score_histogram_reference(scores: jax.Array, length: jax.Array, lo: int, sinks: int,
                              local: int, block: int, bins: int = BINS) -> jax.Array:
  """The jnp twin: ``scores int16 or int32 [B, H, S]``, ``length int32 [B]`` -> ``int32 [B, H,
  ceil(S / block), bins]``. Eligible scores outside ``[lo, lo + bins)`` are not allowed."""
  _check_bins(bins)
  batch, heads, capacity = scores.shape
  blocks = -(-capacity // block)
  padded = jnp.pad(scores.astype(jnp.int32), [(0, 0), (0, 0), (0, blocks * block - capacity)])
  positions = jnp.arange(blocks * block, dtype=jnp.int32)[None, None, :]
  ok = eligible_mask(positions, length[:, None, None], sinks, local) & (positions < capacity)
  values = jnp.where(ok, padded - lo, bins)  # bins: dropped by the one-hot below
  onehot = values.reshape(batch, heads, blocks, block, 1) == jnp.arange(bins).reshape(
      1, 1, 1, 1, bins)
  return jnp.sum(onehot, axis=3, dtype=jnp.int32)


def block_counts(scores: jax.Array, positions: jax.Array, inside: jax.Array,
                 length: jax.Array, histogram: Histogram) -> jax.Array:
  """Inside a kernel: ``int32 [high, low]``, the histogram of the ``scores [n]`` of a block
  or chunk at ``positions`` (``inside`` the array) that are eligible by ``length`` (``lo + v``
  counted at ``[v // low, v % low]``), by one one-hot product."""
  n_high, n_low = histogram.widths
  eligible = inside & eligible_mask(positions, length, histogram.sinks, histogram.local)
  v = scores.astype(jnp.int32) - histogram.lo
  shift = n_low.bit_length() - 1
  high_lanes = jnp.arange(n_high, dtype=jnp.int32)[None, :]
  low_lanes = jnp.arange(n_low, dtype=jnp.int32)[None, :]
  high = jnp.where(eligible[:, None] & ((v[:, None] >> shift) == high_lanes), 1.0, 0.0).astype(
      jnp.bfloat16)
  low = jnp.where((v[:, None] & (n_low - 1)) == low_lanes, 1.0, 0.0).astype(jnp.bfloat16)
  counts = jax.lax.dot_general(high, low, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)  # exact: at most block
  return counts.astype(jnp.int32)


def chunks(block: int, chunk: int, capacity: int):
  """Inside a kernel whose grid's third axis steps over ``block`` tokens: the static pieces
  of ``chunk`` tokens, ``(rows, positions, inside)`` each (``rows`` indexes the block's
  refs; ``inside``: ``positions < capacity``)."""
  for c in range(block // chunk):
    positions = pl.program_id(2) * block + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    rows = slice(None) if chunk == block else pl.ds(c * chunk, chunk)
    yield rows, positions, positions < capacity


def _kernel(len_ref, s_ref, o_ref, *, block, chunk, capacity, masked, histogram):
  # len_ref: [1] int32; s_ref: [1, 1, block] int16 or int32; o_ref: [1, 1, 1, high, low] int32
  counts = 0
  for rows, positions, inside in chunks(block, chunk, capacity):
    s = backend.load(s_ref.at[0, 0, rows], mask=inside, other=0, masked=masked)
    counts += block_counts(s, positions, inside, len_ref[0], histogram)
  o_ref[0, 0, 0] = counts


@functools.partial(jax.jit, static_argnames=["lo", "sinks", "local", "block_sizes", "interpret",
                                             "bins"])
def score_histogram_kernel(scores: jax.Array, length: jax.Array, lo: int, sinks: int = 0,
                           local: int = 0, block_sizes: BlockSizes = BlockSizes(),
                           interpret: bool | None = None, bins: int = BINS) -> jax.Array:
  """The Pallas kernel: grid over (batch, head, token block); same contract as the
  reference with ``block = block_sizes.block``."""
  histogram = Histogram(lo, sinks, local, bins)
  if scores.dtype not in (jnp.int16, jnp.int32):
    raise ValueError(f"scores must be int16 or int32, got {scores.dtype}")
  batch, heads, capacity = scores.shape
  block = block_sizes.block
  chunk = block if backend.mosaic_layout(interpret) else min(block_sizes.chunk, block)
  if block % chunk:
    raise ValueError(f"block_sizes.chunk must divide block_sizes.block, got {block_sizes}")
  blocks = -(-capacity // block)
  high, low = histogram.widths
  kernel = functools.partial(_kernel, block=block, chunk=chunk, capacity=capacity,
                             masked=backend.masks_edges(interpret), histogram=histogram)
  out_shape = jax.ShapeDtypeStruct((batch, heads, blocks, high, low), jnp.int32)
  out_spec = pl.BlockSpec((1, 1, 1, high, low), lambda b, h, j: (b, h, j, 0, 0))
  if backend.mosaic_layout(interpret):
    hist = backend.pallas_call(
        kernel, out_shape=out_shape, grid=(batch, heads, blocks),
        in_specs=[backend.tpu_scalars((None, None, 1), lambda b, h, j: (b, 0, 0)),
                  tpu_block_spec(block)],
        out_specs=out_spec, interpret=interpret, name="score_histogram")(
            length.astype(jnp.int32).reshape(batch, 1, 1), tpu_blocks(scores, block))
    return hist.reshape(batch, heads, blocks, bins)
  hist = backend.pallas_call(
      kernel, out_shape=out_shape, grid=(batch, heads, blocks),
      in_specs=[pl.BlockSpec((1,), lambda b, h, j: (b,)),
                pl.BlockSpec((1, 1, block), lambda b, h, j: (b, h, j))],
      out_specs=out_spec, interpret=interpret, name="score_histogram")(
          length.astype(jnp.int32), scores)  # int16 or int32: widened as loaded
  return hist.reshape(batch, heads, blocks, bins)


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
