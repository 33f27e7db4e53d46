r"""Sequence-sharded KV caches: every device holds a contiguous slice of each row's tokens.

JAX's own SPMD machinery does the work (``jax.sharding.Mesh``, ``shard_map``); there is no
runtime here. On a mesh with axis ``"seq"`` of ``n`` devices, a cache of capacity ``S`` (a
multiple of ``n``) is split into ``n`` slices of ``S / n`` tokens; device ``d`` holds global
positions ``[d S/n, (d+1) S/n)``. ``sharded(make, mesh, sinks=, local=)`` turns an estimator
into one that runs on that layout:

* The **local window** (the last ``local`` valid tokens) is attended exactly by the devices
  that hold it, reading only those rows.
* Every device runs the estimator on its own tokens that are not in the window: device 0
  with ``make(sinks)`` (the sinks are its first tokens, so its local positions are the
  global ones), the others with ``make(0)``. Its index lives on that device (built by
  ``init`` and extended by ``append`` from the local slice alone; every device uses the same
  PRNG key for ``init``, so random projections such as MagicPIG's planes are the same
  everywhere, and ``fold_in(key, d)`` for ``attend``).
* The parts are merged exactly by log-sum-exp (``sa.merge``) after an ``all_gather`` of each
  device's ``(out, lse, stats)``: ``B * Hq * (D + 1)`` floats per device, never keys.

What equals the single-device estimator, given the same keys:

* ``sa.dense()`` (to float rounding: ``1e-6``), ``sa.streaming``, and any estimator whose
  selection is a per-token rule: MagicPIG with ``center_keys=False`` (the sampled set and
  the importance weights depend on each token and the shared planes alone) and caps that
  do not bind (``max_selected`` and ``max_candidates`` are fractions of each device's
  slice). With centring, each device centres its keys by its own residual mean: a
  different, equally valid hash.
* Top-k estimators keep the top fraction *of each device's tokens*, not of all tokens: the
  union holds as many tokens, but not the global top-k.
* **vAttention**: each device runs vAttention with ``delta / n`` on its residual and the
  ``"denominator"`` guarantee. The per-device errors satisfy
  :math:`|\hat D_d - D_d| \le \epsilon D_d` each with probability :math:`1 - \delta/n`, so by
  the union bound, with probability at least :math:`1 - \delta`,
  :math:`|\hat D - D| \le \sum_d |\hat D_d - D_d| \le \epsilon \sum_d D_d \le \epsilon D`
  (the exact window only adds to :math:`D`). This is conservative: each device samples for
  its own share of the error. The ``"numerator"`` and ``"output"`` guarantees do not add up
  this way (vector errors of the devices need not be aligned, but their norms are bounded by
  each device's :math:`\|N_d\|`, whose sum can exceed :math:`\|N\|`), so ``sharded_vattention``
  refuses them rather than claim a bound it cannot keep.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_attn.attention import gather_rows, group_queries, make_result, merge, row_scores
from sparse_attn.attention import softmax_attend
from sparse_attn.streaming import check_window
from sparse_attn.types import AttentionResult, Estimator, KVCache, check_query, configured
from sparse_attn.types import within_capacity
from sparse_attn.vattention import vattention

AXIS = "seq"

try:  # jax >= 0.7 exports shard_map at the top level
  from jax import shard_map as _shard_map
except ImportError:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map as _shard_map


def shard_map(f, mesh, in_specs, out_specs):
  try:
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  except TypeError:  # pragma: no cover - jax without check_vma
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def sequence_mesh(devices: int | None = None, axis: str = AXIS) -> Mesh:
  """A 1-D mesh over the first ``devices`` devices (default: all) named ``axis``."""
  available = jax.devices()
  devices = len(available) if devices is None else devices
  if not isinstance(devices, int) or not 1 <= devices <= len(available):
    raise ValueError(f"devices must be an int in [1, {len(available)}], got {devices!r}")
  return Mesh(np.array(available[:devices]), (axis,))


def cache_spec(axis: str = AXIS, batch_axis: str | None = None,
               head_axis: str | None = None) -> KVCache:
  """Partition specs of a ``KVCache`` sharded along the sequence: keys and values
  ``[B, Hkv, S, D]`` split on ``S`` (and on ``B`` / ``Hkv`` over ``batch_axis`` /
  ``head_axis`` when given), ``length [B]`` split like ``B``."""
  rows = P(batch_axis, head_axis, axis, None)
  return KVCache(rows, rows, P(batch_axis))


def shard_cache(cache: KVCache, mesh: Mesh, axis: str = AXIS, batch_axis: str | None = None,
                head_axis: str | None = None) -> KVCache:
  """Places ``cache`` on ``mesh`` split along the sequence (``S`` a multiple of the axis),
  and along the batch and KV heads over ``batch_axis`` and ``head_axis`` when given."""
  for name, size, what in ((axis, cache.keys.shape[2], "capacity S"),
                           (batch_axis, cache.keys.shape[0], "batch B"),
                           (head_axis, cache.keys.shape[1], "KV heads Hkv")):
    if name is not None and size % mesh.shape[name]:
      raise ValueError(f"cache {what}={size} must be a multiple of the {mesh.shape[name]} "
                       f"devices of mesh axis {name!r}")
  return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), cache,
                      cache_spec(axis, batch_axis, head_axis))


def _local(cache: KVCache, axis: str, local: int):
  """Inside ``shard_map``: this device's slice as a cache of the tokens outside the global
  local window, and the slice's global offset."""
  keys, values, length = cache
  size = keys.shape[2]
  offset = jax.lax.axis_index(axis) * size
  outside = jnp.clip(length - local - offset, 0, size).astype(jnp.int32)
  return KVCache(keys, values, outside), offset


def _window(q, cache: KVCache, offset, local: int) -> AttentionResult:
  """Exact attention over the global local window's rows that this device holds."""
  keys, values, length = cache
  size = keys.shape[2]
  first = jnp.maximum(length - local, 0)[:, None]  # global start of the window
  global_pos = first + jnp.arange(local, dtype=jnp.int32)[None, :]
  held = (global_pos < length[:, None]) & (global_pos >= offset) & (global_pos < offset + size)
  positions = jnp.where(held, global_pos - offset, 0)
  num_kv = keys.shape[1]
  positions = jnp.broadcast_to(positions[:, None, :], (keys.shape[0], num_kv, local))
  scores = row_scores(group_queries(q, num_kv), gather_rows(keys, positions))
  out, lse = softmax_attend(scores, held[:, None, None, :], gather_rows(values, positions))
  count = jnp.sum(held, axis=-1).astype(jnp.float32)[:, None, None]
  result = make_result(q, out, lse, jnp.broadcast_to(count, lse.shape), cache)
  # Only the window's tokens count as valid here; each device's other tokens are counted by
  # its estimator's part.
  return result._replace(stats={"selected": result.stats["selected"],
                                "valid": result.stats["selected"]})


def _without(result: AttentionResult, rows: jax.Array) -> AttentionResult:
  """``result`` with nothing entered on ``rows`` (bool ``[B]``): ``out = 0``, ``lse = -inf``,
  every stat but ``valid`` zero (a part with no tokens, never NaN)."""
  drop = rows[:, None]
  stats = {name: (x if name == "valid" else jnp.where(drop, jnp.zeros((), x.dtype), x))
           for name, x in result.stats.items()}
  return result._replace(
      out=jnp.where(drop[..., None], jnp.zeros((), result.out.dtype), result.out),
      lse=jnp.where(drop, -jnp.inf, result.lse),
      density=jnp.where(drop, 0.0, result.density), stats=stats)


@configured
def sharded(make: Callable[[int], Estimator | None], mesh: Mesh, *, sinks: int = 4,
            local: int = 64, axis: str = AXIS, batch_axis: str | None = None,
            head_axis: str | None = None) -> Estimator:
  """An estimator over a cache sharded along the sequence on ``mesh`` (see the module doc).

  Args:
    make: ``make(sinks)`` returns the estimator a device runs on its tokens outside the
      local window, with that many sinks and no local window, e.g.
      ``lambda s: sa.magicpig(K=10, L=150, sinks=s, local=0)``; ``None`` means nothing
      beyond the exact windows; ``make(0)`` may return None when ``make(sinks)`` does not
      (StreamingLLM: ``lambda s: sa.streaming(s, 0) if s else None``).
    mesh: a mesh with axis ``axis``; the cache must be placed by ``shard_cache``.
    sinks, local: the exact window, in global positions.
    axis: the sequence axis of ``mesh``.
    batch_axis, head_axis: optional mesh axes that also split the batch rows and the KV heads
      (with their query heads): rows and heads are independent, so each device simply runs
      on its own; only the sequence parts are merged.

  Returns:
    An ``Estimator`` whose ``init`` / ``append`` / ``attend`` take the sharded cache and the
    query (split like the cache's rows and heads); the index holds one part per device
    (three new leading axes on every leaf, for ``axis``, ``batch_axis`` and ``head_axis``).
    ``attend``'s ``stats`` are the parts' ``sa.merge``: ``selected`` and ``valid`` over all
    devices (with a local window, only these two), and ``over_capacity`` (a traced global
    ``length > S``, clamped to ``S`` as in every estimator).
  """
  check_window(sinks, local)
  for name in (axis, batch_axis, head_axis):
    if name is not None and name not in mesh.shape:
      raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not {name!r}")
  first, rest = make(sinks), make(0)
  if first is None and rest is not None:
    raise ValueError("make(sinks) returned None but make(0) an estimator")
  if first is None and local == 0:
    raise ValueError("nothing to attend: make returns None and local == 0")
  if rest is None and first is not None:  # e.g. StreamingLLM: only device 0 has sinks
    rest = Estimator(first.init, first.append, lambda q, cache, index, key: _without(
        first.attend(q, cache, index, key), jnp.ones(q.shape[:1], bool)))
  specs = cache_spec(axis, batch_axis, head_axis)
  rows = P(batch_axis, head_axis)  # queries and results: [B, Hq, ...]
  parts = P(axis, batch_axis, head_axis)  # index: one part per device, on new leading axes

  def stack(index):
    return jax.tree.map(lambda x: x[None, None, None], index)

  def unstack(index):
    return jax.tree.map(lambda x: x[0, 0, 0], index)

  def on_device(fn_first, fn_rest):
    """``fn_first`` on device 0, ``fn_rest`` elsewhere (the same output structure); without
    sinks both are the same estimator and no branch is needed."""
    if sinks == 0:
      return fn_rest

    def call(*args):
      # Both, then a select. A lax.cond over the index and cache made a MagicPIG attend at
      # 16K tokens on 8 simulated CPU devices 99 ms against 28 ms without sinks (operand
      # copies); computing both and selecting, 50 ms against 40 ms (a busier machine).
      is_first = jax.lax.axis_index(axis) == 0
      return jax.tree.map(lambda a, b: jnp.where(is_first, a, b), fn_first(*args),
                          fn_rest(*args))
    return call

  # Each shard_map is built and jitted once per estimator: an eager shard_map runs its body
  # op by op and a fresh closure per call recompiled every call (a MagicPIG attend at 4K
  # tokens on 8 simulated CPU devices: 22 s per eager call, against one compile of 10 s
  # and 0.04 s per call after it, on a busy 2-core machine).
  def init_part(cache, key):
    mine, _ = _local(cache, axis, local)
    return stack(on_device(first.init, rest.init)(mine, key))

  def append_part(index, cache):
    mine, _ = _local(cache, axis, local)
    return stack(on_device(first.append, rest.append)(unstack(index), mine))

  init_parts = jax.jit(shard_map(init_part, mesh, (specs, P()), parts))
  append_parts = jax.jit(shard_map(append_part, mesh, (parts, specs), parts))

  def init(cache: KVCache, key=None):
    if first is None:
      return ()
    cache, _ = within_capacity(cache)
    return init_parts(cache, key)

  def append(index, cache: KVCache):
    if first is None:
      return index
    cache, _ = within_capacity(cache)
    return append_parts(index, cache)

  def attend_part(q, cache, index, key):
    mine, offset = _local(cache, axis, local)
    pieces = [_window(q, cache, offset, local)] if local else []
    if first is not None:
      index = unstack(index)
      device_key = None if key is None else jax.random.fold_in(key, jax.lax.axis_index(axis))
      result = on_device(first.attend, rest.attend)(q, mine, index, device_key)
      pieces.append(_without(result, mine.length == 0))
    mine_result = merge(pieces) if len(pieces) > 1 else pieces[0]
    gathered = jax.lax.all_gather(mine_result, axis)
    return merge([jax.tree.map(lambda x, i=i: x[i], gathered)
                  for i in range(mesh.shape[axis])])

  attend_parts = jax.jit(shard_map(attend_part, mesh, (rows, specs, parts, P()), rows))

  def attend(q, cache: KVCache, index, key=None) -> AttentionResult:
    check_query(q, cache)
    cache, over = within_capacity(cache)  # past the capacity: as every estimator (types)
    result = attend_parts(q, cache, index, key)
    return result._replace(stats={**result.stats, "over_capacity": jnp.broadcast_to(
        over[:, None], result.lse.shape)})

  return Estimator(init, append, attend)


@configured
def sharded_vattention(epsilon: float, delta: float, mesh: Mesh, *, sinks: int = 4,
                       local: int = 64, axis: str = AXIS, batch_axis: str | None = None,
                       head_axis: str | None = None, guarantee: str = "denominator",
                       **kwargs) -> Estimator:
  """vAttention over a sequence-sharded cache with a global ``(epsilon, delta)`` guarantee
  on the denominator: each of the ``n`` devices runs ``vattention(epsilon, delta / n)`` on
  its residual (the union bound of the module doc)."""
  if guarantee != "denominator":
    raise ValueError(f"guarantee must be 'denominator' for a sharded cache (the per-device "
                     f"bounds add up only for it), got {guarantee!r}")
  devices = mesh.shape[axis]
  return sharded(lambda s: vattention(epsilon, delta / devices, sinks=s, local=0,
                                      guarantee="denominator", **kwargs),
                 mesh, sinks=sinks, local=local, axis=axis, batch_axis=batch_axis,
                 head_axis=head_axis)
