r"""Spotlight's learned hash: a small residual MLP per KV head, sign bits, popcount scores.

Per layer and KV head, on a post-RoPE query or key ``x`` (dimension ``D``)::

  y1 = silu(x W1 + b1) + x,   y = y1 W2 + b2 + y1          (layers = 2)

with weights drawn from ``N(0, 0.001**2)``, so the hash starts as (almost) the identity: the
untrained hash is the plain sign of ``x``, a linear hash with ``D`` bits. The code is
``sign(y)``: bit ``j`` of word ``w`` is ``y[32 w + j] > 0`` (so ``sign(0)`` counts as
negative), ``ceil(D / 32)`` uint32 words. Hamming similarity (matching bits) equals
``(D + s_a . s_b) / 2`` for the sign vectors ``s = where(y > 0, 1, -1)``; for GQA, a KV head's
score of a token is the sum over its group's queries.

Training relaxes ``sign`` to the softsign ``h = gamma y / (1 + |gamma y|)`` and ranks keys by
``h_q . h_k`` with a Bradley-Terry loss (``bradley_terry_loss``; ``sparse_attn.train`` fits).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import hamming_scores as pallas_hamming
from pallas_kernels import pack_signs as pallas_pack_signs
from sparse_attn.attention import HIGHEST

INIT_STD = 0.001


def init_params(key: jax.Array, num_kv_heads: int, head_dim: int, layers: int = 2) -> dict:
  """Hash-head parameters for one attention layer.

  Returns:
    ``{"w": float32 [Hkv, layers, D, D], "b": float32 [Hkv, layers, D]}``, all
    ``N(0, 0.001**2)``.
  """
  for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                      ("layers", layers)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  kw, kb = jax.random.split(key)
  return {"w": INIT_STD * jax.random.normal(kw, (num_kv_heads, layers, head_dim, head_dim)),
          "b": INIT_STD * jax.random.normal(kb, (num_kv_heads, layers, head_dim))}


def check_params(params: dict, num_kv_heads: int | None = None,
                 head_dim: int | None = None) -> None:
  """Raises ``ValueError`` unless ``params`` has the shapes ``init_params`` makes."""
  if not isinstance(params, dict) or set(params) != {"w", "b"}:
    raise ValueError("hash params must be a dict with keys 'w' and 'b' (see init_params)")
  w, b = params["w"], params["b"]
  if w.ndim != 4 or w.shape[2] != w.shape[3] or b.shape != w.shape[:3]:
    raise ValueError(f"hash params must be w [Hkv, layers, D, D] and b [Hkv, layers, D], got "
                     f"w {tuple(w.shape)} and b {tuple(b.shape)}")
  if num_kv_heads is not None and w.shape[0] != num_kv_heads:
    raise ValueError(f"hash params are for {w.shape[0]} KV heads, the cache has {num_kv_heads}")
  if head_dim is not None and w.shape[2] != head_dim:
    raise ValueError(f"hash params are for head dim {w.shape[2]}, the cache has {head_dim}")


def forward(params: dict, x: jax.Array) -> jax.Array:
  """The residual MLP, per KV head.

  Args:
    params: from ``init_params``.
    x: ``[B, Hkv, N, D]`` (queries of a group or keys), any float dtype.

  Returns:
    ``float32 [B, Hkv, N, D]``, the pre-sign outputs ``y``.
  """
  h = x.astype(jnp.float32)
  layers = params["w"].shape[1]
  for i in range(layers):
    z = jnp.einsum("bhnd,hde->bhne", h, params["w"][:, i], precision=HIGHEST)
    z = z + params["b"][None, :, None, i, :]
    h = (jax.nn.silu(z) if i < layers - 1 else z) + h
  return h


def pack_signs(y: jax.Array) -> jax.Array:
  """``[..., D]`` -> ``uint32 [..., ceil(D/32)]``: bit ``j`` of word ``w`` is ``y[32w+j] > 0``.

  The Pallas kernel where verified (``pallas_kernels.backend``), else its jnp twin.
  """
  return pallas_pack_signs.pack_signs(y)


def hash(params: dict, x: jax.Array) -> jax.Array:  # noqa: A001 (the paper's word)
  """Packed codes ``uint32 [B, Hkv, N, ceil(D/32)]`` of ``x [B, Hkv, N, D]``."""
  return pack_signs(forward(params, x))


def hamming_similarity(q_codes: jax.Array, k_codes: jax.Array, bits: int) -> jax.Array:
  """Matching bits of packed codes: ``q_codes [..., G, W]`` against ``k_codes [..., S, W]``.

  ``bits`` is the number of valid bits (``<= 32 W``; padding bits are 0 in both codes).

  Returns:
    ``int32 [..., G, S]``: ``bits - popcount(q ^ k)`` summed over words.
  """
  diff = jnp.bitwise_xor(q_codes[..., :, None, :], k_codes[..., None, :, :])
  return bits - jnp.sum(jax.lax.population_count(diff), axis=-1, dtype=jnp.int32)


def hamming_scores(q_codes: jax.Array, k_codes: jax.Array, head_dim: int,
                   length: jax.Array | None = None) -> jax.Array:
  """Matching bits between each key and the queries of its GQA group, summed over the group.

  Args:
    q_codes: ``uint32 [B, Hq, W]``.
    k_codes: ``uint32 [B, Hkv, S, W]``.
    head_dim: ``D``, the number of valid bits.
    length: ``int32 [B]``; tokens at or past it score -1 (default: all ``S`` valid).

  Returns:
    ``int32 [B, Hkv, S]``: ``sum_g (D - popcount(q_g ^ k))``. The Pallas kernel where
    verified (``pallas_kernels.backend``), else its jnp twin.
  """
  if length is None:
    length = jnp.full((k_codes.shape[0],), k_codes.shape[2], jnp.int32)
  return pallas_hamming.hamming_scores(q_codes, k_codes, length, head_dim)


def softsign(y: jax.Array, gamma: float) -> jax.Array:
  """The training relaxation of ``sign``: ``gamma y / (1 + |gamma y|)``."""
  return gamma * y / (1.0 + jnp.abs(gamma * y))


def bradley_terry_loss(params: dict, q: jax.Array, k: jax.Array, key: jax.Array,
                       top_fraction: float = 0.02, max_top: int = 1024, max_other: int = 1024,
                       max_queries: int = 1024, beta: float = 1.0, margin: float = 0.0,
                       gamma: float = 64.0, causal: bool = True,
                       return_misordered: bool = False):
  r"""Bradley-Terry ranking loss of the relaxed hash on one layer's queries and keys.

  For each sampled query position ``t`` (causal: keys ``0..t``), the true ranking is by
  ``q_t . k_j``; the top set is the best ``ceil(top_fraction (t+1))`` keys, the others the
  rest. With relaxed scores ``r_j = h(q_t) . h(k_j)``,

  .. math:: \mathcal L = \operatorname{mean}_{(i, j) \in \text{top} \times \text{other}}
            \operatorname{softplus}\big(-(\beta (r_i - r_j) - \text{margin})\big).

  Sampling: up to ``max_queries`` positions per sequence (uniform without replacement among
  those with at least ``1/top_fraction`` causal keys), all top keys up to ``max_top``, and
  ``max_other`` other keys drawn uniformly (with replacement) among the causal non-top ones.

  Args:
    params: hash-head parameters.
    q: ``[B, Hq, T, D]`` post-RoPE queries of one layer; ``k``: ``[B, Hkv, T, D]`` keys.
      With ``causal=False`` (decode queries against a whole cache) ``q`` is
      ``[B, Hq, Tq, D]`` and every query sees all ``T`` keys.
    key: PRNG key for the subsampling.
    return_misordered: also return the fraction of pairs with ``r_i <= r_j``.

  Returns:
    The scalar loss (and the misordered fraction).
  """
  batch, num_q, q_len, head_dim = q.shape
  num_kv, length = k.shape[1], k.shape[2]
  if k.shape != (batch, num_kv, length, head_dim) or num_q % num_kv:
    raise ValueError(f"q must be [B, Hq, T, D] and k [B, Hkv, T, D] with Hq % Hkv == 0, got "
                     f"q {tuple(q.shape)} and k {tuple(k.shape)}")
  if causal and q_len != length:
    raise ValueError(f"causal training needs one query per key position: q has {q_len} "
                     f"positions, k has {length}")
  group = num_q // num_kv
  n_top = min(max_top, max(1, math.ceil(top_fraction * length)))
  first = min(length - 1, max(0, math.ceil(1 / top_fraction) - 1)) if causal else 0
  n_queries = min(max_queries, q_len - first)
  kq, ko = jax.random.split(key)
  # Query positions: a random subset of [first, Tq).
  u = jax.random.uniform(kq, (batch, num_q, q_len))
  eligible = jnp.arange(q_len) >= first
  _, pos = jax.lax.top_k(jnp.where(eligible[None, None, :], u, -1.0), n_queries)
  qs = jnp.take_along_axis(q.astype(jnp.float32), pos[..., None], axis=2)  # [B, Hq, Q, D]
  kk = jnp.repeat(k.astype(jnp.float32), group, axis=1)  # [B, Hq, T, D]
  true = jnp.einsum("bhqd,bhtd->bhqt", qs, kk, precision=HIGHEST)
  last = pos if causal else jnp.full_like(pos, length - 1)  # the last visible key
  true = jnp.where(jnp.arange(length)[None, None, None, :] <= last[..., None], true, -jnp.inf)
  top_vals, top_idx = jax.lax.top_k(true, n_top)
  count = jnp.ceil(top_fraction * (last + 1).astype(jnp.float32)).astype(jnp.int32)
  top_ok = jnp.arange(n_top)[None, None, None, :] < jnp.minimum(count, n_top)[..., None]
  threshold = jnp.take_along_axis(top_vals, jnp.minimum(count, n_top)[..., None] - 1, axis=-1)
  # Others: uniform over the causal keys [0, t], rejecting the top set.
  draws = jax.random.uniform(ko, pos.shape + (max_other,))
  other_idx = jnp.floor(draws * (last + 1)[..., None].astype(jnp.float32)).astype(jnp.int32)
  other_idx = jnp.minimum(other_idx, last[..., None])
  other_ok = jnp.take_along_axis(true, other_idx, axis=-1) < threshold
  # Relaxed codes: the hash of a query head is its KV head's.
  hq = softsign(forward(params, qs.reshape(batch, num_kv, group * n_queries, head_dim)), gamma)
  hk = softsign(forward(params, k), gamma)  # [B, Hkv, T, D]
  hq = hq.reshape(batch, num_q, n_queries, head_dim)
  relaxed = jnp.einsum("bhqd,bhtd->bhqt", hq, jnp.repeat(hk, group, axis=1), precision=HIGHEST)
  r_top = jnp.take_along_axis(relaxed, top_idx, axis=-1)
  r_other = jnp.take_along_axis(relaxed, other_idx, axis=-1)

  @jax.checkpoint  # the [Q, top, other] pair tensor of one head is recomputed, not stored
  def head_terms(args):
    r_t, r_o, ok_t, ok_o = args
    diff = beta * (r_t[..., :, None] - r_o[..., None, :]) - margin
    ok = ok_t[..., :, None] & ok_o[..., None, :]
    return (jnp.sum(jnp.where(ok, jax.nn.softplus(-diff), 0.0)),
            jnp.sum(ok & (diff <= 0)), jnp.sum(ok))

  flat = lambda x: x.reshape((batch * num_q,) + x.shape[2:])  # noqa: E731
  loss_sum, bad, pairs = jax.lax.map(
      head_terms, (flat(r_top), flat(r_other), flat(top_ok), flat(other_ok)))
  pairs = jnp.maximum(jnp.sum(pairs), 1).astype(jnp.float32)
  loss = jnp.sum(loss_sum) / pairs
  if not return_misordered:
    return loss
  return loss, jnp.sum(bad).astype(jnp.float32) / pairs


class HashHead(nnx.Module):
  """The same hash heads as an NNX module, for users who keep parameters in NNX.

  ``HashHead(num_kv_heads, head_dim, rngs=nnx.Rngs(0))``; ``module(x)`` gives the pre-sign
  outputs, ``module.hash(x)`` the packed codes, ``module.params()`` the pure-function pytree.
  """

  def __init__(self, num_kv_heads: int, head_dim: int, layers: int = 2, *, rngs: nnx.Rngs):
    params = init_params(rngs.params(), num_kv_heads, head_dim, layers)
    self.w = nnx.Param(params["w"])
    self.b = nnx.Param(params["b"])

  def params(self) -> dict:
    return {"w": self.w[...], "b": self.b[...]}

  def __call__(self, x: jax.Array) -> jax.Array:
    return forward(self.params(), x)

  def hash(self, x: jax.Array) -> jax.Array:
    return pack_signs(self(x))
