"""Compiled Pallas kernels on an accelerator: equality with their references, and timings.

Run on a GPU (or TPU) machine from the repository root::

  python -m benchmarks.device_kernels --json $OUT/device_kernels.json

1. Every kernel, compiled (``interpret=False``), against its jnp reference on shapes that are
   not multiples of the block sizes, in float32 and bfloat16 where it applies.
2. ``hamming_scores`` over 512K tokens x 8 KV heads x 128 bits (GQA group 4): kernel and
   reference times against the Spotlight paper's "under 100 us on an A100" and against the
   bytes / bandwidth floor of the card.
3. ``sparse_decode_attention`` over 2% of a 128K cache (one list per KV head, and one per
   query head) against dense decode attention (XLA, and cuDNN where available).

On CPU, ``--small`` runs the same code in interpret mode at small sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from pallas_kernels import backend
from pallas_kernels import decode_attention as da
from pallas_kernels import hamming_scores as hs
from pallas_kernels import pack_signs as ps
from pallas_kernels import kept_positions as kp
from pallas_kernels import poisson_positions as pp
from pallas_kernels import score_histogram as sh
from pallas_kernels import sparse_decode_attention as sda
from pallas_kernels import table_match_counts as tmc
from sparse_attn.lsh import LogInclusion
from sparse_attn._src import selection

# Peak HBM bandwidth in bytes/s by device kind (vendor figures), for the floor.
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12}


def bandwidth(kind: str) -> float | None:
  return next((bw for name, bw in BANDWIDTH.items() if name in kind), None)


def median_us(fn, *args) -> float:
  *args, repeats = args
  return 1e6 * harness.median_seconds(lambda: fn(*args), repeats)  # after one warm-up call


def max_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  finite = np.isfinite(b)
  if not np.array_equal(finite, np.isfinite(a)):
    return float("inf")
  return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))


def attempt(fn, *args):
  """``fn(*args)``, or the error as a string: one failing kernel must not end the run."""
  try:
    return fn(*args)
  except Exception as err:  # noqa: BLE001 - reported, not hidden
    return f"failed: {type(err).__name__}: {str(err)[:300]}"


def check_equal(interpret: bool) -> list[dict]:
  rows = []
  key = jax.random.PRNGKey(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jax.random.normal(key, (3, 37, 130)).astype(dtype)
    rows.append({"kernel": "pack_signs", "dtype": jnp.dtype(dtype).name,
                 "max_diff": attempt(lambda x: max_diff(
                     ps.pack_signs_kernel(x, ps.BlockSizes(rows=16), interpret=interpret),
                     ps.pack_signs_reference(x)), x)})
  q = ps.pack_signs_reference(jax.random.normal(key, (2, 8, 128)))
  k = ps.pack_signs_reference(jax.random.normal(key, (2, 2, 1000, 128)))
  length = jnp.array([1000, 333], jnp.int32)
  rows.append({"kernel": "hamming_scores", "dtype": "uint32", "max_diff": attempt(
      lambda: max_diff(hs.hamming_scores_kernel(q, k, length, 128, hs.BlockSizes(tokens=256),
                                                interpret=interpret),
                       hs.hamming_scores_reference(q, k, length, 128)))})
  rng = np.random.default_rng(0)
  # K = 3 bits per table (plenty of matches), L = 150 tables packed in 15 words.
  qt = tmc.pack_codes(jnp.asarray(rng.integers(0, 8, size=(2, 8, 150)), jnp.uint32), 3)
  kt = tmc.pack_codes(jnp.asarray(rng.integers(0, 8, size=(2, 2, 1000, 150)), jnp.uint32), 3)
  for cap in (None, 2):  # all counts, and MagicPIG's (capped at min_collisions)
    rows.append({"kernel": f"table_match_counts (cap {cap})", "dtype": "uint32", "max_diff":
                 attempt(lambda cap=cap: max_diff(
                     tmc.table_match_counts_kernel(qt, kt, length, 3, 150, cap,
                                                   tmc.BlockSizes(tokens=256),
                                                   interpret=interpret),
                     tmc.table_match_counts_reference(qt, kt, length, 3, 150, cap)))})
  for dtype in (jnp.float32, jnp.bfloat16):
    for lists in (2, 8):  # per KV head (shared by the group) and per query head
      qq = jnp.asarray(rng.normal(size=(2, 8, 128)), dtype)
      keys = jnp.asarray(rng.normal(size=(2, 2, 1000, 128)), dtype)
      values = jnp.asarray(rng.normal(size=(2, 2, 1000, 128)), dtype)
      idx = jnp.asarray(rng.integers(0, 1000, size=(2, lists, 300)), jnp.int32)
      lw = jnp.asarray(rng.normal(size=(2, lists, 300)), jnp.float32)
      count = jnp.asarray(rng.integers(0, 301, size=(2, lists)), jnp.int32)

      def diff(*args):
        got = sda.sparse_decode_attention_kernel(*args, sda.BlockSizes(block=32, split=128),
                                                 interpret=interpret)
        want = sda.sparse_decode_attention_reference(*args)
        return max(max_diff(got[0], want[0]), max_diff(got[1], want[1]))

      rows.append({"kernel": f"sparse_decode_attention ({lists} lists)",
                   "dtype": jnp.dtype(dtype).name,
                   "max_diff": attempt(diff, qq, keys, values, idx, lw, count)})
    # MagicPIG's weights, computed in the pass from each key's score (one list per query).
    weights = sda.ScoreWeights(
        LogInclusion(10, 150, 2, 128), jnp.asarray(rng.uniform(5, 15, (2, 2, 1000)),
                                                           jnp.float32),
        jnp.stack([jnp.full((2, 8), 11.0), jnp.asarray(rng.normal(size=(2, 8)), jnp.float32),
                   jnp.zeros((2, 8))], -1).reshape(2, 8, 1, 3))
    rows.append({"kernel": "sparse_decode_attention (MagicPIG weights)",
                 "dtype": jnp.dtype(dtype).name,
                 "max_diff": attempt(diff, qq, keys, values, idx, weights, count)})
  for dtype in (jnp.float32, jnp.bfloat16):
    qq = jnp.asarray(rng.normal(size=(3, 8, 128)), dtype)
    keys = jnp.asarray(rng.normal(size=(3, 2, 1000, 128)), dtype)
    values = jnp.asarray(rng.normal(size=(3, 2, 1000, 128)), dtype)
    length = jnp.array([0, 777, 1000], jnp.int32)  # empty, ragged, full; S no block multiple

    def diff(*args):
      got = da.decode_attention_kernel(*args, da.BlockSizes(block=64, split=192),
                                       interpret=interpret)
      want = da.decode_attention_reference(*args)
      return max(max_diff(got[0], want[0]), max_diff(got[1], want[1]))

    rows.append({"kernel": "decode_attention (dense)", "dtype": jnp.dtype(dtype).name,
                 "max_diff": attempt(diff, qq, keys, values, length)})
  scores = jnp.asarray(rng.integers(-1, 60, size=(3, 2, 1000)), jnp.int32)
  hist_args = (scores, length, -1, 4, 16)
  for bins in (1024, 256):  # Spotlight's and SimHash's
    rows.append({"kernel": f"score_histogram ({bins} bins)", "dtype": "uint32 (int32 counts)",
                 "max_diff": attempt(lambda bins=bins: max_diff(
                     sh.score_histogram_kernel(*hist_args, sh.BlockSizes(block=256),
                                               interpret=interpret, bins=bins),
                     sh.score_histogram_reference(*hist_args, 256, bins)))})
  hist = sh.score_histogram_reference(*hist_args, 256)
  keep = jnp.asarray(rng.integers(0, 120, size=(3, 2)), jnp.int32)
  plan = selection.counting_plan(hist, keep, -1)
  count = np.minimum(np.asarray(keep), np.asarray(hist.sum((-2, -1))))
  slots = jnp.arange(128)[None, None, :] < jnp.asarray(count)[..., None]

  def kept_diff():
    args = (scores, length, *plan, 4, 16, 128, 256)
    got = kp.kept_positions_kernel(*args, interpret=interpret)
    want = kp.kept_positions_reference(*args)
    return max_diff(jnp.where(slots, got, 0), jnp.where(slots, want, 0))

  rows.append({"kernel": "kept_positions", "dtype": "uint32 (int32 positions)",
               "max_diff": attempt(kept_diff)})
  rows += poisson_rows(rng, interpret)
  lengths = jnp.array([1000, 333], jnp.int32)
  rows.append({"kernel": "hamming_similarity", "dtype": "uint32 (int16 similarities)",
               "max_diff": attempt(lambda: max_diff(
                   hs.hamming_similarity_kernel(q, k, lengths, 128, hs.BlockSizes(tokens=256),
                                                interpret=interpret),
                   hs.hamming_similarity_reference(q, k, lengths, 128)))})
  rows += counted_rows(q, k, lengths, interpret)
  for row in rows:
    tolerance = 0 if row["dtype"].startswith("uint") else 1e-4
    row["ok"] = not isinstance(row["max_diff"], str) and row["max_diff"] <= tolerance
  return rows


def counted_rows(q, k, lengths, interpret: bool) -> list[dict]:
  """The Hamming kernels' fused variants (scores and their block histograms) against their
  references and ``score_histogram_reference``, the cache's lengths past the hashed ones."""
  cache_lengths = lengths + jnp.array([0, 500], jnp.int32)
  group = q.shape[1] // k.shape[1]
  rows = []
  for name, kernel, reference, top in (
      ("hamming_scores", hs.hamming_scores_kernel, hs.hamming_scores_reference, group * 128),
      ("hamming_similarity", hs.hamming_similarity_kernel, hs.hamming_similarity_reference,
       128)):
    spec = selection.histogram_for((-1, top), 4, 16)

    def diff(kernel=kernel, reference=reference, spec=spec):
      scores, hist = kernel(q, k, lengths, 128, histogram=spec, cache_length=cache_lengths,
                            interpret=interpret)
      want = reference(q, k, lengths, 128)
      want_hist = sh.score_histogram_reference(
          want.reshape(want.shape[0], -1, want.shape[-1]), cache_lengths, spec.lo, spec.sinks,
          spec.local, sh.BlockSizes().block, spec.bins)
      return max(max_diff(scores, want), max_diff(hist.reshape(want_hist.shape), want_hist))

    rows.append({"kernel": f"{name}, counted ({spec.bins} bins)",
                 "dtype": "uint32 (scores and int32 counts)", "max_diff": attempt(diff)})
  return rows


def poisson_rows(rng, interpret: bool) -> list[dict]:
  """``poisson_positions`` against its reference: the kept positions and counts (exact: the
  uniforms are integer hashes) and their log-probabilities (the kernel's ``log``)."""
  prob = rng.random((3, 2, 1000)) * 0.1
  prob[0, 0] = 0.0
  prob[0, 0, 10:50] = 1e-6  # a fallback row that almost surely draws nothing
  prob[1, 1, :30] = 1.0
  args = (jnp.asarray(prob, jnp.float32),
          jnp.asarray(rng.integers(0, 2**32, (3, 2), dtype=np.uint64).astype(np.uint32)),
          jnp.asarray([[True, False], [True, True], [False, True]]))
  size = 128
  out = {}

  def diffs():
    got = pp.poisson_positions_kernel(*args, size, block=256, interpret=interpret)
    want = pp.poisson_positions_reference(*args, size)
    slots = jnp.arange(size)[None, None, :] < jnp.minimum(want[2], size)[..., None]
    out["log_prob"] = max_diff(jnp.where(slots, got[1], 0.0), jnp.where(slots, want[1], 0.0))
    return max(max_diff(got[2], want[2]),
               max_diff(jnp.where(slots, got[0], 0), jnp.where(slots, want[0], 0)))

  positions = attempt(diffs)
  return [{"kernel": "poisson_positions", "dtype": "uint32 (int32 positions and counts)",
           "max_diff": positions},
          {"kernel": "poisson_positions", "dtype": "float32 (log-probabilities)",
           "max_diff": out.get("log_prob", positions)}]


def dense_xla(q, keys, values, implementation=None):
  return jax.nn.dot_product_attention(
      q[:, None], jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2),
      implementation=implementation)[:, 0]


def timings(tokens: int, decode_tokens: int, repeats: int, interpret: bool) -> dict:
  kind = jax.devices()[0].device_kind
  key = jax.random.PRNGKey(1)
  out = {"device": kind}
  # Hamming scores: 8 KV heads x 128 bits, group 4.
  q = ps.pack_signs_reference(jax.random.normal(key, (1, 32, 128)))
  k = jax.random.bits(key, (1, 8, tokens, 4), jnp.uint32)
  length = jnp.array([tokens], jnp.int32)
  kernel = jax.jit(lambda q, k, n: hs.hamming_scores_kernel(q, k, n, 128, interpret=interpret))
  reference = jax.jit(lambda q, k, n: hs.hamming_scores_reference(q, k, n, 128))
  bytes_moved = k.size * 4 + 8 * tokens * 4  # codes in, int32 scores out
  bw = bandwidth(kind)
  out["hamming_scores"] = {
      "tokens": tokens, "kernel_us": attempt(median_us, kernel, q, k, length, repeats),
      "reference_us": attempt(median_us, reference, q, k, length, repeats),
      "bytes": bytes_moved, "floor_us": None if bw is None else 1e6 * bytes_moved / bw,
      "paper_claim_us": 100.0}
  # Sparse decode over 2% of the cache against dense decode attention, bf16.
  dtype = jnp.bfloat16
  keys = jax.random.normal(key, (1, 8, decode_tokens, 128), dtype)
  values = jax.random.normal(jax.random.PRNGKey(2), (1, 8, decode_tokens, 128), dtype)
  qq = jax.random.normal(jax.random.PRNGKey(3), (1, 32, 128), dtype)
  n = math.ceil(0.02 * decode_tokens)
  rows = {}
  fns = {"dense (XLA)": jax.jit(dense_xla)}
  if jax.default_backend() == "gpu":
    fns["dense (cuDNN)"] = jax.jit(lambda q, k, v: dense_xla(q, k, v, "cudnn"))
  for name, fn in fns.items():  # cuDNN may reject a shape or be missing
    rows[name] = attempt(median_us, fn, qq, keys, values, repeats)
  for lists in (8, 32):
    idx = jnp.sort(jax.random.randint(key, (1, lists, n), 0, decode_tokens), axis=-1)
    count = jnp.full((1, lists), n, jnp.int32)
    for blocks in (sda.BlockSizes(), sda.BlockSizes(block=128, split=1024)):
      kern = jax.jit(lambda q, k, v, i, c, blocks=blocks: sda.sparse_decode_attention_kernel(
          q, k, v, i, None, c, blocks, interpret=interpret))
      block, split = blocks.resolve(1, lists, 32 // lists, n)
      rows[f"sparse kernel 2% ({lists} lists, block {block}, split {split})"] = attempt(
          median_us, kern, qq, keys, values, idx, count, repeats)
    ref = jax.jit(lambda q, k, v, i, c: sda.sparse_decode_attention_reference(
        q, k, v, i, None, c))
    rows[f"sparse reference 2% ({lists} lists)"] = attempt(median_us, ref, qq, keys, values,
                                                          idx, count, repeats)
  out["sparse_decode"] = {"tokens": decode_tokens, "dtype": "bfloat16", "us": rows}
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", metavar="PATH")
  parser.add_argument("--small", action="store_true", help="interpret mode, small sizes")
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--no-timings", action="store_true", help="equality checks only")
  args = parser.parse_args(argv)
  interpret = backend.platform() == "cpu"
  if interpret and not args.small:
    parser.error("no accelerator: compiled kernels cannot run here (use --small)")
  report = {"jax": jax.__version__, "backend": backend.platform(), "interpret": interpret,
            "equal": check_equal(interpret)}
  for row in report["equal"]:
    print(f"{row['kernel']:40s} {row['dtype']:9s} max diff {row['max_diff']} "
          f"{'ok' if row['ok'] else 'MISMATCH'}", flush=True)
  if not args.no_timings:
    tokens, decode = (4096, 4096) if args.small else (524288, 131072)
    report["timings"] = timings(tokens, decode, 3 if args.small else args.repeats, interpret)
    print(json.dumps(report["timings"], indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return 0 if all(row["ok"] for row in report["equal"]) else 1


if __name__ == "__main__":
  sys.exit(main())
