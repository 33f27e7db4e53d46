r"""Synthetic decode attention shaped like an LLM's, for tests and the built-in comparison.

What pretrained attention looks like, and what this generator imitates (per KV head):

* **A narrow cone of keys.** Keys share a large mean component: ``k_i = c*sqrt(D)*mu + z_i``
  with ``z_i ~ N(0, I)`` and ``c = cone`` (2 by default: about 27 degrees around ``mu``).
  This is why MagicPIG centres keys before hashing. The mean shifts every score of a query
  by the same amount; the noise gives the bulk of tokens scores of std about ``query_scale``.
* **Attention sinks.** The first ``sinks`` tokens add ``sink_strength * s`` along a direction
  ``s`` that every query of the group carries with weight 1/2: about
  ``query_scale * sink_strength / 2`` more score (8 by default at ``query_scale = 1``).
* **A heavy-tailed minority of "needles".** A fraction ``needle_fraction`` of the other tokens
  add ``needle_strength * t_i * u`` along the group's query direction ``u``, ``t_i`` Pareto
  with shape 3 (``t >= 1``): a few very relevant tokens, many mildly relevant, about
  ``query_scale * needle_strength * t_i`` more score.
* **Queries** ``q = query_scale * sqrt(D) * (u + s/2 + z/sqrt(D))`` per query head (the heads
  of a group share ``u``, each with its own noise ``z``). ``query_scale`` is the attention
  temperature knob: 0.25 is nearly flat, 1 is moderately peaked, 4 is dominated by the
  sinks and the strongest needles.
* **Values** ``v_i = nu + z_i``, a shared mean ``nu`` of norm ``sqrt(D)/2`` plus noise, so that
  ``||o||`` stays away from 0 and relative errors mean something on flat heads too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_attn.types import KVCache


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def llm_like(key: jax.Array, *, batch: int = 1, num_kv_heads: int = 2, group: int = 4,
             capacity: int = 4096, head_dim: int = 64, length=None, query_scale=1.0,
             sinks: int = 4, sink_strength: float = 16.0, needle_fraction: float = 0.02,
             needle_strength: float = 1.5, cone: float = 2.0, num_queries: int | None = None,
             dtype=jnp.float32) -> tuple[jax.Array, KVCache]:
  """Draws decode queries and a KV cache.

  Args:
    key: PRNG key.
    batch, num_kv_heads, group, capacity, head_dim: shapes ``B, Hkv, G, S, D``.
    length: ``int32 [B]`` valid lengths (default: ``capacity`` for every row).
    query_scale: scalar or ``[B, Hkv*G]`` array; multiplies every query.
    sinks, sink_strength, needle_fraction, needle_strength, cone: see the module docstring.
    num_queries: if given, ``q`` is ``[B, Hq, num_queries, D]``: that many queries per head
      (each with its own noise), e.g. to train hash heads on the same cache.
    dtype: dtype of ``q``, keys and values.

  Returns:
    ``(q [B, Hkv*G, D], KVCache)`` (``q [B, Hkv*G, num_queries, D]`` with ``num_queries``).
  """
  D = head_dim
  root = jnp.sqrt(jnp.float32(D))
  ks = jax.random.split(key, 9)
  lead = (batch, num_kv_heads)
  mu = _unit(jax.random.normal(ks[0], lead + (D,)))
  sink_dir = _unit(jax.random.normal(ks[1], lead + (D,)))
  u = _unit(jax.random.normal(ks[2], lead + (D,)))
  keys = cone * root * mu[:, :, None, :] + jax.random.normal(ks[3], lead + (capacity, D))
  is_sink = (jnp.arange(capacity) < sinks)[None, None, :, None]
  keys = keys + jnp.where(is_sink, sink_strength * sink_dir[:, :, None, :], 0.0)
  is_needle = jax.random.bernoulli(ks[4], needle_fraction, lead + (capacity, 1)) & ~is_sink
  t = jax.random.pareto(ks[5], 3.0, lead + (capacity, 1))
  keys = keys + jnp.where(is_needle, needle_strength * t * u[:, :, None, :], 0.0)
  nu = 0.5 * root * _unit(jax.random.normal(ks[6], lead + (D,)))
  values = nu[:, :, None, :] + jax.random.normal(ks[7], lead + (capacity, D))
  direction = u + 0.5 * sink_dir
  extra = () if num_queries is None else (num_queries,)
  noise = jax.random.normal(ks[8], lead + (group,) + extra + (D,)) / root
  direction = direction.reshape(lead + (1,) * (1 + len(extra)) + (D,))
  q = (root * (direction + noise)).reshape((batch, num_kv_heads * group) + extra + (D,))
  scale = jnp.asarray(query_scale, jnp.float32)
  scale = scale.reshape(scale.shape + (1,) * (q.ndim - scale.ndim)) if scale.ndim else scale
  q = q * scale
  if length is None:
    length = jnp.full((batch,), capacity, jnp.int32)
  cache = KVCache(keys.astype(dtype), values.astype(dtype), jnp.asarray(length, jnp.int32))
  return q.astype(dtype), cache


def hidden_structure(key: jax.Array, *, batch: int = 1, num_kv_heads: int = 2, group: int = 2,
                     length: int = 512, head_dim: int = 64, rank: int = 8,
                     nuisance: float = 3.0, num_queries: int | None = None,
                     structure_key: jax.Array | None = None,
                     dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  r"""Queries and keys whose ranking lives in a hidden low-dimensional subspace.

  Per KV head, a random orthonormal split of ``R^D`` into a ``rank``-dimensional signal
  subspace ``U`` and its complement ``V``: queries ``q = U a`` and keys
  ``k = U b + nuisance * V c`` with ``a, b, c`` standard normal, so ``q . k = a . b`` ignores
  ``V`` while the keys' angles (and their signs) are dominated by it. The untrained
  (identity) hash ranks keys poorly; a hash that learns to project out ``V`` ranks them well.
  Training data for Spotlight before real models' queries and keys are captured.

  Args:
    key: draws the samples (and the subspaces, unless ``structure_key`` is given: pass the
      same ``structure_key`` to draw training and held-out data of one structure).

  Returns:
    ``(q [B, Hq, Tq, D], k [B, Hkv, T, D])`` with ``Tq = num_queries or length`` (causal
    training pairs ``q`` and ``k`` position by position when ``Tq = T``).
  """
  kb, ka, kc, kq = jax.random.split(key, 4)
  kb = kb if structure_key is None else structure_key
  basis = jnp.linalg.qr(jax.random.normal(kb, (num_kv_heads, head_dim, head_dim)))[0]
  signal, rest = basis[..., :rank], basis[..., rank:]
  num_q = num_queries or length
  a = jax.random.normal(ka, (batch, num_kv_heads, group * num_q, rank))
  b = jax.random.normal(kc, (batch, num_kv_heads, length, rank))
  c = jax.random.normal(kq, (batch, num_kv_heads, length, head_dim - rank))
  q = jnp.einsum("hdr,bhnr->bhnd", signal, a)
  k = jnp.einsum("hdr,bhnr->bhnd", signal, b) + nuisance * jnp.einsum("hde,bhne->bhnd", rest, c)
  q = q.reshape(batch, num_kv_heads * group, num_q, head_dim)
  return q.astype(dtype), k.astype(dtype)
