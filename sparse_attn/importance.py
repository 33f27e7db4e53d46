r"""vAttention's importance-sampling residual: sampling shaped by hash codes.

``sa.vattention(..., proposal="simhash" | "spotlight")`` (and every proposal with
``density=``) replaces vAttention's fixed top-k plus uniform residual by a per-head choice
among candidates. Each residual token ``i`` (valid, outside the sinks and the local window)
has a *proxy* :math:`p_i` of its score :math:`s_i = q \cdot k_i / \sqrt D`, computed from the
predictor's codes and one stored key norm (``score_proxy``): the fraction :math:`h_i` of
matching code bits estimates the angle :math:`\theta_i = \pi (1 - h_i)` between the query and
the hashed key, so :math:`p_i = (\|q\| \|k_i - \mu\| \cos\theta_i + q \cdot \mu) / \sqrt D`, where
SimHash hashes keys centred on :math:`\mu` (Spotlight: :math:`\mu = 0`). The shift
:math:`q \cdot \mu` does not change a proposal (a per-query constant) but puts the proxies on
the scale of the exact scores they are ranked against once the base has read some. Per token and KV
head that is the code (16 bytes for 128 SimHash bits or Spotlight's ``D = 128`` bits) plus a
bfloat16 norm (2 bytes): 18 bytes, against ``4 D = 512`` for an f32 key. Nothing reads every
key.

**Candidates.** A threshold :math:`t` (tokens with :math:`p_i \ge t` form the *top part*,
attended exactly with weight 1) and a sampler for the rest :math:`R_t` (:math:`n_r` tokens):

* *uniform* (temperature 0): ``b`` tokens drawn uniformly without replacement from
  :math:`R_t`, weight :math:`n_r / b` (the estimate of ``sparse_attn.vattention``);
* *Poisson* (temperature :math:`\tau > 0`): token ``i`` enters independently with probability
  :math:`\pi_i = \min(1, c\,(a_i + \lambda \bar a))`, :math:`a_i = e^{\tau (p_i - \max p)}`,
  weight :math:`1/\pi_i` (Horvitz-Thompson). :math:`\lambda` (``mix``) is a defensive uniform
  share (:math:`\bar a` the mean of :math:`a` over the residual): no probability falls below
  :math:`c \lambda \bar a`, so a token the codes misjudge cannot blow up the variance.

The thresholds put an estimated ``TOP_FRACTIONS`` of the residual in the top part (0: none);
the temperatures are ``TEMPERATURES``.

**Unbiasedness.** The final draw uses fresh uniforms, independent of the base sample that
chose the candidate and its size; given those, both samplers give :math:`E \hat Y =
\sum_R y_i` for every :math:`y` (every :math:`\pi_i > 0`), so the numerator and the
denominator are unbiased (the output is their ratio).

**Base sample.** ``m0`` tokens (``base_rate`` of the residual, at least ``min_base``) drawn by
Poisson sampling with probabilities :math:`\rho_i` from a pilot proposal
(``BASE_TEMPERATURE``, ``base_sample``), read exactly. Residual totals of any per-token
quantity ``f`` are estimated as :math:`\sum_{\text{base}} f_i / \rho_i` (unbiased), with the
estimated variance :math:`\sum (1 - \rho_i) f_i^2 / \rho_i^2`. The pilot proposal puts more
base tokens where the codes expect large scores: a uniform base of a heavy-tailed head
usually misses the few tokens that dominate the variance, and its variance estimate is then
far too small (the failure of the uniform residual with the SimHash predictor).

**Budget.** The variance of the residual estimate is
:math:`n_r^2 (1/b - 1/n_r) \sigma_r^2` (uniform) or :math:`\sum_{R_t} \frac{1 - \pi_i}{\pi_i}
\|y_i\|^2` (Poisson; the trace for vector :math:`y`), with :math:`y_i` = :math:`e_i`,
:math:`e_i v_i` or :math:`e_i (v_i - \hat o)` for the ``denominator``, ``numerator`` and
``output`` guarantees as in ``sparse_attn.vattention``, and both are estimated from the base
sample. Each estimate is raised by ``UCB`` (3) of its own standard errors: the estimate of a
heavy-tailed variance from a few hundred draws is itself very uncertain, and picking the
cheapest of many candidates favours those whose variance was underestimated. The CLT then
turns :math:`z \sqrt{\operatorname{Var}} \le \epsilon T` into the guarantee, with the
chi-square bound for the vector cases (``sparse_attn.vattention``). For the ``output``
guarantee the delta method also needs :math:`\hat D \approx D`, so the denominator's bound
:math:`z \sqrt{\operatorname{Var} \hat D} \le \epsilon \hat D` is required as well (without
it a head whose base saw one dominant token could sample nothing else and miss it).
:math:`\operatorname{Var}` falls as ``b`` or :math:`c` grows; ``b`` has a closed form (as in
``vattention``, at least ``min_base``) and :math:`c` comes from a bisection on :math:`\log c`.

**Exact scores of the base (SimHash).** The base reads its tokens' keys, so their proxies are
replaced by their exact scores (``sharpened``) before the policy: the top part and the
proposals then rank them exactly. The final draw stays unbiased whatever the base changed (it
only fixes the design that the fresh uniforms then draw from). The SimHash proxy estimates
the score itself; Spotlight's learned codes give an angle that is not on the scores' scale
(mixing the two made the base tokens outrank every other token on the synthetic heads:
error 0.62 against 0.12 at 2%), so its proxies are left as they are. Under
``(epsilon, delta)`` only the tokens the base drew with probability 1 are replaced: each of
the others also stands for residual tokens the base did not read, whose proxies the variance
estimates must keep. ``density`` claims no bound and replaces them all.

**Top-only (``unbiased=False``, ``density`` only).** One more candidate: the ``density``
budget's worth of largest (sharpened) proxies, attended exactly, and no residual sample. Its
error is a bias, estimated by the squared norm of the dropped residual's Horvitz-Thompson
total less that total's estimated variance, scaled for the ``output`` quantity by
:math:`(\hat D / \hat D_{kept})^2` (dropping a total ``Y`` moves the output by
:math:`Y / D_{kept}`); the candidate of least estimated squared error wins. On heads whose top
tokens carry the output this is oracle top-k without reading every key; the estimate is then
biased.

**Split policy.** With ``(epsilon, delta)``: per query head, the candidate with the fewest
expected tokens (top part + sample) that meets the bound(s); when even that exceeds
``max_fraction * n_s``, the budget is clipped there (``stats["budget_clipped"]``, no guarantee
claimed) and the candidate with the least variance at that size is taken. With ``density``:
the size is fixed (``density * n`` tokens in all, the exact window included) and the
candidate with the least estimated variance of the first quantity is taken; a top part that
alone exceeds the size rules its candidate out. The base only estimates a Poisson head's
expected size: the draw (``residual_estimate``) lowers :math:`c` until the exact expected
size over every residual token is within the limit (under ``(epsilon, delta)`` that is
flagged as a clip), so the static sample list does not overflow.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparse_attn import selection
from sparse_attn.attention import attend_rows

PROPOSALS = ("uniform", "simhash", "spotlight")
TOP_FRACTIONS = (0.0, 0.005, 0.01, 0.02, 0.04)
TEMPERATURES = (0.0, 0.5, 1.0)
BASE_TEMPERATURE = 0.5  # the pilot proposal that draws the base sample
UCB = 3.0  # standard errors added to every variance estimate (module docstring)
_BISECTIONS = 14  # log c to within ~0.6% (its range is under ~100 nats)


def score_proxy(qg: jax.Array, state, similarity: jax.Array, bits: int) -> jax.Array:
  """Estimated scores ``p [B, Hkv, G, S]`` from code similarities.

  Args:
    qg: ``float32 [B, Hkv, G, D]`` queries.
    state: a predictor state with ``norms [B, Hkv, S]`` (built with ``norms=True``).
    similarity: ``int [B, Hkv, G, S]`` matching bits (summed over the group for Spotlight;
      ``bits`` counts them all); negative for tokens not hashed yet, which get ``p = 0``.
    bits: the largest similarity.
  """
  frac = similarity.astype(jnp.float32) / bits
  cos = jnp.where(similarity >= 0, jnp.cos(math.pi * (1.0 - frac)), 0.0)
  q_norm = jnp.linalg.norm(qg, axis=-1, keepdims=True)
  p = q_norm * state.norms[:, :, None, :].astype(jnp.float32) * cos
  if hasattr(state, "key_mean"):  # SimHash hashed k - mu: add q . mu back
    p = p + jnp.einsum("bhgd,bhd->bhg", qg, state.key_mean)[..., None]
  return p / math.sqrt(qg.shape[-1])


def sharpened(p, positions, certain, exact):
  """The proxies ``p [..., S]`` with the exact scores ``exact [..., M]`` put in at the base
  positions ``positions [..., M]`` where ``certain`` (tokens the base drew with probability 1:
  they stand for themselves only, so the policy's Horvitz-Thompson estimates stay valid)."""
  lead, size = p.shape[:-1], p.shape[-1]
  idx = jnp.where(certain, positions, size).reshape(-1, positions.shape[-1])  # size: dropped
  flat = jax.vmap(lambda row, i, v: row.at[i].set(v, mode="drop"))(
      p.reshape(-1, size), idx, exact.astype(p.dtype).reshape(idx.shape))
  return flat.reshape(lead + (size,))


def proposal_weight(p, tau, p_max):
  r""":math:`a = e^{\tau (p - p_{max})}`, with the gap :math:`p - p_{max}` kept above -80 so
  that no inclusion probability underflows to 0 (which would bias the Horvitz-Thompson
  sums)."""
  return jnp.exp(tau * jnp.maximum(p - p_max, -80.0))


def largest(p: jax.Array, residual: jax.Array) -> jax.Array:
  """``[...]``: the largest proxy over the residual (0 where it is empty)."""
  p_max = jnp.max(jnp.where(residual, p, -jnp.inf), axis=-1)
  return jnp.where(jnp.isfinite(p_max), p_max, 0.0)


def tempered(p, residual, p_max, taus) -> dict:
  """``{tau: (a [..., S], mean of a over the residual [...])}`` for each positive ``tau``,
  with one ``exp`` pass per temperature (``a`` at ``2 tau`` is ``a`` at ``tau`` squared)."""
  count = jnp.maximum(jnp.sum(residual, -1), 1).astype(jnp.float32)
  out = {}
  for tau in sorted(set(t for t in taus if t > 0)):
    a = out[tau / 2][0]**2 if tau / 2 in out else proposal_weight(p, tau, p_max[..., None])
    out[tau] = (a, jnp.sum(jnp.where(residual, a, 0.0), -1) / count)
  return out


def base_sample(key, a, residual, want, size: int):
  r"""The base sample: Poisson with :math:`\rho_i \propto a_i` (``a [..., S]``, the pilot
  proposal, or None for uniform), capped at 1, expected size ``want [...]``.

  Returns:
    ``(positions, mask, rho, overflow)``: the sample in a static list of ``size``, the
    inclusion probability of each listed token, and the tokens that did not fit.
  """
  a = jnp.where(residual, 1.0 if a is None else a, 0.0)
  total = jnp.sum(a, -1, keepdims=True)
  c = want[..., None] / jnp.where(total > 0, total, 1.0)
  # Probabilities capped at 1 lose mass: Newton steps on the concave E(c) = sum min(1, c a)
  # from below put it back (each step lands at or below the root, never past it).
  for _ in range(3):
    capped = c * a >= 1.0
    got = jnp.sum(jnp.where(capped, 1.0, c * a), -1, keepdims=True)
    slope = jnp.sum(jnp.where(capped, 0.0, a), -1, keepdims=True)
    c = c + jnp.where(slope > 0, (want[..., None] - got) / jnp.where(slope > 0, slope, 1.0), 0.0)
  rho = jnp.minimum(1.0, c * a)
  u = jax.random.uniform(key, a.shape)
  positions, mask, overflow = selection.compact(residual & (u < rho), size)
  return positions, mask, jnp.take_along_axis(rho, positions, -1), overflow


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


def defended(a, mean_a, mix):
  """``a + mix * mean(a)``: the proposal with its defensive uniform share."""
  return a + mix * mean_a[..., None]


def proposal(policy: Policy, weights: dict, mix):
  """The proposal of each head's chosen temperature (``weights`` from ``tempered``; a
  uniform head's entry is unused), ``[..., S]``."""
  tau = policy.tau[..., None]
  return defended(sum(jnp.where(tau == t, w, 0.0) for t, (w, _) in weights.items()),
                  policy.mean_a, mix)


def inclusion(above, a, log_c):
  r""":math:`\pi` of a Poisson head: 1 at or above the threshold, else ``min(1, c a)``."""
  return jnp.where(above, 1.0, jnp.minimum(1.0, jnp.exp(log_c)[..., None] * a))


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


def choose(p, residual, base_pos, rho, base_mask, ys, p_max, weights_by_tau, temperatures,
           mix, *, target_vars=None, size=None, cap=None, min_uniform: int = 2,
           unbiased: bool = True, d_hat=None) -> Policy:
  """The split policy (module docstring) on the base sample.

  Args:
    p, residual: ``[L..., S]`` proxies and residual mask of every token.
    base_pos, rho, base_mask: ``[L..., M]`` positions, inclusion probabilities and mask of
      the base tokens.
    ys: a tuple of ``[L..., M, dy]`` quantities on them (zero outside the mask) whose
      residual totals must be estimated: the guaranteed one first (the only one in
      ``density`` mode).
    p_max: ``[L...]`` the largest proxy over the residual.
    weights_by_tau: from ``tempered``, for every positive temperature.
    temperatures: static tuple; ``0`` is the fixed-size uniform candidate, the others
      Poisson proposals.
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

  if size is not None:  # density: the least variance at that size
    (b, score_u), (log_c, score_p) = at_size(size)
    clipped = jnp.zeros(n_s.shape, bool)
    if not unbiased:  # top-only: the budget's worth of largest proxies, [L, 1]
      thr_d = selection.kth_largest(p, residual, size.astype(jnp.int32))
      k_d = jnp.sum(residual & (p >= thr_d[..., None]), -1).astype(jnp.float32)
      drop_w = jnp.where(p_base >= thr_d[..., None], 0.0, weights)  # [L, M]
      # The bias^2: the squared norm of the HT total, less its estimated variance.
      score_d = jnp.maximum(jnp.sum(jnp.einsum("...m,...md->...d", drop_w, ys[0])**2, -1)
                            - jnp.sum((1.0 - rho) * drop_w**2 * y2s[0], -1), 0.0)
      if d_hat is not None:
        kept = d_hat - jnp.sum(drop_w * ys[1][..., 0], -1)
        score_d *= (d_hat / jnp.maximum(kept, 1e-6 * d_hat))**2
      score_d = jnp.where(k_d <= size, score_d, jnp.inf)[..., None]
  else:  # (epsilon, delta): the fewest tokens that meet every bound
    b = jnp.minimum(float(min_uniform), n_r)
    for sigma2, target in zip(sigma2s, target_vars):
      n0 = jnp.where(target[..., None] > 0, n_r**2 * sigma2 / jnp.where(
          target > 0, target, 1.0)[..., None], jnp.inf)
      safe = jnp.where(n0 > 0, n0, 1.0)
      need = jnp.where(n0 > 0, n_r / (1.0 + (n_r - 1.0) / safe), 0.0)
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
  if size is None or unbiased:
    score_d, thr_d, k_d = (jnp.full(n_s.shape + (1,), jnp.inf), jnp.full(n_s.shape, jnp.inf),
                           jnp.zeros(n_s.shape))
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


def residual_estimate(q, cache, p, residual, policy: Policy, a, limit, key, size: int):
  """Fits a Poisson head's expected size, draws the residual sample by the policy and
  attends over it.

  The base only estimated a Poisson head's expected size: ``c`` is lowered until the exact
  one, ``E(c) = sum_R min(1, c a_i)`` (top part included), is within ``limit [...]``. ``E``
  is concave in ``c`` with ``E(0) = k`` (the top part), so ``c <- c (limit - k) / (E(c) -
  k)`` never undershoots; three steps.

  One list for both kinds of head: a Poisson head keeps token ``i`` when ``u_i < pi_i``; a
  uniform head first keeps the top part and every other token with ``u_i`` below an
  oversampling rate (``b`` plus 5 standard deviations: fewer than ``b`` has probability
  ~3e-7, and is counted in ``overflow``), then, of the others, the ``b`` with the smallest
  ``u``: exactly a uniform sample of ``b`` without replacement.

  Args:
    p: ``[B, Hkv, G, S]`` proxies; ``residual``: bool, same shape.
    policy: from ``choose``; ``a``: from ``proposal``.
    size: the static list size.

  Returns:
    ``(out, lse, positions, mask, top, overflow, expected, lowered)``: the weighted partial
    result, the sample (positions ``[B, Hkv, G, size]`` and mask), the number of certain
    (top) tokens, of tokens that did not fit the list, the expected sample size, and whether
    ``c`` was lowered.
  """
  above = p >= policy.threshold[..., None]
  top = jnp.sum(residual & above, -1)
  k = top.astype(jnp.float32)
  log_c = policy.log_c
  for _ in range(3):
    got = jnp.sum(jnp.where(residual, inclusion(above, a, log_c), 0.0), -1)
    over = ~policy.uniform & (got > limit + 0.5) & (limit > k)
    log_c = jnp.where(over, log_c + jnp.log(jnp.maximum(limit - k, 1e-6) / jnp.maximum(
        got - k, 1e-6)), log_c)
  lowered = log_c < policy.log_c
  pi = inclusion(above, a, log_c)
  b = policy.size
  rest = jnp.maximum(policy.rest, 1.0)
  oversample = jnp.minimum(1.0, (b + 5.0 * jnp.sqrt(b) + 10.0) / rest)
  uniform = policy.uniform[..., None]
  draw = jnp.where(uniform, jnp.where(above, 1.0, oversample[..., None]), pi)
  u = jax.random.uniform(key, p.shape)
  positions, mask, overflow = selection.compact(residual & (u < draw), size)
  above_at = jnp.take_along_axis(above, positions, -1)
  # Uniform heads: the top part, and the b listed others of smallest u (slots of the list).
  others = mask & ~above_at
  slots, chosen = selection.top(-jnp.take_along_axis(u, positions, -1), others, size,
                                b.astype(jnp.int32)[..., None])
  picked = (mask & above_at) | selection.positions_mask(slots, chosen, size)
  kept, _, _ = selection.compact(picked, size)
  slot = jnp.arange(size, dtype=jnp.int32).reshape((1,) * (kept.ndim - 1) + (size,))
  kept = jnp.where(uniform, kept, slot)  # slots, in order
  count = jnp.where(policy.uniform, jnp.sum(picked, -1), jnp.sum(mask, -1))
  # The valid entries form a prefix of the list (attend_rows reads the first `count`).
  positions, above_at = (jnp.take_along_axis(x, kept, -1) for x in (positions, above_at))
  mask = slot < count[..., None]
  short = jnp.maximum(b.astype(jnp.int32) - jnp.sum(others, -1), 0)  # too few drawn
  overflow = jnp.where(policy.uniform, short + overflow, overflow)
  log_pi = jnp.where(uniform, jnp.where(above_at, 0.0, jnp.log(jnp.maximum(b / rest, 1e-30))[
      ..., None]), jnp.log(jnp.take_along_axis(pi, positions, axis=-1)))
  out, lse = attend_rows(q, cache, positions, jnp.sum(mask, -1, dtype=jnp.int32), log_pi)
  expected = jnp.where(policy.uniform, top.astype(jnp.float32) + b,
                       jnp.sum(jnp.where(residual, pi, 0.0), -1))
  return out, lse, positions, mask, top, overflow, expected, lowered


def list_size(fraction: float, capacity: int) -> int:
  """A static list that holds a Poisson sample of expected size ``fraction * capacity``
  (six standard deviations of slack)."""
  mean = fraction * capacity
  return min(capacity, math.ceil(mean + 6 * math.sqrt(mean) + 16))
