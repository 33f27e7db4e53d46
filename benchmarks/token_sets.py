"""Which tokens entered an estimate, against the oracle's top tokens (IoU and recall).

``entered`` reads a method's token set off its output: the values are replaced by one-hot
position codes (``D`` positions per probe), so a token entered exactly when its code shows in
the output. ``oracle_top`` is the ``ceil(0.02 n)`` tokens of highest exact score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa
from benchmarks import methods

ORACLE_FRACTION = methods.ORACLE_FRACTION
PROBES_PER_CALL = 16  # one-hot probes evaluated together (memory: 16 attends' temporaries)


@jax.jit
def oracle_top(q, cache: sa.KVCache):
  """``bool [B, Hq, S]``: the ``ceil(0.02 n)`` valid tokens of highest exact score."""
  keys, _, length = cache
  group = q.shape[1] // keys.shape[1]
  scores = jnp.einsum("bhd,bhsd->bhs", q, jnp.repeat(keys, group, axis=1),
                      precision=jax.lax.Precision.HIGHEST)
  valid = jnp.arange(keys.shape[2])[None, None, :] < length[:, None, None]
  scores = jnp.where(valid, scores, -jnp.inf)
  k = jnp.ceil(ORACLE_FRACTION * length.astype(jnp.float32)).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)
  return rank < k[:, None, None]


@functools.partial(jax.jit, static_argnums=0)
def entered(est: sa.Estimator, q, cache: sa.KVCache, index, key) -> jax.Array:
  """``bool [B, Hq, S]``: the tokens that entered ``est``'s estimate, by one-hot value
  probes (``D`` positions per probe)."""
  batch, num_kv, capacity, dim = cache.keys.shape
  probes = -(-capacity // dim)
  position = jnp.arange(capacity)

  def one(p):
    code = (position[:, None] - dim * p == jnp.arange(dim)[None, :])  # [S, D]
    values = jnp.broadcast_to(code.astype(cache.values.dtype), cache.values.shape)
    return est.attend(q, cache._replace(values=values), index, key).out

  # [P, B, Hq, D]: probe p, slot d is position p * D + d; PROBES_PER_CALL probes vmapped at
  # a time (all of them at once would hold P attends' temporaries: gigabytes at 16K tokens).
  outs = jax.lax.map(one, jnp.arange(probes), batch_size=PROBES_PER_CALL)
  seen = jnp.moveaxis(outs, 0, 2).reshape(batch, q.shape[1], probes * dim)[..., :capacity]
  return seen > 0


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  inter = np.logical_and(a, b).sum(-1)
  union = np.logical_or(a, b).sum(-1)
  return inter / np.maximum(union, 1)


def recall(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The fraction of ``b`` (the oracle's tokens) in ``a``: unlike IoU, not capped by the
  size of ``a`` (an exact window of 20 tokens plus the top 2% caps IoU near 0.5)."""
  return np.logical_and(a, b).sum(-1) / np.maximum(b.sum(-1), 1)
