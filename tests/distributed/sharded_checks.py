"""Run by test_sequence_sharding.py in its own process: 8 simulated CPU devices.

``XLA_FLAGS`` must be set before the backend starts, so this file is a script; it prints
one JSON object of measured numbers, which the test checks.
"""

import json
import math
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# The rest of the suite's settings (tests/conftest.py), in this process too.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

import models  # noqa: E402
import sparse_attn as sa  # noqa: E402
from sparse_attn import distributed as dist  # noqa: E402
from sparse_attn import synthetic  # noqa: E402

DEVICES = 8
CAPACITY = 4096
LENGTHS = (4000, 1500)  # the second row leaves devices 3-7 empty


def problem(scale=0.7):
  q, cache = synthetic.llm_like(jax.random.PRNGKey(0), batch=2, num_kv_heads=2, group=2,
                                capacity=CAPACITY, head_dim=32,
                                length=jnp.array(LENGTHS, jnp.int32))
  return (q.astype(jnp.float32) * scale).astype(q.dtype), cache


def relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def compare(single, sharded, q, cache, mesh, key, grow=0):
  """Both estimators from the same keys, optionally after ``grow`` appended tokens."""
  shard_cache = dist.shard_cache(cache, mesh)
  a_index, b_index = single.init(cache, key), sharded.init(shard_cache, key)
  if grow:
    cache = cache._replace(length=cache.length + grow)
    shard_cache = dist.shard_cache(cache, mesh)
    a_index, b_index = single.append(a_index, cache), sharded.append(b_index, shard_cache)
  a = single.attend(q, cache, a_index, key)
  b = sharded.attend(q, shard_cache, b_index, key)
  return {"out": relative(b.out, a.out), "lse": float(jnp.max(jnp.abs(a.lse - b.lse))),
          "density": float(jnp.max(jnp.abs(a.density - b.density))),
          "finite": bool(jnp.isfinite(b.out).all())}


def main() -> None:
  assert len(jax.devices()) == DEVICES, jax.devices()
  mesh = dist.sequence_mesh(DEVICES)
  key = jax.random.PRNGKey(1)
  q, cache = problem()
  report = {}
  exact = np.asarray(sa.dense_attention(q, cache).out, np.float64)
  for local in (0, 64):
    single = sa.dense()
    sharded = dist.sharded(lambda s: sa.dense(), mesh, sinks=0, local=local)
    report[f"dense local={local}"] = compare(single, sharded, q, cache, mesh, key)
  # Against float64 numpy: the sharded error is the single-device one's size.
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, cache.keys, cache.values))
  want = np.zeros_like(exact)
  for b, n in enumerate(LENGTHS):
    for h in range(4):
      s = kn[b, h // 2, :n] @ qn[b, h] / math.sqrt(32)
      w = np.exp(s - s.max())
      want[b, h] = w @ vn[b, h // 2, :n] / w.sum()
  sharded = dist.sharded(lambda s: sa.dense(), mesh, sinks=0, local=64)
  got = sharded.attend(q, dist.shard_cache(cache, mesh), sharded.init(cache, key), key).out
  report["dense vs float64"] = {"single": relative(exact, want), "sharded": relative(got, want)}
  report["streaming"] = compare(
      sa.streaming(4, 64), dist.sharded(lambda s: sa.streaming(s, 0) if s else None, mesh,
                                        sinks=4, local=64), q, cache, mesh, key)
  # Caps off (every bucket entry and every sampled token fits): they are fractions of each
  # device's slice, so a cap that binds would drop different tokens on 1 and 8 devices.
  caps = dict(center_keys=False, max_selected=1.0, max_candidates=40.0)
  magicpig = sa.magicpig(K=8, L=40, sinks=4, local=64, **caps)
  sharded_pig = dist.sharded(lambda s: sa.magicpig(K=8, L=40, sinks=s, local=0, **caps), mesh,
                             sinks=4, local=64)
  report["magicpig"] = compare(magicpig, sharded_pig, q, cache, mesh, key)
  report["magicpig after append"] = compare(magicpig, sharded_pig, q, cache, mesh, key,
                                            grow=40)
  # Top-k keeps the top fraction of each device's tokens: same density, not the same set.
  topk = compare(sa.topk(fraction=0.02), dist.sharded(
      lambda s: sa.topk(fraction=0.02, sinks=s, local=0), mesh, sinks=4, local=64),
      q, cache, mesh, key)
  report["topk"] = topk
  report["others"] = others(q, cache, mesh, key)
  report["2-D meshes"] = two_d(q, cache, key)
  report["edges"] = edges(q, cache, mesh, key)
  report["vattention coverage"] = coverage(mesh)
  report["generate"] = generate(mesh)
  print(json.dumps(report))


def others(q, cache, mesh, key) -> dict:
  """The remaining estimators run sharded: finite output, density in (0, 1]."""
  params = sa.hash_heads.init_params(jax.random.PRNGKey(5), 2, 32)
  makes = {"uniform": lambda s: sa.uniform(0.05, sinks=s, local=0),
           "spotlight": lambda s: sa.spotlight(params, sinks=s, local=0),
           "topp": lambda s: sa.topp(0.9),
           "vattention output": None}
  out = {}
  placed = dist.shard_cache(cache, mesh)
  for name, make in makes.items():
    if make is None:
      try:
        dist.sharded_vattention(0.1, 0.1, mesh, guarantee="output")
        out[name] = {"refused": False}
      except ValueError:
        out[name] = {"refused": True}
      continue
    est = dist.sharded(make, mesh, sinks=4 if name != "topp" else 0,
                       local=64 if name != "topp" else 0)
    res = est.attend(q, placed, est.init(placed, key), key)
    density = np.asarray(res.density)
    out[name] = {"finite": bool(jnp.isfinite(res.out).all()),
                 "density_min": float(density.min()), "density_max": float(density.max())}
  return out


def edges(q, cache, mesh, key) -> dict:
  """An empty row (length 0) and a row past the capacity (under jit), sharded: out 0, lse
  -inf, density 0 and nothing NaN on the empty row, eagerly and under jit; the row past the
  capacity flagged and equal to the one at the capacity."""
  caps = dict(center_keys=False, max_selected=1.0, max_candidates=40.0)
  makes = {"dense": (lambda s: sa.dense(), 0),
           "magicpig": (lambda s: sa.magicpig(K=8, L=40, sinks=s, local=0, **caps), 4),
           "vattention": (lambda s: sa.vattention(0.1, 0.1, sinks=s, local=0), 4)}
  empty = cache._replace(length=jnp.array([CAPACITY, 0], jnp.int32))
  over = cache._replace(length=jnp.array([CAPACITY + 9, 0], jnp.int32))
  out = {}
  for name, (make, sinks) in makes.items():
    est = dist.sharded(make, mesh, sinks=sinks, local=64)
    placed = dist.shard_cache(empty, mesh)
    index = est.init(placed, key)
    for mode, attend in (("eager", est.attend), ("jit", jax.jit(est.attend))):
      res = attend(q, placed, index, key)
      row = {"out": np.asarray(res.out[1], np.float32), "lse": np.asarray(res.lse[1]),
             "density": np.asarray(res.density[1])}
      nan = any(bool(jnp.isnan(jnp.asarray(x, jnp.float32)).any())
                for x in [res.out, res.lse, res.density, *res.stats.values()])
      out[f"{name} empty {mode}"] = {
          "ok": bool((row["out"] == 0).all() and (row["lse"] == -np.inf).all()
                     and (row["density"] == 0).all()) and not nan}
    res = jax.jit(est.attend)(q, dist.shard_cache(over, mesh), index, key)
    at_capacity = jax.jit(est.attend)(q, placed, index, key)
    out[f"{name} over capacity"] = {
        "flag": np.asarray(res.stats["over_capacity"][:, 0]).tolist(),
        "out": relative(res.out[0], at_capacity.out[0])}
    if name != "vattention":  # draws nothing: the key is optional, as on one device
      out[f"{name} no key"] = {"out": relative(est.attend(q, placed, est.init(placed, None if
                                                 name == "dense" else key)).out[0],
                                               at_capacity.out[0])}
  return out


def two_d(q, cache, key) -> dict:
  """Rows or KV heads split over 2 devices and the sequence over 4: the same results."""
  from jax.sharding import Mesh
  caps = dict(center_keys=False, max_selected=1.0, max_candidates=40.0)
  out = {}
  for other in ("batch", "heads"):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), (other, "seq"))
    axes = dict(batch_axis="batch") if other == "batch" else dict(head_axis="heads")
    for name, single, make, window in (
        ("dense", sa.dense(), lambda s: sa.dense(), dict(sinks=0, local=64)),
        ("magicpig", sa.magicpig(K=8, L=40, sinks=4, local=64, **caps),
         lambda s: sa.magicpig(K=8, L=40, sinks=s, local=0, **caps), dict(sinks=4, local=64))):
      est = dist.sharded(make, mesh, **window, **axes)
      placed = dist.shard_cache(cache, mesh, **axes)
      a = single.attend(q, cache, single.init(cache, key), key)
      b = est.attend(q, placed, est.init(placed, key), key)
      out[f"{name} {other}"] = {"out": relative(b.out, a.out),
                                "density": float(jnp.max(jnp.abs(a.density - b.density)))}
  return out


def generate(mesh) -> dict:
  """models.generate with the caches split over the mesh against one device: the same
  greedy tokens (random-weight Llama fixture, 2 layers, 40-token prompts, 6 new tokens)."""
  from models import checkpoint
  from tests.models import fixtures
  model, config = checkpoint.load_hf(fixtures.folder("llama3"))
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40)).astype(np.int32)
  key = jax.random.key(0)
  caps = dict(center_keys=False, max_selected=1.0, max_candidates=40.0)  # caps off
  out = {}
  for name, single, sharded in (
      ("dense", None, dist.sharded(lambda s: sa.dense(), mesh, sinks=0, local=0)),
      ("magicpig", sa.magicpig(K=8, L=40, sinks=2, local=4, **caps),
       dist.sharded(lambda s: sa.magicpig(K=8, L=40, sinks=s, local=0, **caps), mesh,
                    sinks=2, local=4))):
    a = models.generate(model, ids, 6, attention=single, key=key, prompt_lengths=[40, 33],
                        capacity=48)
    b = models.generate(model, ids, 6, attention=sharded, key=key, prompt_lengths=[40, 33],
                        mesh=mesh)
    out[name] = {"same_tokens": bool(np.array_equal(a.tokens, b.tokens)),
                 "density": float(np.max(np.abs(np.asarray(a.density) -
                                                np.asarray(b.density))))}
  return out


def coverage(mesh, epsilon=0.1, delta=0.1, trials=200):
  """Failure rate of the sharded denominator guarantee over ``trials`` keys per head."""
  q, cache = problem(scale=0.5)
  shard_cache = dist.shard_cache(cache, mesh)
  est = dist.sharded_vattention(epsilon, delta, mesh, sinks=4, local=64)
  index = est.init(shard_cache, jax.random.PRNGKey(2))
  exact = sa.dense_attention(q, cache).lse
  attend = jax.jit(lambda k: est.attend(q, shard_cache, index, k))
  fails, density = [], []
  for k in jax.random.split(jax.random.PRNGKey(3), trials):
    res = attend(k)
    ratio = np.exp(np.asarray(res.lse, np.float64) - np.asarray(exact, np.float64))
    fails.append(np.abs(ratio - 1) > epsilon)
    density.append(np.asarray(res.density))
  fails = np.stack(fails)
  single = sa.vattention(epsilon, delta, sinks=4, local=64, guarantee="denominator")
  single_density = single.attend(q, cache, single.init(cache, None), jax.random.PRNGKey(4))
  return {"rate": float(fails.mean()), "draws": int(fails.size),
          "worst_head": float(fails.mean(0).max()), "density": float(np.mean(density)),
          "single_device_density": float(jnp.mean(single_density.density)), "delta": delta}


if __name__ == "__main__":
  sys.exit(main())
