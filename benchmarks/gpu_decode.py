"""Decode steps timed as a decode loop runs them: many steps inside one compiled program.

Every method's step writes one token into the cache (its length grows), appends it to the
method's index and attends, inside a ``lax.scan`` over ``--steps`` steps with the cache and
the index carried (and donated between calls, so no copy of the cache is timed). The
per-step time is the loop's median wall time over ``--repeats`` calls divided by the
steps: host dispatch is paid once per loop, as in a compiled decode loop. The per-call
figure (one jitted step per Python call, dispatch included) is reported beside it.

Dense baselines in the same run: the project's split-K Pallas decode kernel
(``pallas_kernels.decode_attention``), its jnp twin under XLA, and
``jax.nn.dot_product_attention`` (XLA and cuDNN, on the cache transposed to its layout, as
a user would call it). Ratios are against the fastest dense; torch's SDPA flash decode is
timed by ``benchmarks/torch_flash_decode.py`` in the same device run.

Also: retrieval alone (Hamming scores + selection of the top 2%) by counting, by bisection,
by ``lax.top_k``, by score histograms and by the kept-positions kernel; Spotlight without
its append; vAttention with the SimHash proposal (``vattention_simhash``: epsilon = delta =
0.05, output guarantee); ``*_kept`` variants select (and draw) with the kernels not yet
verified on a device (``backend.PENDING``). ``--methods`` lists the variants run (the
dense kernel's block-size sweep of the first device run: ``DENSE_VARIANTS``). Results are
written to ``--json`` after every row (a run cut short still reports).

  python -m benchmarks.gpu_decode --json $OUT/gpu_decode.json          # on the device
  python -m benchmarks.gpu_decode --small                              # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa
from benchmarks import harness
from pallas_kernels import backend
from pallas_kernels import decode_attention as da
from pallas_kernels import hamming_scores as hs
from pallas_kernels import pack_signs as ps
from pallas_kernels import score_histogram
from sparse_attn import hash_heads, synthetic
from sparse_attn._src import selection

KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128  # Llama-3.1-8B layer shapes


def dense_nn(q, cache, implementation=None):
  """``jax.nn.dot_product_attention`` on the cache transposed to its ``[B, S, H, D]``."""
  keys, values, length = cache
  return jax.nn.dot_product_attention(
      q[:, None], jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2),
      key_value_seq_lengths=length, implementation=implementation)[:, 0]


def methods(params, which) -> dict:
  """name -> ``(estimator or None, attend(q, cache, index, key) -> out, patch)``: ``patch``
  is a context manager active while the step is traced (a selection variant)."""
  no_patch = unittest.mock.patch.object(selection, "prefers_counting",
                                        selection.prefers_counting)
  bisect = unittest.mock.patch.object(selection, "prefers_counting", lambda: False)
  # The kernels not yet verified on a device too (the kept-positions selection).
  pending = unittest.mock.patch.object(backend, "PENDING", frozenset())

  dense = {
      "dense_pallas": lambda q, c, i, k: da.decode_attention_kernel(q, *c)[0],
      "dense_jnp": lambda q, c, i, k: da.decode_attention_reference(q, *c)[0],
      "dense_nn_xla": lambda q, c, i, k: dense_nn(q, c, "xla"),
      "dense_nn_cudnn": lambda q, c, i, k: dense_nn(q, c, "cudnn"),
  }
  every = {name: (None, fn, no_patch) for name, fn in dense.items()}
  for name, blocks, stages in DENSE_VARIANTS:
    every[name] = (None, lambda q, c, i, k, blocks=blocks: da.decode_attention_kernel(
        q, *c, block_sizes=blocks)[0], compiler_patch(stages))
  estimators = {"spotlight": lambda: sa.spotlight(params, fraction=0.02),
                "topk_simhash": lambda: sa.topk(fraction=0.02, predictor=sa.predictors.simhash()),
                # The scan of packed codes on a GPU (backend.magicpig_retrieval); its "_kept"
                # variant lists the sample with the kept-positions kernel.
                "magicpig": lambda: sa.magicpig(K=10, L=150)}
  for name, make in estimators.items():
    # A fresh estimator per variant: its jitted attend caches the trace of its selection.
    for suffix, patch in (("", no_patch), ("_bisect", bisect), ("_kept", pending)):
      est = make()
      every[name + suffix] = (est, lambda q, c, i, k, est=est: est.attend(q, c, i, k).out,
                              patch)
  # vAttention, SimHash proposal (1024 bits), output guarantee at epsilon = delta = 0.05;
  # "_kept": with the kernels not yet verified (its draws by poisson_positions).
  for suffix, patch in (("", no_patch), ("_kept", pending)):
    est = sa.vattention_importance(0.05, 0.05, guarantee="output")
    every["vattention_simhash" + suffix] = (
        est, lambda q, c, i, k, est=est: est.attend(q, c, i, k).out, patch)
  # Attend alone (the tokens written during the loop stay unhashed): the append's cost is
  # the difference.
  est = estimators["spotlight"]()
  every["spotlight_noappend"] = (est._replace(append=lambda i, c: i),
                                 lambda q, c, i, k: est.attend(q, c, i, k).out, no_patch)
  return {name: every[name] for name in which}


# Split-K kernel variants: (name, block sizes, Triton pipelining stages).
DENSE_VARIANTS = (
    ("dense_pallas_b64", da.BlockSizes(block=64), 2),
    ("dense_pallas_s3", da.BlockSizes(), 3),
    ("dense_pallas_p256", da.BlockSizes(programs=256), 2),
    ("dense_pallas_p1024", da.BlockSizes(programs=1024), 2),
)


def compiler_patch(stages: int):
  """The backend's Triton compiler params with ``num_stages=stages``."""
  default = backend.compiler_params

  def params():
    got = default()
    return dataclasses.replace(got, num_stages=stages) if got is not None else None
  return unittest.mock.patch.object(backend, "compiler_params", params)


def write_token(cache: sa.KVCache, k_new, v_new) -> sa.KVCache:
  """The cache with one token per row written at ``length`` (``k_new [B, Hkv, D]``)."""
  put = jax.vmap(lambda x, new, p: jax.lax.dynamic_update_slice_in_dim(x, new[:, None], p, 1))
  return sa.KVCache(put(cache.keys, k_new, cache.length), put(cache.values, v_new, cache.length),
                    cache.length + 1)


def step_inputs(key, steps, batch, dtype):
  kk, kv, kq = jax.random.split(key, 3)
  shape = (steps, batch, KV_HEADS, HEAD_DIM)
  return (jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype),
          jax.random.normal(kq, (steps, batch, KV_HEADS * GROUP, HEAD_DIM), dtype),
          jax.random.split(jax.random.PRNGKey(7), steps))


def time_method(name, est, attend, patch, cache, steps, repeats, hlo_path=None):
  """``(per-step ms in a compiled loop, per-call ms)``; the cache comes back grown."""
  index = est.init(cache, jax.random.PRNGKey(3)) if est is not None else ()
  append = est.append if est is not None else (lambda i, c: i)

  def step(carry, x):
    cache, index = carry
    k_new, v_new, q, key = x
    cache = write_token(cache, k_new, v_new)
    index = append(index, cache)
    return (cache, index), jnp.sum(attend(q, cache, index, key).astype(jnp.float32))

  with patch:
    loop = jax.jit(lambda cache, index, xs: jax.lax.scan(step, (cache, index), xs),
                   donate_argnums=(0, 1))
    one = jax.jit(lambda cache, index, x: step((cache, index), x), donate_argnums=(0, 1))
    xs = step_inputs(jax.random.PRNGKey(len(name)), steps, cache.keys.shape[0],
                     cache.keys.dtype)
    if hlo_path:  # where the compiled loop copies whole arrays, and how many loops it runs
      text = loop.lower(cache, index, xs).compile().as_text()
      with open(hlo_path, "w") as f:
        f.write(text)
      big = [line.strip()[:160] for line in text.splitlines()
             if " copy(" in line and str(cache.keys.shape[2]) in line]
      print(f"{name}: {len(big)} copies of cache-sized arrays, "
            f"{text.count(' while(')} while loops, {text.count('conditional(')} "
            f"conditionals", *big[:6], sep="\n  ", flush=True)
    state = {"carry": (cache, index)}  # donated to each call, and returned grown

    def run(fn, x):
      state["carry"], state["out"] = fn(*state["carry"], x)
      return state["out"]

    loop_s = harness.median_seconds(lambda: run(loop, xs), repeats)  # the first call compiles
    x0 = jax.tree.map(lambda a: a[0], xs)
    call_s = harness.median_seconds(lambda: run(one, x0), 10)
  if not np.isfinite(float(jnp.sum(state["out"]))):
    raise FloatingPointError(f"{name}: non-finite output")
  cache, _ = state.pop("carry")
  return 1e3 * loop_s / steps, 1e3 * call_s, cache


def decode_rows(args, params, report, save):
  for length, batch in args.configs:
    capacity = length + args.steps * (args.repeats + 2) + 64
    _, cache = synthetic.llm_like(jax.random.PRNGKey(1), batch=batch, num_kv_heads=KV_HEADS,
                                  group=GROUP, capacity=capacity, head_dim=HEAD_DIM,
                                  length=jnp.full((batch,), length, jnp.int32),
                                  dtype=jnp.bfloat16)
    row = {"length": length, "batch": batch, "dtype": "bfloat16", "loop_ms": {},
           "call_ms": {}}
    report["decode"].append(row)
    for name, (est, attend, patch) in methods(params, args.methods).items():
      try:
        # Each method starts from the same prefilled length.
        start = cache._replace(length=jnp.full((batch,), length, jnp.int32))
        hlo = (args.hlo_dir and name in ("spotlight", "dense_pallas") and batch == 1
               and length == args.configs[0][0] and f"{args.hlo_dir}/hlo_{name}.txt")
        loop_ms, call_ms, cache = time_method(name, est, attend, patch, start, args.steps,
                                              args.repeats, hlo)
        row["loop_ms"][name], row["call_ms"][name] = loop_ms, call_ms
      except Exception as err:  # noqa: BLE001 - one failing method must not end the run
        row["loop_ms"][name] = f"failed: {type(err).__name__}: {str(err)[:300]}"
      print(f"n={length} B={batch} {name}: {row['loop_ms'][name]}", flush=True)
      dense = [t for n, t in row["loop_ms"].items()
               if n.startswith("dense") and isinstance(t, float)]
      if dense:
        row["speedup_vs_fastest_dense"] = {n: min(dense) / t for n, t in row["loop_ms"].items()
                                           if isinstance(t, float)}
      save()
    del cache


def retrieval_rows(args, report, save):
  """Hamming scores of ``tokens x 8 KV heads x 128 bits`` (group 4) + the top 2% shared by
  the group, in a compiled loop over queries."""
  for tokens in args.retrieval_tokens:
    k_codes = jax.random.bits(jax.random.PRNGKey(4), (1, KV_HEADS, tokens, 4), jnp.uint32)
    q_codes = ps.pack_signs_reference(
        jax.random.normal(jax.random.PRNGKey(5), (args.steps, 1, KV_HEADS * GROUP, HEAD_DIM)))
    length = jnp.array([tokens], jnp.int32)
    keep = math.ceil(0.02 * tokens)
    eligible = jnp.ones((1, KV_HEADS, tokens), bool)
    score_range = (-1, GROUP * HEAD_DIM)
    spec = selection.histogram_for(score_range, 0, 0)
    scored = lambda select: lambda qc: select(  # noqa: E731
        hash_heads.hamming_scores(qc, k_codes, HEAD_DIM, length))
    counted_top = lambda s, hist: selection.top_of_residual(  # noqa: E731
        s, length, 0, 0, keep, keep, score_range, hist)[0]
    top_by = {
        "scores only": scored(lambda s: s),
        "counting": scored(lambda s: selection.top(s, eligible, keep, keep, score_range,
                                                   counting=True)[0]),
        "bisection": scored(lambda s: selection.top(s, eligible, keep, keep, counting=False)[0]),
        "lax.top_k": scored(lambda s: jax.lax.top_k(s, keep)[1]),
        # Histograms, then the threshold, the ties to keep and the ties before each block:
        # the kept set, without a list of positions.
        "kept positions": scored(lambda s: selection.top_of_residual(
            s, length, 0, 0, keep, keep, score_range)[0]),
        # The histograms counted by the scoring kernel (the decode path), each block of 1024
        # tokens in chunks of 512 (the default), 256 or 1024 (one-hot operands in shared
        # memory: 32 KB, 16 KB or 64 KB each).
        **{f"counted in chunks of {chunk}, kept positions": (
            lambda qc, chunk=chunk: counted_top(*hs.hamming_scores_kernel(
                qc, k_codes, length, HEAD_DIM, hs.BlockSizes(tokens=chunk), histogram=spec,
                cache_length=length))) for chunk in (512, 256, 1024)},
        **{f"histogram plan, chunks of {chunk}": scored(
            lambda s, chunk=chunk: jnp.concatenate([
                x.reshape(1, KV_HEADS, -1) for x in selection.counting_plan(
                    score_histogram.score_histogram_kernel(
                        s, length, -1, block_sizes=score_histogram.BlockSizes(chunk=chunk)),
                    jnp.full((1, KV_HEADS), keep, jnp.int32), -1)], axis=-1))
           for chunk in (1024, 256)},
    }
    row = {"tokens": tokens, "kv_heads": KV_HEADS, "bits": HEAD_DIM, "keep": keep, "us": {}}
    report["retrieval"].append(row)
    for name, retrieve in top_by.items():
      def body(total, qc, retrieve=retrieve):
        return total + jnp.sum(retrieve(qc)[..., :8]), None

      loop = jax.jit(lambda qs, body=body: jax.lax.scan(body, jnp.int32(0), qs)[0])
      try:
        seconds = harness.median_seconds(lambda: loop(q_codes), args.repeats)
        row["us"][name] = 1e6 * seconds / args.steps
      except Exception as err:  # noqa: BLE001
        row["us"][name] = f"failed: {type(err).__name__}: {str(err)[:300]}"
      print(f"retrieval {tokens}: {name} {row['us'][name]}", flush=True)
      save()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", metavar="PATH")
  parser.add_argument("--small", action="store_true", help="CPU smoke test at small sizes")
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--methods", default="dense_pallas_p256,spotlight,spotlight_kept,"
                      "topk_simhash,topk_simhash_kept,spotlight_noappend,dense_pallas,"
                      "dense_nn_cudnn,vattention_simhash_kept,vattention_simhash")
  parser.add_argument("--configs", default="131072x1,131072x8,524288x1",
                      help="comma-separated LENGTHxBATCH")
  parser.add_argument("--retrieval-tokens", default="131072,524288")
  parser.add_argument("--hlo-dir", help="save the compiled loops of spotlight and "
                      "dense_pallas at batch 1 here")
  args = parser.parse_args(argv)
  args.methods = args.methods.split(",")
  if args.small:
    args.configs, args.retrieval_tokens, args.steps, args.repeats = "2048x1", "4096", 2, 1
  args.configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
  args.retrieval_tokens = [int(t) for t in str(args.retrieval_tokens).split(",")]
  report = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
            "steps_per_loop": args.steps, "repeats": args.repeats, "decode": [],
            "retrieval": []}

  def save():
    if args.json:
      with open(args.json, "w") as f:
        json.dump(report, f, indent=1)

  params = sa.hash_heads.init_params(jax.random.PRNGKey(0), KV_HEADS, HEAD_DIM)
  retrieval_rows(args, report, save)
  decode_rows(args, params, report, save)
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
