r"""What vAttention's guarantee bounds and how large a sample bounds it: the maths shared by
``sa.vattention`` (the paper's uniform residual) and ``sa.vattention_importance`` (the
residual sampled by hash codes). Derivations: ``docs/vattention.md``.

With :math:`e_i = e^{s_i}` over the residual :math:`R` (:math:`n_s` tokens) and an exactly
attended part :math:`I_f`, the three guarantees bound the relative error of

* ``"denominator"``: :math:`D = \sum e_i`, with :math:`y_i = e_i` and target :math:`T = \hat D`;
* ``"numerator"``: :math:`N = \sum e_i v_i`, with :math:`y_i = e_i v_i`, :math:`T = \|\hat N\|`;
* ``"output"``: :math:`o = N / D`, by the delta method with :math:`y_i = e_i (v_i - \hat o)` and
  :math:`T = \|\hat N\|`.

A sample of ``b`` of the :math:`n_s` tokens without replacement estimates the residual total
with variance :math:`n_s^2 (1/b - 1/n_s) \sigma^2`; by the CLT (and, for the vector cases, the
chi-square bound of Szekely & Bakirov, valid for :math:`\delta \le 0.21`),
:math:`z \sqrt{\mathrm{Var}} \le \epsilon T` with :math:`z = \Phi^{-1}(1 - \delta / 2)` holds for
:math:`b = n_0 / (1 + (n_0 - 1) / n_s)`, :math:`n_0 = (z n_s \sigma / (\epsilon T))^2`
(``finite_population_size``).
"""

from __future__ import annotations

from statistics import NormalDist

import jax
import jax.numpy as jnp

from sparse_attn._src import selection
from sparse_attn.attention import gather_rows, row_scores

GUARANTEES = ("denominator", "numerator", "output")


def check_guarantee(epsilon: float, delta: float, guarantee: str) -> float:
  """Validates an ``(epsilon, delta)`` guarantee; returns :math:`z = \\Phi^{-1}(1 - \\delta/2)`."""
  if guarantee not in GUARANTEES:
    raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
  if epsilon is None or delta is None:
    raise ValueError("give epsilon and delta (the guarantee), got "
                     f"epsilon={epsilon!r}, delta={delta!r}")
  if not epsilon > 0:
    raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
  delta_max = 1.0 if guarantee == "denominator" else 0.21
  if not 0.0 < delta < delta_max:
    raise ValueError(f"delta must be in (0, {delta_max}) for guarantee={guarantee!r}, "
                     f"got {delta!r}")
  return NormalDist().inv_cdf(1.0 - delta / 2.0)


def check_sample_sizes(base_rate: float, min_base: int, max_fraction: float) -> None:
  """Validates the base sample's rate and floor and the largest sample."""
  if not isinstance(min_base, int) or min_base < 2:
    raise ValueError(f"min_base must be an int >= 2, got {min_base!r}")
  if not 0.0 < base_rate <= max_fraction <= 1.0:
    raise ValueError("need 0 < base_rate <= max_fraction <= 1, got "
                     f"base_rate={base_rate!r}, max_fraction={max_fraction!r}")


def finite_population_size(n0: jax.Array, n: jax.Array) -> jax.Array:
  r"""Sample size with the finite-population correction: :math:`n_0 / (1 + (n_0 - 1)/n)`,
  written as :math:`n / (1 + (n - 1)/n_0)` so that :math:`n_0 = \infty` gives ``n``; 0 where
  :math:`n_0 \le 0`."""
  n = n.astype(jnp.float32)
  safe = jnp.where(n0 > 0, n0, 1.0)
  return jnp.where(n0 > 0, n / (1.0 + (n - 1.0) / safe), 0.0)


def selected_scores(qg, cache, positions, all_scores, reads_all_keys: bool):
  """Exact scores at ``positions [B, Hkv, G, N]``: read from the oracle's full scores
  (``reads_all_keys``), or computed from the gathered keys when the predictor only ranked
  tokens."""
  if reads_all_keys:
    return jnp.take_along_axis(all_scores, positions, axis=-1)
  return row_scores(qg, gather_rows(cache.keys, positions))


def base_terms(base_s, base_mask, weights, values, base_pos, fixed, guarantee: str):
  """The guaranteed quantity ``y`` on the base tokens and its target size ``T``.

  Args:
    base_s: ``[B, Hkv, G, M]`` exact scores of the base tokens (``base_mask`` valid).
    weights: ``[B, Hkv, G, M]`` each base token's weight in estimates of residual totals
      (``n_s / m0`` for a uniform sample, ``1 / rho`` for a Poisson one).
    fixed: ``(out, lse)`` of the exactly attended part.

  Returns:
    ``(y [B, Hkv, G, M, dy], T [B, Hkv, G])``, ``y`` zero outside the mask, both on a
    common scale ``e_i = exp(s_i - ref)``.
  """
  out_f, lse_f = fixed
  ref = jnp.maximum(lse_f, jnp.max(jnp.where(base_mask, base_s, -jnp.inf), axis=-1))
  ref = jnp.where(jnp.isfinite(ref), ref, 0.0)  # a common scale for the e_i
  e_base = jnp.where(base_mask, jnp.exp(base_s - ref[..., None]), 0.0)
  d_fixed = jnp.exp(lse_f - ref)  # sum of e_i over the deterministic part
  d_hat = d_fixed + jnp.sum(weights * e_base, -1)
  if guarantee == "denominator":
    y = e_base[..., None]
    target = d_hat
  else:
    v_base = gather_rows(values, base_pos).astype(jnp.float32)
    x = e_base[..., None] * v_base
    n_hat = d_fixed[..., None] * out_f + jnp.sum(weights[..., None] * x, -2)
    target = jnp.linalg.norm(n_hat, axis=-1)
    if guarantee == "numerator":
      y = x
    else:
      o_hat = n_hat / jnp.where(d_hat > 0, d_hat, 1.0)[..., None]
      y = e_base[..., None] * (v_base - o_hat[..., None, :])
  return jnp.where(base_mask[..., None], y, 0.0), target


def overlap(pos_a, mask_a, pos_b, mask_b, num_tokens: int) -> jax.Array:
  """``float32 [...]``: tokens in both position lists (each without repeats)."""
  in_a = selection.positions_mask(pos_a, mask_a, num_tokens)
  return jnp.sum(mask_b & jnp.take_along_axis(in_a, pos_b, axis=-1), -1).astype(jnp.float32)
