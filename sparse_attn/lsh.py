r"""SimHash locality-sensitive hashing: random planes, packed table codes, probabilities.

``L`` tables of ``K`` bits each. Bit ``b = (x . w > 0)`` for a Gaussian plane ``w``; table
``l`` uses bits ``[l*K, (l+1)*K)``, bit ``i`` weighted ``2**i``, one uint32 per table.

For two vectors at angle :math:`\theta` the chance that one random plane separates them is
:math:`\theta/\pi`, so one table collides with probability

.. math:: p = (1 - \theta/\pi)^K, \qquad \theta = \arccos(\mathrm{clip}(\cos, -1, 1)),

and, the ``L`` tables being independent, a key is retrieved (at least ``m`` tables collide)
with probability :math:`w = P(\mathrm{Binomial}(L, p) \ge m)`, for ``m = 2``:
:math:`w = 1 - (1-p)^L - L p (1-p)^{L-1}`. ``w`` is MagicPIG's inclusion probability.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def check_table_shape(K: int, L: int, min_collisions: int = 1) -> None:
  """Raises ``ValueError`` unless ``1 <= K <= 32``, ``L >= 1`` and ``1 <= m <= L``."""
  for name, value in (("K", K), ("L", L), ("min_collisions", min_collisions)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise ValueError(f"{name} must be a Python int, got {value!r}")
  if not 1 <= K <= 32:
    raise ValueError(f"K (bits per table) must be in [1, 32] (one uint32 per table), got {K}")
  if L < 1:
    raise ValueError(f"L (number of tables) must be >= 1, got {L}")
  if not 1 <= min_collisions <= L:
    raise ValueError(f"min_collisions must be in [1, L={L}], got {min_collisions}")


def planes(key: jax.Array, head_dim: int, K: int, L: int,
           num_heads: int | None = None) -> jax.Array:
  """Gaussian hyperplanes ``W ~ N(0, I)``.

  Returns:
    ``float32 [D, K*L]``, or ``[num_heads, D, K*L]`` when ``num_heads`` is given.
  """
  check_table_shape(K, L)
  shape = (head_dim, K * L) if num_heads is None else (num_heads, head_dim, K * L)
  return jax.random.normal(key, shape, jnp.float32)


def simhash(x: jax.Array, w: jax.Array, K: int, L: int) -> jax.Array:
  """SimHash codes, one uint32 per table.

  Args:
    x: ``[..., D]`` vectors (any float dtype; projected in float32).
    w: ``float32 [D, K*L]`` planes.

  Returns:
    ``uint32 [..., L]``: bit ``i`` of table ``l`` is ``x . w[:, l*K + i] > 0``.
  """
  proj = jnp.einsum("...d,dn->...n", x.astype(jnp.float32), w,
                    precision=jax.lax.Precision.HIGHEST)
  bits = (proj > 0).reshape(proj.shape[:-1] + (L, K)).astype(jnp.uint32)
  shifts = jnp.arange(K, dtype=jnp.uint32).reshape((1,) * (bits.ndim - 1) + (K,))
  return jnp.sum(jnp.left_shift(bits, shifts), axis=-1, dtype=jnp.uint32)


def table_collision_probability(cos: jax.Array, K: int) -> jax.Array:
  r"""Probability that one K-bit table collides: :math:`(1 - \theta/\pi)^K`, float32."""
  cos = jnp.clip(jnp.asarray(cos, jnp.float32), -1.0, 1.0)
  theta = jnp.arccos(cos)
  return jnp.exp(K * jnp.log1p(-theta / jnp.pi))


def inclusion_probability(p: jax.Array, L: int, min_collisions: int = 2) -> jax.Array:
  r"""``P(Binomial(L, p) >= m)`` for a per-table probability ``p``, accurate in float32.

  Two sums of binomial terms, chosen per element:
  where the mean ``L p`` is at most ``m`` the upper tail ``sum_{j=m}^{m+63}`` (no
  cancellation, so small ``w`` keep their relative accuracy: they become importance weights
  ``1/w``), otherwise the complement ``1 - sum_{j<m}`` (``w`` is then >= about 1/2).
  """
  check_table_shape(1, L, min_collisions)
  p = jnp.clip(jnp.asarray(p, jnp.float32), 0.0, 1.0)
  m = min_collisions
  log_p = jnp.log(jnp.maximum(p, 1e-38))
  log_q = jnp.log1p(-jnp.minimum(p, 1.0 - 1e-7))

  def log_term(j):  # log of C(L, j) p^j q^(L-j), with an exact (float64) log coefficient
    log_comb = math.lgamma(L + 1) - math.lgamma(j + 1) - math.lgamma(L - j + 1)
    return np.float32(log_comb) + j * log_p + (L - j) * log_q

  # Upper tail by the term ratio t_{j+1} / t_j = (L - j) / (j + 1) * p / q: one exp per
  # element instead of one per term (64 terms; the ratios are positive, so no cancellation).
  odds = jnp.exp(log_p - log_q)
  term = jnp.exp(log_term(m))
  upper = term
  for j in range(m, min(L, m + 63)):
    term = term * (np.float32((L - j) / (j + 1)) * odds)
    upper = upper + term
  lower = 1.0 - sum(jnp.exp(log_term(j)) for j in range(m))
  w = jnp.where(L * p <= m, upper, lower)
  w = jnp.where(p <= 0.0, 0.0, jnp.where(p >= 1.0, 1.0, w))
  return jnp.clip(w, 0.0, 1.0)


def collision_probability(cos: jax.Array, K: int, L: int, min_collisions: int = 2) -> jax.Array:
  r"""MagicPIG's inclusion probability of a key at cosine ``cos`` with the query.

  :math:`w = P(\mathrm{Binomial}(L, (1-\theta/\pi)^K) \ge m)`; e.g. ``K=10, L=150, m=2``:
  ``w(0) = 0.00968``, ``w(0.5) = 0.73555``.

  Args:
    cos: cosine similarities, any shape (clipped to [-1, 1], so bf16 rounding cannot NaN).
    K: bits per table. L: number of tables. min_collisions: tables that must collide.

  Returns:
    float32 array of ``cos``'s shape.
  """
  check_table_shape(K, L, min_collisions)
  return inclusion_probability(table_collision_probability(cos, K), L, min_collisions)


@dataclasses.dataclass(frozen=True)
class LogInclusion:
  """``log w`` of a listed key from its score (a ``ScoreWeights`` function, traced inside
  the attention kernel): the exact centred cosine ``q.(k - k_bar) / (|q| |k - k_bar|)``
  from ``q.(k - k_bar) = sqrt(D) s - q.k_bar``, with ``|k - k_bar|`` stored at hashing
  time, then ``collision_probability``; plus the second stage's log-probability (0 when
  the list holds every qualified token)."""

  K: int
  L: int
  min_collisions: int
  head_dim: int = 0

  def __call__(self, s, key_norm, q_norm, q_mean, log_second_stage):
    norms = q_norm * key_norm
    dots = s * math.sqrt(self.head_dim) - q_mean
    cos = jnp.where(norms > 0, dots / jnp.where(norms > 0, norms, 1.0), 0.0)
    w = collision_probability(cos, self.K, self.L, self.min_collisions)
    return jnp.log(jnp.maximum(w, 1e-30)) + log_second_stage
