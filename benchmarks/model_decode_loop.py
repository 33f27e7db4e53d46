"""End-to-end decode throughput of a Llama-3.1-8B-shaped model, steps in one compiled program.

  python -m benchmarks.model_decode_loop --layers 14 --batch 8 --length 131072 --json PATH
  python -m benchmarks.model_decode_loop --small          # CPU smoke test, tiny sizes

What a serving loop sees: the whole model (embedding, every layer's projections, cache
write, index ``append``, attention, MLP; final norm, LM head, greedy argmax fed back as the
next token) decoding ``--steps`` tokens per row inside one ``models.decode_loop`` (a
``lax.scan``, caches and indices carried and donated), so host dispatch is paid once per
``--steps`` tokens. Each method (dense first, then Spotlight and top-k SimHash at 2% in
every layer) starts from the same state: caches of ``--length`` random post-RoPE keys and
values filled directly (a 128K prefill through the model is not what is measured) and the
method's indices built by ``est.init``. The first call compiles (``compile_s``); the report
gives the median of ``--repeats`` calls as ms per step and tokens/s (``batch * steps /
seconds``), and each method's speedup over dense. Weights are random (timing only; the hash
heads are untrained and one head serves every layer, so that ``init`` compiles once).

"As many layers as fit": ``--layers auto`` takes the most layers whose weights, caches and
largest index fit the device's memory limit less ``--headroom-gib`` (``layers_that_fit``,
exact sizes from ``eval_shape``). The JSON (``--json``) is written after every method, so a
run cut short still reports. torch is not used.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
import sparse_attn as sa
from benchmarks import harness
from benchmarks.model_bench import llama31_8b_config
from models.config import LlamaConfig
from models.decoding import DecodeState
from models.llama import Llama

GIB = 2 ** 30
METHODS = ("dense", "spotlight", "topk_simhash")


def model_config(layers: int, args) -> LlamaConfig:
  """Llama-3.1-8B's shapes with ``layers`` layers (``--hidden`` etc. shrink it for tests)."""
  config = llama31_8b_config(layers, args.vocab, args.intermediate)
  return dataclasses.replace(config, hidden_size=args.hidden)


def estimator(name: str, config: LlamaConfig):
  """The method's estimator in every layer (None is exact dense attention)."""
  if name == "dense":
    return None
  if name == "spotlight":
    params = sa.hash_heads.init_params(jax.random.key(11), config.num_kv_heads, config.head_dim)
    return sa.spotlight(params, fraction=0.02)
  if name == "topk_simhash":
    return sa.topk(fraction=0.02, predictor=sa.predictors.simhash())
  raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


def nbytes(tree) -> int:
  """Bytes of every array (or ``ShapeDtypeStruct``) in ``tree``."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def cache_shape(config: LlamaConfig, batch: int, capacity: int, dtype) -> sa.KVCache:
  shape = jax.ShapeDtypeStruct((batch, config.num_kv_heads, capacity, config.head_dim), dtype)
  return sa.KVCache(shape, shape, jax.ShapeDtypeStruct((batch,), jnp.int32))


def sizes(config: LlamaConfig, names, batch: int, capacity: int, dtype) -> dict[str, int]:
  """Exact bytes, from shapes alone: ``weights_fixed`` (embedding, LM head, final norm),
  ``weights_per_layer``, ``cache_per_layer`` (K and V) and ``index_per_layer[name]``."""
  def weights(layers):
    shapes = nnx.eval_shape(lambda: Llama(dataclasses.replace(config, num_layers=layers),
                                          dtype=dtype, rngs=nnx.Rngs(0)))
    return nbytes(nnx.state(shapes, nnx.Param))

  one, two = weights(1), weights(2)
  cache = cache_shape(config, batch, capacity, dtype)
  index = {}
  for name in names:
    est = estimator(name, config)
    index[name] = 0 if est is None else nbytes(jax.eval_shape(est.init, cache,
                                                              jax.random.key(0)))
  return {"weights_fixed": 2 * one - two, "weights_per_layer": two - one,
          "cache_per_layer": nbytes(cache), "index_per_layer": index}


def layers_that_fit(bytes_limit: int, size: dict, headroom: int) -> int:
  """The most layers whose weights, caches and largest index fit ``bytes_limit - headroom``
  (one method's state is alive at a time; the headroom holds the step's temporaries)."""
  per_layer = (size["weights_per_layer"] + size["cache_per_layer"]
               + max(size["index_per_layer"].values(), default=0))
  return max(0, (bytes_limit - headroom - size["weights_fixed"]) // per_layer)


def build_state(config: LlamaConfig, est, batch: int, length: int, capacity: int, dtype,
                key: jax.Array) -> DecodeState:
  """Random post-RoPE caches with ``length`` valid tokens, and the method's indices, built
  one layer at a time (one layer's temporaries alive at once; each jit compiles once)."""
  shape = (batch, config.num_kv_heads, capacity, config.head_dim)
  fill = jax.jit(lambda k: jax.random.normal(k, shape, dtype))
  init = jax.jit(lambda cache, k: est.init(cache, k)) if est is not None else None
  caches, indices = [], []
  for layer in range(config.num_layers):
    k_key, v_key, i_key = jax.random.split(jax.random.fold_in(key, layer), 3)
    cache = sa.KVCache(fill(k_key), fill(v_key), jnp.full((batch,), length, jnp.int32))
    caches.append(cache)
    indices.append(() if init is None else jax.block_until_ready(init(cache, i_key)))
  return DecodeState(tuple(caches), tuple(indices))


def memory_stats() -> dict:
  """The device's memory statistics (``bytes_limit``, ``peak_bytes_in_use``; a GPU reports
  them, a CPU none)."""
  return jax.devices()[0].memory_stats() or {}


def cache_copies(hlo: str, capacity: int) -> int:
  """HLO ``copy`` instructions of arrays with the cache's sequence axis (caches, per-token
  index arrays): a donated, carried cache has none."""
  return sum(1 for line in hlo.splitlines() if " copy(" in line and f",{capacity}," in line)


def time_method(model: Llama, name: str, args, capacity: int, dtype) -> dict:
  """One method's row: compile time, median ms per step and tokens/s, memory, finiteness."""
  config = model.config
  est = estimator(name, config)
  state = build_state(config, est, args.batch, args.length, capacity, dtype, jax.random.key(1))
  row = {"cache_bytes": nbytes(state.caches), "index_bytes": nbytes(state.indices)}
  graphdef, params = nnx.split(model)

  def loop(params, state, tokens, key):
    return models.decode_loop(nnx.merge(graphdef, params), state, tokens, args.steps,
                              attention=est, key=key)

  tokens = jax.random.randint(jax.random.key(2), (args.batch,), 0, config.vocab_size, jnp.int32)
  key = jax.random.key(3)
  start = time.perf_counter()
  compiled = jax.jit(loop, donate_argnums=(1,)).lower(params, state, tokens, key).compile()
  row["compile_s"] = time.perf_counter() - start
  row["cache_copies_in_hlo"] = cache_copies(compiled.as_text(), capacity)
  times = []
  for i in range(args.warmup + args.repeats):
    start = time.perf_counter()
    out, state = compiled(params, state, tokens, jax.random.fold_in(key, i))
    jax.block_until_ready(out.logits)
    times.append(time.perf_counter() - start)
    tokens = out.tokens[:, -1]
  seconds = float(np.median(times[args.warmup:]))
  row.update(step_ms=1e3 * seconds / args.steps, tokens_per_s=args.batch * args.steps / seconds,
             loop_s=times[args.warmup:],
             density=float(jnp.mean(out.density)),
             finite=bool(jnp.all(jnp.isfinite(out.logits))),
             final_length=int(state.caches[0].length[0]))
  stats = memory_stats()
  if "peak_bytes_in_use" in stats:
    row["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
  if not row["finite"]:
    raise FloatingPointError(f"{name}: non-finite logits")
  return row


def run(args, save=lambda report: None) -> dict:
  """Times every method in ``args.methods``; ``save(report)`` after each."""
  dtype = jnp.dtype(args.dtype)
  capacity = args.length + args.steps * (args.warmup + args.repeats) + 64
  size = sizes(model_config(1, args), args.methods, args.batch, capacity, dtype)
  limit = memory_stats().get("bytes_limit")
  if args.layers == "auto":
    if limit is None:
      raise ValueError("--layers auto needs a device that reports its memory limit (a GPU)")
    layers = layers_that_fit(limit, size, int(args.headroom_gib * GIB))
  else:
    layers = int(args.layers)
  if layers < 1:
    raise ValueError(f"no layer fits: {size}, limit {limit}")
  config = model_config(layers, args)
  report = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "layers": layers,
            "layers_arg": str(args.layers), "batch": args.batch, "length": args.length,
            "capacity": capacity, "steps_per_loop": args.steps, "repeats": args.repeats,
            "dtype": dtype.name, "hidden": args.hidden, "intermediate": args.intermediate,
            "vocab": args.vocab, "bytes_limit": limit, "sizes": size,
            "layers_that_fit": (layers_that_fit(limit, size, int(args.headroom_gib * GIB))
                                if limit else None),
            "methods": {}}
  model = Llama(config, dtype=dtype, rngs=nnx.Rngs(0))
  report["weights_bytes"] = nbytes(nnx.state(model, nnx.Param))
  save(report)
  for name in args.methods:
    try:
      row = time_method(model, name, args, capacity, dtype)
    except Exception as err:  # noqa: BLE001 - one failing method must not end the run
      row = {"failed": f"{type(err).__name__}: {str(err)[:500]}"}
    report["methods"][name] = row
    dense = report["methods"].get("dense", {}).get("tokens_per_s")
    if dense and "tokens_per_s" in row:
      row["speedup_vs_dense"] = row["tokens_per_s"] / dense
    print(f"{name}: {row.get('step_ms', row.get('failed'))} ms/step, "
          f"{row.get('tokens_per_s')} tokens/s, x{row.get('speedup_vs_dense')} dense", flush=True)
    save(report)
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="14", help="an int, or 'auto' (as many as fit)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=131072, help="cached tokens at the start")
  parser.add_argument("--steps", type=int, default=32, help="decode steps per compiled call")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--hidden", type=int, default=4096)
  parser.add_argument("--intermediate", type=int, default=14336)
  parser.add_argument("--vocab", type=int, default=128256)
  parser.add_argument("--headroom-gib", type=float, default=6.0,
                      help="memory left to temporaries by --layers auto")
  parser.add_argument("--methods", default="dense,spotlight,topk_simhash")
  parser.add_argument("--small", action="store_true", help="CPU smoke test at tiny sizes")
  parser.add_argument("--json", metavar="PATH")
  if parser.parse_args(argv).small:  # tiny defaults; options given still win
    parser.set_defaults(layers="1", batch=2, length=512, steps=2, repeats=2, hidden=256,
                        intermediate=512, vocab=512)
  args = parser.parse_args(argv)
  args.methods = args.methods.split(",")
  report = run(args, lambda r: args.json and harness.save_json(r, args.json))
  print(f"{report['layers']} layers, batch {report['batch']}, {report['length']} cached tokens, "
        f"{report['dtype']}, {report['device']}, {report['steps_per_loop']} steps per call")
  return 0 if all("failed" not in r for r in report["methods"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
