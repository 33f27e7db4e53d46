"""Decode-step timing of a Llama-3.1-8B-shaped model: dense attention vs sparse estimators.

``python -m benchmarks.model_bench [--length 65536] [--layers 2] [--json PATH]``

The model has Llama-3.1-8B layer shapes (hidden 4096, 32 query heads, 8 KV heads, head dim
128, intermediate 14336) with random weights and ``--layers`` layers, batch 1. The KV caches
are filled with random post-RoPE keys and values directly (prefilling 64K tokens through the
model is too slow on a CPU) and each estimator's index is built with ``est.init``. Every
layer uses the method under test. Each method is compiled and warmed up first, then the
repeats are interleaved across methods; the report gives median times of

* ``step``: a whole decode step (``models.decode_step``: projections, cache write, index
  ``append``, ``attend``, MLP, LM head), and
* ``attend``: ``est.attend`` alone on every layer (what the estimator replaces),

and the ratio dense / method of each.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparse_attn as sa
from benchmarks import harness
from models.config import LlamaConfig, RopeScaling
from models.decoding import decode_step, layer_estimators, start_decode
from models.llama import Llama


def llama31_8b_config(layers: int, vocab: int, intermediate: int) -> LlamaConfig:
  """Llama-3.1-8B's layer shapes with ``layers`` layers."""
  return LlamaConfig(
      architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=4096,
      intermediate_size=intermediate, num_layers=layers, num_heads=32, num_kv_heads=8,
      head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
      rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
      max_position_embeddings=131072)


def methods(config: LlamaConfig, key: jax.Array) -> dict[str, object]:
  """The estimators compared (None is exact dense attention)."""
  keys = jax.random.split(key, config.num_layers)
  return {
      "dense": None,
      "magicpig": sa.magicpig(K=10, L=150),
      "spotlight": [sa.spotlight(sa.hash_heads.init_params(k, config.num_kv_heads,
                                                           config.head_dim), fraction=0.02)
                    for k in keys],
      "topk": sa.topk(fraction=0.02),
      "vattention": sa.vattention(epsilon=0.05, delta=0.05),
  }


def random_caches(config: LlamaConfig, length: int, capacity: int, dtype,
                  key: jax.Array) -> tuple[sa.KVCache, ...]:
  """Random post-RoPE caches, ``length`` valid tokens of ``capacity``, batch 1."""
  shape = (1, config.num_kv_heads, capacity, config.head_dim)
  caches = []
  for layer in range(config.num_layers):
    k_key, v_key = jax.random.split(jax.random.fold_in(key, layer))
    caches.append(sa.KVCache(jax.random.normal(k_key, shape, dtype),
                             jax.random.normal(v_key, shape, dtype),
                             jnp.full((1,), length, jnp.int32)))
  return tuple(caches)


def _attend_all(ests):
  @jax.jit
  def run(q, state, key):
    outs = [sa.dense_attention(q, cache).out if est is None else
            est.attend(q, cache, index, key).out
            for est, cache, index in zip(ests, state.caches, state.indices)]
    return jnp.stack(outs)
  return run


def run(length: int, layers: int, repeats: int, warmup: int, dtype: str, vocab: int,
        intermediate: int, names: list[str]) -> dict:
  """Times every method; returns the report as a dict."""
  dtype = jnp.dtype(dtype)
  config = llama31_8b_config(layers, vocab, intermediate)
  model = Llama(config, dtype=dtype, rngs=nnx.Rngs(0))
  key = jax.random.key(0)
  capacity = length + warmup + repeats + 8
  all_methods = methods(config, jax.random.fold_in(key, 1))
  token = jnp.zeros((1,), jnp.int32)
  q = jax.random.normal(jax.random.fold_in(key, 2), (1, config.num_heads, config.head_dim), dtype)
  states, attend, density = {}, {}, {}
  for name in names:  # compile and warm up
    attention = all_methods[name]
    caches = random_caches(config, length, capacity, dtype, jax.random.fold_in(key, 3))
    state = jax.block_until_ready(start_decode(caches, num_layers=layers, attention=attention,
                                               key=key))
    for _ in range(warmup):
      _, state, dens = decode_step(model, state, token, attention=attention, key=key)
    states[name] = jax.block_until_ready(state)
    attend[name] = _attend_all(layer_estimators(layers, attention, ()))
    jax.block_until_ready(attend[name](q, state, key))
    density[name] = float(np.asarray(dens).mean())
    print(f"warmed up {name}", flush=True)
  timed = {}
  for name in names:  # each method's step, then its attend alone, then the next method's
    def step(i, name=name):
      out = decode_step(model, states[name], token, attention=all_methods[name], key=key)
      states[name] = out[1]
      return out

    timed[name, "step"] = step
    timed[name, "attend"] = lambda i, name=name: attend[name](q, states[name], key)
  medians = harness.interleaved_medians(timed, repeats, warmup=0)  # warmed up above
  report = {"length": length, "layers": layers, "dtype": dtype.name, "vocab": vocab,
            "intermediate": intermediate, "repeats": repeats, "device": str(jax.devices()[0]),
            "methods": {}}
  dense_step = medians["dense", "step"] if "dense" in names else None
  dense_attend = medians["dense", "attend"] if "dense" in names else None
  for name in names:
    step, att = medians[name, "step"], medians[name, "attend"]
    report["methods"][name] = {
        "step_ms": 1e3 * step, "attend_ms": 1e3 * att, "density": density[name],
        "step_speedup": dense_step / step if dense_step else None,
        "attend_speedup": dense_attend / att if dense_attend else None}
  return report


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=65536, help="cached tokens")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--vocab", type=int, default=128256)
  parser.add_argument("--intermediate", type=int, default=14336)
  parser.add_argument("--methods", default="dense,magicpig,spotlight,topk,vattention")
  parser.add_argument("--json", help="write the report to this path")
  args = parser.parse_args(argv)
  names = args.methods.split(",")
  report = run(args.length, args.layers, args.repeats, args.warmup, args.dtype, args.vocab,
               args.intermediate, names)
  print(f"{report['layers']} layers, {report['length']} cached tokens, {report['dtype']}, "
        f"vocab {report['vocab']}, batch 1, {report['device']}, median of {args.repeats}")
  print(f"{'method':12s} {'step ms':>9s} {'x dense':>8s} {'attend ms':>10s} {'x dense':>8s} "
        f"{'density':>8s}")
  for name, r in report["methods"].items():
    step_x = f"{r['step_speedup']:.2f}" if r["step_speedup"] else "-"
    att_x = f"{r['attend_speedup']:.2f}" if r["attend_speedup"] else "-"
    print(f"{name:12s} {r['step_ms']:9.1f} {step_x:>8s} {r['attend_ms']:10.2f} {att_x:>8s} "
          f"{r['density']:8.4f}")
  if args.json:
    harness.save_json(report, args.json)


if __name__ == "__main__":
  main()
