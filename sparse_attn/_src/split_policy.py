r"""The split policy of vAttention's importance-sampling residual: per query head, how many
tokens go to the exact top part and how the rest is sampled (the candidates of
``sparse_attn._src.importance``), chosen on the base sample.

The thresholds put an estimated ``TOP_FRACTIONS`` of the residual in the top part (0: none).

**Budget.** The variance of the residual estimate is
:math:`n_r^2 (1/b - 1/n_r) \sigma_r^2` (uniform) or :math:`\sum_{R_t} \frac{1 - \pi_i}{\pi_i}
\|y_i\|^2` (Poisson; the trace for vector :math:`y`), with :math:`y_i` = :math:`e_i`,
:math:`e_i v_i` or :math:`e_i (v_i - \hat o)` for the ``denominator``, ``numerator`` and
``output`` guarantees as in ``sparse_attn._src.budget``, and both are estimated from the base
sample. Each estimate is raised by ``UCB`` (3) of its own standard errors: the estimate of a
heavy-tailed variance from a few hundred draws is itself very uncertain, and picking the
cheapest of many candidates favours those whose variance was underestimated. The CLT then
turns :math:`z \sqrt{\operatorname{Var}} \le \epsilon T` into the guarantee, with the
chi-square bound for the vector cases (``sparse_attn._src.budget``). For the ``output``
guarantee the delta method also needs :math:`\hat D \approx D`, so the denominator's bound
:math:`z \sqrt{\operatorname{Var} \hat D} \le \epsilon \hat D` is required as well (without
it a head whose base saw one dominant token could sample nothing else and miss it).
:math:`\operatorname{Var}` falls as ``b`` or :math:`c` grows; ``b`` has a closed form
(``budget.finite_population_size``, at least ``min_base``) and :math:`c` comes from a
bisection on :math:`\log c`.

**Top-only (``unbiased=False``, ``density`` only).** One more candidate: the ``density``
budget's worth of largest (sharpened) proxies, attended exactly, and no residual sample. Its
error is a bias, scored by the squared norm of the dropped residual's Horvitz-Thompson
total, scaled for the ``output`` quantity by :math:`(\hat D / \hat D_{kept})^2` (dropping a
total ``Y`` moves the output by :math:`Y / D_{kept}`); the candidate of least score wins, and
the estimate is then biased. The squared norm overestimates the bias^2 by the total's
variance on average, and is kept so: the variances it competes with carry ``UCB`` standard
errors (with the variance subtracted the top part won heads where it was worse;
``docs/importance.md``).

**Split policy.** With ``(epsilon, delta)``: per query head, the candidate with the fewest
expected tokens (top part + sample) that meets the bound(s); when even that exceeds
``max_fraction * n_s``, the budget is clipped there (``stats["budget_clipped"]``, no guarantee
claimed) and the candidate with the least variance at that size is taken. With ``density``:
the size is fixed (``density * n`` tokens in all, the exact window included) and the
candidate with the least estimated variance of the first quantity is taken; a top part that
alone exceeds the size rules its candidate out.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparse_attn._src import selection
from sparse_attn._src.budget import finite_population_size
from sparse_attn._src.importance import defended, proposal_weight

TOP_FRACTIONS = (0.0, 0.005, 0.01, 0.02, 0.04)
UCB = 3.0  # standard errors added to every variance estimate (module docstring)
_BISECTIONS = 14  # log c to within ~0.6% (its range is under ~100 nats)


class Policy(NamedTuple):
  """The chosen candidate per query head (each ``[B, Hkv, G]``).

  Attributes:
    threshold: proxies at or above it are certain (the top part); ``inf``: none.
    tau, mean_a, log_c: the Poisson proposal (``inclusion``); unused for a uniform head.
    uniform: the rest is a fixed-size uniform sample without replacement (else Poisson).
    size: the uniform sample's size ``b`` (uniform heads).
    rest: residual tokens below the threshold, ``n_r`` (uniform weight ``n_r / b``).
    clipped: the size was capped below what the guarantee needs.
  """

  threshold: jax.Array
  tau: jax.Array
  mean_a: jax.Array
  log_c: jax.Array
  uniform: jax.Array
  size: jax.Array
  rest: jax.Array
  clipped: jax.Array


def thresholds(p_base: jax.Array, weights: jax.Array, n_s: jax.Array) -> jax.Array:
  """``[..., J]``: per ``TOP_FRACTIONS`` entry ``f``, the proxy above which an estimated
  ``f n_s`` residual tokens lie (a weighted quantile of the base; ``inf``: no top part)."""
  neg, sorted_w = jax.lax.sort((-jnp.where(weights > 0, p_base, -jnp.inf), weights),
                               num_keys=1)  # by p, descending
  ranked = -neg
  covered = jnp.cumsum(sorted_w, -1)
  out = []
  for f in TOP_FRACTIONS:
    goal = f * n_s.astype(jnp.float32)
    i = jnp.minimum(jnp.sum(covered < goal[..., None], -1), p_base.shape[-1] - 1)
    value = jnp.take_along_axis(ranked, i[..., None], -1)[..., 0]
    out.append(jnp.where((goal > 0) & jnp.isfinite(value), value, jnp.inf))
  return jnp.stack(out, axis=-1)


def upper(terms: jax.Array, weights: jax.Array, rho: jax.Array) -> jax.Array:
  """An upper confidence bound on the residual total of ``terms [..., M]`` from a Poisson
  base with inclusion probabilities ``rho`` (``weights = 1/rho``, 0 off the sample): the
  Horvitz-Thompson total plus ``UCB`` estimated standard errors."""
  total = jnp.sum(weights * terms, -1)
  var = jnp.sum((1.0 - rho) * (weights * terms)**2, -1)
  return total + UCB * jnp.sqrt(var)


class Proxies(NamedTuple):
  """Every token's proxy and the proposals built from them.

  Attributes:
    p, residual: ``[L..., S]`` proxies and residual mask of every token.
    p_max: ``[L...]`` the largest proxy over the residual.
    weights_by_tau: from ``importance.tempered``, for every positive temperature.
    temperatures: static tuple; ``0`` is the fixed-size uniform candidate, the others
      Poisson proposals.
    mix: the proposals' defensive uniform share.
  """

  p: jax.Array
  residual: jax.Array
  p_max: jax.Array
  weights_by_tau: dict
  temperatures: tuple
  mix: float


class BaseSample(NamedTuple):
  """The base sample the policy is chosen on.

  Attributes:
    positions, rho, mask: ``[L..., M]`` positions, inclusion probabilities and mask of the
      base tokens.
    ys: a sequence of ``[L..., M, dy]`` quantities on them (zero outside the mask) whose
      residual totals must be estimated: the guaranteed one first (the only one in
      ``density`` mode).
  """

  positions: jax.Array
  rho: jax.Array
  mask: jax.Array
  ys: list


def choose(proxies: Proxies, base: BaseSample, *, target_vars=None, size=None, cap=None,
           min_uniform: int = 2, unbiased: bool = True, d_hat=None) -> Policy:
  """The split policy (module docstring) on the base sample.

  Args:
    proxies: the tokens' proxies and proposals.
    base: the base sample and the quantities on it.
    target_vars: per ``ys`` entry ``[L...]``, the variance bound of its estimate
      (``(epsilon, delta)`` mode: every bound must hold), or None.
    size: ``[L...]`` the expected residual tokens to read (``density`` mode), or None.
    cap: ``[L...]`` the largest size in ``(epsilon, delta)`` mode.
    min_uniform: the smallest uniform sample in ``(epsilon, delta)`` mode (the CLT needs a
      few draws), as vAttention's ``min_base``.
    unbiased: False (``density`` mode only) adds the *top-only* candidate: the ``size``
      tokens of largest proxy, no residual sample, scored by the squared norm of the dropped
      residual's estimated total (its bias).
    d_hat: ``[L...]`` the estimated denominator, given for the ``output`` quantity (then
      ``ys[1]`` is the denominator's): dropping a residual total ``Y`` moves the output by
      ``Y / D_kept``, not ``Y / D``, so its score is scaled by ``(D / D_kept)^2``.
  """
  p, residual, p_max, weights_by_tau, temperatures, mix = proxies
  base_pos, rho, base_mask, ys = base
  weights = jnp.where(base_mask, 1.0 / jnp.where(base_mask, rho, 1.0), 0.0)
  n_s = jnp.sum(residual, -1)
  p_base = jnp.take_along_axis(p, base_pos, axis=-1)
  thr = thresholds(p_base, weights, n_s)  # [L, J]
  # Exact residual counts at or above each threshold (one fused pass over p).
  k = jnp.sum(residual[..., None, :] & (p[..., None, :] >= thr[..., None]), -1).astype(
      jnp.float32)
  n_r = n_s.astype(jnp.float32)[..., None] - k
  top = base_mask[..., None, :] & (p_base[..., None, :] >= thr[..., None])  # [L, J, M]
  rest_w = jnp.where(top, 0.0, weights[..., None, :])  # [L, J, M]
  y2s = [jnp.sum(y**2, -1) for y in ys]  # [L, M] each

  # Fixed-size uniform sample of b from the n_r tokens below the threshold:
  # Var = n_r^2 (1/b - 1/n_r) sigma_r^2, sigma_r^2 from the HT totals of y and ||y||^2.
  def spread(y, y2):
    total_y = jnp.einsum("...jm,...md->...jd", rest_w, y)
    total_y2 = upper(y2[..., None, :], rest_w, rho[..., None, :])
    return jnp.maximum(total_y2 - jnp.sum(total_y**2, -1) / jnp.maximum(n_r, 1.0), 0.0) / (
        jnp.maximum(n_r - 1.0, 1.0))

  sigma2s = [spread(y, y2) for y, y2 in zip(ys, y2s)]

  def uniform_var(b, sigma2):
    return jnp.where(b >= n_r, 0.0, n_r**2 * (1.0 / jnp.maximum(b, 1.0) - 1.0 / jnp.maximum(
        n_r, 1.0)) * sigma2)

  # Poisson candidates [L, J, T, M] (T: the non-zero temperatures; with none, a
  # placeholder that is never chosen).
  poisson = tuple(t for t in temperatures if t > 0)
  taus = jnp.asarray(poisson or (1.0,), jnp.float32)
  mean_a = jnp.stack([weights_by_tau[t][1] for t in poisson] or [jnp.ones_like(p_max)], -1)
  mask = base_mask[..., None, None, :]
  a = proposal_weight(p_base[..., None, None, :], taus.reshape((1,) * n_s.ndim + (1, -1, 1)),
                      p_max[..., None, None, None])
  a = jnp.where(mask, defended(a, mean_a[..., None, :], mix), 1.0)  # [L, 1, T, M]
  w_p, rho_p = rest_w[..., :, None, :], rho[..., None, None, :]
  rest_p = w_p > 0
  shape = thr.shape + taus.shape  # [L, J, T]

  def estimates(log_c):  # ([variance per ys entry], expected cost), each [L, J, T]
    pi = jnp.where(rest_p, jnp.minimum(1.0, jnp.exp(log_c)[..., None] * a), 1.0)
    odds = (1.0 - pi) / pi
    var = [upper(odds * y2[..., None, None, :], w_p, rho_p) for y2 in y2s]
    cost = k[..., None] + jnp.sum(w_p * pi, -1)
    return var, cost

  # log c from "the top part and under one more token" to "every base token certain".
  hi0 = jnp.broadcast_to(-jnp.log(jnp.min(a, axis=-1)), shape)
  lo0 = jnp.broadcast_to(-jnp.log(jnp.max(a, axis=-1)) - jnp.log(jnp.maximum(
      n_s.astype(jnp.float32), 1.0))[..., None, None] - 1.0, shape)

  def bisect(go_up):  # go_up(var, cost): is the wanted log c above this one?
    def body(_, bounds):
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      up = go_up(*estimates(mid))
      return jnp.where(up, mid, lo), jnp.where(up, hi, mid)
    return jax.lax.fori_loop(0, _BISECTIONS, body, (lo0, hi0))

  def at_size(limit):  # [L]: both kinds of candidate at an expected size <= limit
    b = jnp.floor(limit[..., None] - k)  # [L, J]
    var_u = jnp.where(b >= jnp.minimum(1.0, n_r), uniform_var(b, sigma2s[0]), jnp.inf)
    log_c, _ = bisect(lambda var, cost: cost <= limit[..., None, None])
    var_p, cost_p = estimates(log_c)
    var_p = jnp.where(cost_p <= limit[..., None, None] + 1.0, var_p[0], jnp.inf)
    return (jnp.clip(b, 0.0, n_r), var_u), (log_c, var_p)

  # The top-only candidate [L, 1] (threshold, size): only with unbiased=False.
  score_d, thr_d, k_d = (jnp.full(n_s.shape + (1,), jnp.inf), jnp.full(n_s.shape, jnp.inf),
                         jnp.zeros(n_s.shape))
  if size is not None:  # density: the least variance at that size
    (b, score_u), (log_c, score_p) = at_size(size)
    clipped = jnp.zeros(n_s.shape, bool)
    if not unbiased:
      score_d, thr_d, k_d = top_only_candidate(p, residual, p_base, weights, ys, size, d_hat)
  else:  # (epsilon, delta): the fewest tokens that meet every bound
    b = jnp.minimum(float(min_uniform), n_r)
    for sigma2, target in zip(sigma2s, target_vars):
      n0 = jnp.where(target[..., None] > 0, n_r**2 * sigma2 / jnp.where(
          target > 0, target, 1.0)[..., None], jnp.inf)
      need = finite_population_size(n0, n_r)
      b = jnp.maximum(b, jnp.minimum(jnp.ceil(need), n_r))
    _, log_c = bisect(lambda var, cost: functools.reduce(jnp.logical_or, [
        v > t[..., None, None] for v, t in zip(var, target_vars)]))
    _, cost_p = estimates(log_c)
    cost_u = k + b
    clipped = jnp.minimum(jnp.min(cost_u, -1), jnp.min(cost_p, (-2, -1))) > cap
    # The capped solution, only computed when some head needs it.
    (b_cap, var_u_cap), (log_c_cap, var_p_cap) = jax.lax.cond(
        jnp.any(clipped), lambda: at_size(cap), lambda: (
            (b, jnp.full_like(b, jnp.inf)), (log_c, jnp.full_like(log_c, jnp.inf))))
    b = jnp.where(clipped[..., None], b_cap, b)
    log_c = jnp.where(clipped[..., None, None], log_c_cap, log_c)
    score_u = jnp.where(clipped[..., None], var_u_cap, cost_u)
    score_p = jnp.where(clipped[..., None, None], var_p_cap, cost_p)

  # The best candidate: [J uniform, top-only, J * T Poisson] flattened.
  if not poisson:
    score_p = jnp.full_like(score_p, jnp.inf)
  scores = jnp.concatenate([score_u, score_d, score_p.reshape(score_p.shape[:-2] + (-1,))], -1)
  pick = jnp.argmin(scores, -1)
  num_j = thr.shape[-1]
  top_only = pick == num_j  # a uniform head with b = 0
  uniform = pick <= num_j
  j = jnp.where(uniform, jnp.minimum(pick, num_j - 1), (pick - num_j - 1) // taus.shape[0])
  t = jnp.where(uniform, 0, (pick - num_j - 1) % taus.shape[0])

  def pick_j(x):  # x [L, J] at j
    return jnp.take_along_axis(x, j[..., None], -1)[..., 0]

  log_c = jnp.take_along_axis(log_c, j[..., None, None], -2)[..., 0, :]
  return Policy(threshold=jnp.where(top_only, thr_d, pick_j(thr)), tau=taus[t],
                mean_a=jnp.take_along_axis(mean_a, t[..., None], -1)[..., 0],
                log_c=jnp.take_along_axis(log_c, t[..., None], -1)[..., 0], uniform=uniform,
                size=jnp.where(top_only, 0.0, pick_j(b)),
                rest=jnp.where(top_only, n_s.astype(jnp.float32) - k_d, pick_j(n_r)),
                clipped=clipped)


def top_only_candidate(p, residual, p_base, weights, ys, size, d_hat):
  """The top-only candidate (module docstring): ``(score [L, 1], threshold [L], size [L])``,
  the ``size`` largest proxies, scored by the squared dropped total (an upper estimate of
  the bias^2 of dropping the rest)."""
  thr = selection.kth_largest(p, residual, size.astype(jnp.int32))
  k = jnp.sum(residual & (p >= thr[..., None]), -1).astype(jnp.float32)
  drop_w = jnp.where(p_base >= thr[..., None], 0.0, weights)  # [L, M]
  # The squared norm of the HT total: the bias^2 plus its variance (module docstring).
  score = jnp.sum(jnp.einsum("...m,...md->...d", drop_w, ys[0])**2, -1)
  if d_hat is not None:
    kept = d_hat - jnp.sum(drop_w * ys[1][..., 0], -1)
    score *= (d_hat / jnp.maximum(kept, 1e-6 * d_hat))**2
  return jnp.where(k <= size, score, jnp.inf)[..., None], thr, k
