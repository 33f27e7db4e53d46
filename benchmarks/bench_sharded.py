"""``python -m benchmarks bench --devices N``: the sequence-sharded decode step against one
device, and the memory each device holds.

Same shapes and step as ``bench`` (Llama-3.1-8B layer: 32 query / 8 KV heads, D = 128; every
step appends one token to the index and attends), once on one device and once with the cache
and index split along the sequence over ``N`` devices (``sparse_attn.distributed``). On a
CPU the devices are simulated (``--xla_force_host_platform_device_count``) and share the
same cores, so the ratio there measures the overhead of the sharded program, not a speedup.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp

import sparse_attn as sa
from benchmarks import harness
from sparse_attn import synthetic
from sparse_attn import distributed as dist

METHODS = ("dense", "streaming", "magicpig")


@dataclasses.dataclass(frozen=True)
class Config:
  devices: int = 8
  lengths: tuple[int, ...] = (131072,)
  batch: int = 1
  dtype: str = "float32"
  num_kv_heads: int = 8
  group: int = 4
  head_dim: int = 128
  repeats: int = 10


def pairs(mesh) -> dict[str, tuple[sa.Estimator, sa.Estimator]]:
  """(one device, sharded) for each method, with the same exact window."""
  return {
      "dense": (sa.dense(), dist.sharded(lambda s: sa.dense(), mesh, sinks=0, local=0)),
      "streaming": (sa.streaming(4, 64), dist.sharded(
          lambda s: sa.streaming(s, 0) if s else None, mesh, sinks=4, local=64)),
      "magicpig": (sa.magicpig(K=10, L=150), dist.sharded(
          lambda s: sa.magicpig(K=10, L=150, sinks=s, local=0), mesh, sinks=4, local=64)),
  }


def device_bytes(tree) -> int:
  """Bytes of ``tree``'s arrays held by the first device."""
  first = jax.devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == first:
        total += shard.data.nbytes
  return total


def run_one(cfg: Config, length: int, mesh, log) -> dict:
  steps = cfg.repeats + 1
  q, cache = synthetic.llm_like(jax.random.PRNGKey(1), batch=cfg.batch,
                                num_kv_heads=cfg.num_kv_heads, group=cfg.group,
                                capacity=length + steps * cfg.devices, head_dim=cfg.head_dim,
                                length=jnp.full((cfg.batch,), length - 1, jnp.int32),
                                dtype=jnp.dtype(cfg.dtype))
  capacity = cache.keys.shape[2]
  cache = cache._replace(keys=cache.keys[:, :, :capacity - capacity % cfg.devices],
                         values=cache.values[:, :, :capacity - capacity % cfg.devices])
  sharded_cache = dist.shard_cache(cache, mesh)
  key = jax.random.PRNGKey(2)
  steppers, memory = {}, {}
  for name, (single, sharded) in pairs(mesh).items():
    for label, est, where in ((f"{name} (1 device)", single, cache),
                              (f"{name} ({cfg.devices} devices)", sharded, sharded_cache)):
      state = {"index": jax.block_until_ready(est.init(where, key))}
      memory[label] = device_bytes((where, state["index"]))

      @functools.partial(jax.jit, donate_argnums=0)
      def decode(index, grown, est=est):
        index = est.append(index, grown)
        return est.attend(q, grown, index, key).out, index

      def step(i, decode=decode, state=state, where=where):
        grown = where._replace(length=where.length + i)
        out, state["index"] = decode(state["index"], grown)
        return out

      steppers[label] = step
  medians = harness.interleaved_medians(steppers, cfg.repeats)  # step 0 compiles
  ms = {name: 1e3 * t for name, t in medians.items()}
  log(f"  n={length}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), file=sys.stderr)
  return {"length": length, "step_ms": ms, "bytes_per_device": memory}


def run(cfg: Config = Config(), log=print) -> dict:
  if len(jax.devices()) < cfg.devices:
    raise ValueError(f"--devices {cfg.devices} needs that many devices; JAX sees "
                     f"{len(jax.devices())} (on a CPU, run it through python -m benchmarks, "
                     "which simulates them, or set XLA_FLAGS=--xla_force_host_platform_"
                     f"device_count={cfg.devices} before JAX starts)")
  mesh = dist.sequence_mesh(cfg.devices)
  rows = [run_one(cfg, length, mesh, log) for length in cfg.lengths]
  return {"config": dataclasses.asdict(cfg), "device": jax.devices()[0].device_kind,
          "rows": rows}


def format_report(report: dict) -> str:
  cfg = report["config"]
  n = cfg["devices"]
  lines = [f"decode step (append + attend), 1 device against the sequence split over {n} "
           f"devices ({report['device']}); B={cfg['batch']}, {cfg['dtype']}, median of "
           f"{cfg['repeats']} interleaved steps; memory = cache + index on the first device",
           f"{'n':>8} {'method':10} {'1 device ms':>12} {f'{n} devices ms':>13} "
           f"{'ratio':>6} {'MB (1 dev)':>11} {'MB/device':>10}"]
  for r in report["rows"]:
    for m in METHODS:
      one, many = f"{m} (1 device)", f"{m} ({n} devices)"
      lines.append(
          f"{r['length']:>8} {m:10} {r['step_ms'][one]:>12.2f} {r['step_ms'][many]:>13.2f} "
          f"{r['step_ms'][one] / r['step_ms'][many]:>5.2f}x "
          f"{r['bytes_per_device'][one] / 2**20:>11.1f} "
          f"{r['bytes_per_device'][many] / 2**20:>10.1f}")
  return "\n".join(lines)
