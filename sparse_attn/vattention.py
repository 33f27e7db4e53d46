r"""vAttention: exact top-k plus a uniformly sampled residual, sized for an (eps, delta) bound.

Deterministic set :math:`I_f` = sinks + local window + the top ``k = ceil(topk_fraction n)``
residual tokens by a predictor. The other valid tokens form the residual :math:`R`,
:math:`n_s = |R|`. With :math:`e_i = e^{s_i}`:

1. **Base sample.** :math:`m_0 = \min(n_s, \max(\mathrm{min\_base}, \lceil \mathrm{base\_rate}\,
   n_s \rceil))` tokens drawn uniformly without replacement from :math:`R` estimate the
   spread :math:`\hat\sigma` of the quantity being guaranteed and the totals
   :math:`\hat D = \sum_{I_f} e_i + n_s \bar e`, :math:`\hat N = \sum_{I_f} e_i v_i + n_s \bar x`
   (:math:`x_i = e_i v_i`).
2. **Budget.** The residual estimate :math:`n_s \bar y_b` from a sample of size ``b`` without
   replacement has variance :math:`n_s^2 (1/b - 1/n_s)\,\sigma^2` (finite-population
   correction). By the CLT, :math:`P(\|\text{error}\| > z \sqrt{\mathrm{Var}}) \approx \delta`
   with :math:`z = \Phi^{-1}(1 - \delta/2)`; requiring :math:`z\sqrt{\mathrm{Var}} \le \epsilon T`
   for the target size ``T`` gives

   .. math:: n_0 = \left(\frac{z\, n_s\, \hat\sigma}{\epsilon\, T}\right)^2, \qquad
             b = \left\lceil \frac{n_0}{1 + (n_0 - 1)/n_s} \right\rceil
             \ \text{clipped to}\ [m_0, n_s].

3. **Estimate.** A fresh sample of size ``b`` (independent of the base sample, so that given
   ``b`` it is a plain uniform sample and the estimate is unbiased) enters with weight
   :math:`n_s / b`: :math:`\hat D = \sum_{I_f} e_i + \frac{n_s}{b} \sum_{\text{sample}} e_i`,
   likewise :math:`\hat N`; the output is :math:`\hat N / \hat D`.

The three guarantees differ in the variance and the target:

* ``"denominator"``: :math:`P(|\hat D - D| > \epsilon D) \le \delta`; :math:`\sigma^2` is the
  variance of :math:`e_i` over :math:`R`, :math:`T = \hat D`.
* ``"numerator"``: :math:`P(\|\hat N - N\|_2 > \epsilon \|N\|_2) \le \delta`; :math:`\sigma^2` is
  the trace of the covariance of :math:`x_i = e_i v_i`, :math:`T = \|\hat N\|`. For a vector
  error :math:`g \sim \mathcal N(0, \Sigma)`,
  :math:`P(\|g\|^2 > z^2 \operatorname{tr}\Sigma) \le P(\chi^2_1 > z^2) = \delta` whenever
  :math:`z^2 \ge 1.54` (Szekely & Bakirov 2003: a weighted sum of chi-squares with unit total
  weight exceeds such a threshold no more often than one chi-square), i.e. for
  :math:`\delta \le 0.21`; larger ``delta`` is refused for this mode and the next.
* ``"output"``: :math:`P(\|\hat o - o\|_2 > \epsilon \|o\|_2) \le \delta`, by the delta method.
  :math:`\hat o - o = (\hat N - o \hat D) / \hat D`, and :math:`\hat N - o\hat D` is the sampling
  error of the residual total of :math:`y_i = e_i (v_i - o)` (the exact set contributes no
  error), so to first order :math:`\|\hat o - o\| \approx \|n_s \bar y_b - Y_R\| / D`.
  Hence :math:`\sigma^2` = trace of the covariance of :math:`y_i` with ``o`` replaced by the base
  estimate :math:`\hat N / \hat D`, and :math:`T = \hat D \|\hat o\| = \|\hat N\|`. The same trace
  argument as for the numerator applies.

The floor ``min_base`` (128) is there because the spread of heavy-tailed :math:`e_i` cannot be
estimated from a handful of draws: on the reference model's real attention at 1K tokens
(``python -m sparse_attn eval``), ``base_rate`` alone gave base samples of about 20 tokens,
and the output guarantee failed on 12%, 52% and 35% of the unclipped heads of layers 1-3
(delta = 0.05). A floor of 64 still failed on 11-13% on the common-words task; 128 kept
every layer at or under 4.2%. Long contexts are unaffected (2% of 8K is already 164).

Static shapes: one uniform priority per token and query; the ``m0_max`` (base) and ``b_max``
(final) lowest priorities among the residual are a uniform sample without replacement, and
all but the first ``m0`` / ``b`` are masked. When the needed ``b`` exceeds
``max_fraction * n_s`` it is clipped there and ``stats["budget_clipped"]`` is true: the
guarantee is then not claimed. Unlike a public reference that sampled *with* replacement
while weighting by ``n_s / b`` (which biases :math:`\hat D` low), both samples here are
without replacement and the weights are exact.

``proposal="simhash" | "spotlight"`` (or any proposal with ``density=``, a fixed size instead
of a guarantee) hands the residual to ``sparse_attn.importance``: a base sample shaped by the
hash codes, and per head a choice (``sparse_attn.split_policy``) between this uniform sampler
and Poisson sampling with probabilities from the codes, with a top part sized by the same
codes.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import jax
import jax.numpy as jnp

from sparse_attn import importance, predictors, selection, split_policy
from sparse_attn.attention import attend_rows, combine_lse, gather_rows, group_queries
from sparse_attn.attention import make_result, row_scores
from sparse_attn.streaming import check_window, exact_part, residual_mask
from sparse_attn.types import Estimator, check_cache, check_key, check_query, within_capacity
from sparse_attn.types import donated_index_hint

GUARANTEES = ("denominator", "numerator", "output")


def selected_scores(qg, cache, positions, all_scores, pred: predictors.Predictor):
  """Exact scores at ``positions [B, Hkv, G, N]``: read from the oracle's full scores, or
  computed from the gathered keys when the predictor only ranked tokens."""
  if pred.reads_all_keys:
    return jnp.take_along_axis(all_scores, positions, axis=-1)
  return row_scores(qg, gather_rows(cache.keys, positions))


def budget(n0: jax.Array, n_s: jax.Array) -> jax.Array:
  r"""Sample size with the finite-population correction: :math:`n_0 / (1 + (n_0 - 1)/n_s)`,
  written as :math:`n_s / (1 + (n_s - 1)/n_0)` so that :math:`n_0 = \infty` gives ``n_s``."""
  n_s = n_s.astype(jnp.float32)
  safe = jnp.where(n0 > 0, n0, 1.0)
  return jnp.where(n0 > 0, n_s / (1.0 + (n_s - 1.0) / safe), 0.0)


def uniform_base_sample(key, residual, n_s, base_rate: float, min_base: int):
  """``(positions, mask, m0)``: ``m0`` residual tokens drawn uniformly without replacement."""
  capacity = residual.shape[-1]
  m0_max = min(capacity, max(min_base, math.ceil(base_rate * capacity)))
  m0 = jnp.minimum(jnp.maximum(min_base, jnp.ceil(base_rate * n_s.astype(jnp.float32))
                               .astype(jnp.int32)), n_s)
  u = jax.random.uniform(key, residual.shape)
  positions, mask = selection.top(-u, residual, m0_max, m0[..., None])
  return positions, mask, m0


def base_terms(base_s, base_mask, weights, values, base_pos, fixed, guarantee: str):
  """The guaranteed quantity ``y`` on the base tokens and its target size ``T``.

  Args:
    base_s: ``[B, Hkv, G, M]`` exact scores of the base tokens (``base_mask`` valid).
    weights: ``[B, Hkv, G, M]`` each base token's weight in estimates of residual totals
      (``n_s / m0`` for a uniform sample, ``1 / rho`` for a Poisson one).
    fixed: ``(out, lse)`` of the exactly attended part.

  Returns:
    ``(y [B, Hkv, G, M, dy], T [B, Hkv, G])``, ``y`` zero outside the mask, both on a
    common scale ``e_i = exp(s_i - ref)`` (module docstring).
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


def vattention(epsilon: float | None = None, delta: float | None = None, *, sinks: int = 4,
               local: int = 64, topk_fraction: float = 0.02, base_rate: float = 0.02,
               min_base: int = 128, max_fraction: float = 0.25,
               guarantee: str = "denominator", predictor: str | None = None,
               bits: int | None = None, hash_params: dict | None = None,
               proposal: str = "uniform",
               density: float | None = None, mix: float = 0.1,
               unbiased: bool = True, certain_slice: int | None = None) -> Estimator:
  """vAttention estimator with a verified (epsilon, delta) guarantee.

  Args:
    epsilon: relative error bound.
    delta: failure probability.
    sinks, local: sizes of the exact window.
    topk_fraction: top-k tokens kept exactly, as a fraction of the valid tokens (0 allowed);
      only with ``proposal="uniform"`` and ``(epsilon, delta)`` (otherwise the split policy of
      ``sparse_attn.split_policy`` sizes the top part per head).
    base_rate: base sample size, as a fraction of the residual.
    min_base: the smallest base sample (or the whole residual, if smaller); at least 2.
    max_fraction: the largest sample, as a fraction of the residual; a larger need is
      clipped and flagged in ``stats["budget_clipped"]``.
    guarantee: ``"denominator"``, ``"numerator"`` or ``"output"`` (see the module docstring);
      with ``density``, the quantity whose variance the split policy minimises.
    predictor: top-k ranking, one of ``predictors.NAMES``. Default: ``"oracle"`` for the
      uniform proposal, else the proposal's own codes (which it must be).
    bits: code length of the ``"simhash"`` predictor. Default: the predictor's (128), or
      ``importance.SIMHASH_PROPOSAL_BITS`` (1024) for the ``"simhash"`` proposal, whose
      sampling probabilities need the finer angle (``importance``).
    hash_params: trained hash heads of the ``"spotlight"`` predictor.
    proposal: how the residual is sampled: ``"uniform"`` (uniformly, this module), or
      ``"simhash"`` / ``"spotlight"``: Poisson sampling with inclusion probabilities from the
      predictor's codes and stored key norms (``sparse_attn.importance``).
    density: instead of ``(epsilon, delta)``: a fixed size, the fraction of the valid tokens
      that enter the estimate (exact window included); the split policy minimises the
      estimated variance at that size and no guarantee is claimed.
    mix: the defensive uniform share of the importance proposals (``importance``).
    unbiased: False (with ``density`` only) lets a head keep its top part alone, without a
      residual sample, when the base's squared estimate of the dropped residual's total (which
      overstates the bias^2 by its variance) is below every unbiased candidate's variance:
      the least estimated error, no longer unbiased (``split_policy``).
    certain_slice: with a code proposal, the residual tokens of largest proxy that the base
      reads with probability 1 (``importance``), beside its ``m0`` draws; default
      ``min_base``. On the reference model's real attention the Spotlight proposal's output
      guarantee holds on every layer with 512 (layer 3: 2.8% failures against a bound of
      8.8%) and not with 128 (11.5% against 10.7%).

  Returns:
    An ``Estimator``. Keys: ``attend`` consumes its ``key`` (the base and final samples;
    required); ``init`` consumes its ``key`` only with the ``"simhash"`` predictor or
    proposal (the planes), and otherwise draws nothing. ``stats``: ``selected``, ``valid``,
    ``topk``, ``residual`` (n_s), ``base`` (m0; with a code proposal, its draws plus the
    certain slice), ``budget`` (b: sampled tokens beyond the top-k),
    ``budget_clipped``, ``read`` (tokens whose rows were read beyond the predictor: exact
    set, top-k, base and final samples), ``read_all_keys``; with the importance sampler also
    ``temperature`` (the chosen tau), ``expected`` (expected sample size) and
    ``selected_overflow`` (sampled tokens that did not fit the static list; non-zero also
    sets ``budget_clipped``).
  """
  if proposal not in importance.PROPOSALS:
    raise ValueError(f"proposal must be one of {importance.PROPOSALS}, got {proposal!r}")
  if predictor is None:
    predictor = "oracle" if proposal == "uniform" else proposal
  if bits is None and proposal == "simhash":
    bits = importance.SIMHASH_PROPOSAL_BITS
  if proposal != "uniform" and predictor != proposal:
    raise ValueError(f"proposal {proposal!r} samples by the predictor's codes: predictor must "
                     f"be {proposal!r} (or None), got {predictor!r}")
  if guarantee not in GUARANTEES:
    raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
  if density is None:
    if epsilon is None or delta is None:
      raise ValueError("give epsilon and delta (the guarantee), or density (a fixed size)")
    if not epsilon > 0:
      raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    delta_max = 1.0 if guarantee == "denominator" else 0.21
    if not 0.0 < delta < delta_max:
      raise ValueError(f"delta must be in (0, {delta_max}) for guarantee={guarantee!r}, "
                       f"got {delta!r}")
    z = NormalDist().inv_cdf(1.0 - delta / 2.0)
    # The importance sampler's output guarantee also bounds the denominator (split_policy).
    target_scales = (epsilon / z,) * (2 if guarantee == "output" else 1)
  else:
    if epsilon is not None or delta is not None:
      raise ValueError("density fixes the size and claims no (epsilon, delta): give one of "
                       f"them, got epsilon={epsilon!r}, delta={delta!r}, density={density!r}")
    if not 0.0 < density <= 1.0:
      raise ValueError(f"density must be in (0, 1], got {density!r}")
    z = None
  if not unbiased and density is None:
    raise ValueError("unbiased=False is a density-mode option: an (epsilon, delta) guarantee "
                     "needs the unbiased estimate")
  if not 0.0 <= topk_fraction < 1.0:
    raise ValueError(f"topk_fraction must be in [0, 1), got {topk_fraction!r}")
  if not isinstance(min_base, int) or min_base < 2:
    raise ValueError(f"min_base must be an int >= 2, got {min_base!r}")
  if not 0.0 < base_rate <= max_fraction <= 1.0:
    raise ValueError("need 0 < base_rate <= max_fraction <= 1, got "
                     f"base_rate={base_rate!r}, max_fraction={max_fraction!r}")
  if certain_slice is None:
    certain_slice = min_base
  elif proposal == "uniform":
    raise ValueError("certain_slice shapes a code proposal's base: give proposal='simhash' or "
                     f"'spotlight', got proposal={proposal!r}")
  if not isinstance(certain_slice, int) or certain_slice < 1:
    raise ValueError(f"certain_slice must be an int >= 1, got {certain_slice!r}")
  if not mix > 0:
    raise ValueError(f"mix must be > 0 (every token needs a positive probability), got {mix!r}")
  check_window(sinks, local)
  sampled = proposal != "uniform" or density is not None  # the importance sampler
  pred = predictors.make(predictor, **({} if bits is None else {"bits": bits}), sinks=sinks,
                         local=local, hash_params=hash_params, norms=proposal != "uniform")

  def init(cache, key=None):
    check_cache(cache)
    return pred.init(cache, key)

  def attend(q, cache, index, key=None):
    check_query(q, cache)
    check_key(key, purpose="vattention's attend draws its samples from it")
    with donated_index_hint():
      return (_attend_importance if sampled else _attend)(q, cache, index, key)

  def scored(q, cache, index):
    """``(qg [B, Hkv, G, D], predictor scores [B, Hkv, G, S], residual mask, same shape)``."""
    qg = group_queries(q, cache.keys.shape[1])
    capacity = cache.keys.shape[2]
    positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, None, :]
    residual = jnp.broadcast_to(residual_mask(positions, cache.length, sinks, local),
                                qg.shape[:3] + (capacity,))
    return qg, pred.scores(qg, cache, index), residual

  @jax.jit
  def _attend(q, cache, index, key):
    cache, over = within_capacity(cache)
    keys, values, length = cache
    capacity = keys.shape[2]
    qg, scores, residual = scored(q, cache, index)
    shape = qg.shape[:3]  # [B, Hkv, G]

    # Deterministic part: sinks + local (exact_part) and the predictor's top-k.
    out_f, lse_f, exact_count = exact_part(q, cache, sinks, local)
    parts_out, parts_lse = [out_f], [lse_f]
    top_count = jnp.zeros(shape, jnp.float32)
    k_max = min(capacity, math.ceil(topk_fraction * capacity))
    if k_max > 0:
      keep = jnp.ceil(topk_fraction * length.astype(jnp.float32)).astype(jnp.int32)
      top_pos, top_mask = selection.top(scores, residual, k_max, keep[:, None, None, None])
      out_t, lse_t = attend_rows(q, cache, top_pos, jnp.sum(top_mask, -1, dtype=jnp.int32))
      parts_out.append(out_t)
      parts_lse.append(lse_t)
      top_count = jnp.sum(top_mask, -1).astype(jnp.float32)
      residual &= ~selection.positions_mask(top_pos, top_mask, capacity)
    out_f, lse_f = combine_lse(parts_out, parts_lse)
    n_s = jnp.sum(residual, axis=-1, dtype=jnp.int32)
    n_sf = n_s.astype(jnp.float32)

    # Base sample: m0 uniform draws without replacement from the residual.
    key_base, key_final = jax.random.split(key)
    base_pos, base_mask, m0 = uniform_base_sample(key_base, residual, n_s, base_rate, min_base)
    m0f = jnp.maximum(m0.astype(jnp.float32), 1.0)
    y, target = base_terms(selected_scores(qg, cache, base_pos, scores, pred), base_mask,
                           jnp.where(base_mask, (n_sf / m0f)[..., None], 0.0), values,
                           base_pos, (out_f, lse_f), guarantee)
    centred = jnp.where(base_mask[..., None], y - jnp.sum(y, -2, keepdims=True)
                        / m0f[..., None, None], 0.0)
    variance = jnp.sum(centred**2, axis=(-2, -1)) / jnp.maximum(m0f - 1.0, 1.0)
    n0 = jnp.where(target > 0, (z * n_sf * jnp.sqrt(variance) / (epsilon * jnp.where(
        target > 0, target, 1.0)))**2, jnp.inf)
    needed = jnp.clip(jnp.ceil(budget(n0, n_s)).astype(jnp.int32), m0, n_s)
    cap = jnp.maximum(jnp.ceil(max_fraction * n_sf).astype(jnp.int32), m0)
    clipped = needed > cap
    b = jnp.minimum(needed, cap)

    # Final sample: b fresh uniform draws without replacement, weight n_s / b.
    m0_max = base_pos.shape[-1]
    b_max = min(capacity, max(m0_max, math.ceil(max_fraction * capacity)))
    u = jax.random.uniform(key_final, shape + (capacity,))
    final_pos, final_mask = selection.top(-u, residual, b_max, b[..., None])
    bf = jnp.maximum(b.astype(jnp.float32), 1.0)
    out_s, lse_s = attend_rows(q, cache, final_pos, jnp.sum(final_mask, -1, dtype=jnp.int32))
    lse_s = lse_s + jnp.log(jnp.maximum(n_sf, 1.0) / bf)  # every sample has weight n_s / b
    out, lse = combine_lse([out_f, out_s], [lse_f, lse_s])

    b_used = jnp.sum(final_mask, -1).astype(jnp.float32)
    exact = jnp.broadcast_to(exact_count, shape) + top_count
    read = exact + b_used + m0.astype(jnp.float32) - overlap(base_pos, base_mask, final_pos,
                                                             final_mask, capacity)
    return make_result(
        q, out, lse, exact + b_used, cache, over,
        predictors.nonfinite_keys(index, scores, length), topk=top_count, residual=n_sf,
        base=m0.astype(jnp.float32), budget=b_used, budget_clipped=clipped, read=read,
        read_all_keys=jnp.full(shape, pred.reads_all_keys))

  @jax.jit
  def _attend_importance(q, cache, index, key):
    cache, over = within_capacity(cache)
    keys, values, length = cache
    capacity, head_dim = keys.shape[2:]
    qg, scores, residual = scored(q, cache, index)
    shape = qg.shape[:3]  # [B, Hkv, G]
    if proposal == "uniform":
      p, temperatures = scores.astype(jnp.float32), (0.0,)  # the predictor ranks the top part
    else:
      similarity_bits = bits if proposal == "simhash" else head_dim * shape[2]
      p, temperatures = importance.score_proxy(qg, index, scores, similarity_bits), \
          importance.TEMPERATURES
    p_max = importance.largest(p, residual)
    out_f, lse_f, exact_count = exact_part(q, cache, sinks, local)
    exact_count = jnp.broadcast_to(exact_count, shape)
    n_s = jnp.sum(residual, axis=-1, dtype=jnp.int32)
    n_sf = n_s.astype(jnp.float32)

    # Base sample: about m0 tokens, Poisson; with the codes, shaped by the pilot proposal (with
    # the same defensive share), plus the certain_slice tokens of largest proxy with
    # probability 1.
    key_base, key_final = jax.random.split(key)
    m0_want = jnp.minimum(jnp.maximum(float(min_base), jnp.ceil(base_rate * n_sf)), n_sf)
    base_size = importance.list_size(max(base_rate, min_base / capacity), capacity)
    pilot = certain = None
    if proposal != "uniform":
      tau0 = importance.BASE_TEMPERATURE
      pilot = importance.defended(*importance.tempered(p, residual, p_max, (tau0,))[tau0], mix)
      certain = importance.largest_tokens(p, residual, min(capacity, certain_slice))
      base_size = min(capacity, base_size + certain_slice)
    base_pos, base_mask, rho, _ = importance.base_sample(key_base, pilot, residual, m0_want,
                                                         base_size, certain)
    weights = jnp.where(base_mask, 1.0 / jnp.where(base_mask, rho, 1.0), 0.0)
    base_s = selected_scores(qg, cache, base_pos, scores, pred)
    if proposal != "uniform":  # base tokens rank by their exact scores (importance)
      if proposal == "spotlight":  # its proxies first put on the scores' scale
        p = importance.calibrated(p, jnp.take_along_axis(p, base_pos, -1), base_s, base_mask)
      p = importance.sharpened(p, base_pos, base_mask & ((rho >= 1.0) | (density is not None)),
                               base_s)
      p_max = importance.largest(p, residual)
    weights_by_tau = importance.tempered(p, residual, p_max, temperatures)
    terms = [base_terms(base_s, base_mask, weights, values, base_pos, (out_f, lse_f), g)
             for g in ((guarantee, "denominator") if guarantee == "output" else (guarantee,))]
    m0 = jnp.sum(base_mask, -1)
    common = (p, residual, base_pos, rho, base_mask, [y for y, _ in terms], p_max,
              weights_by_tau, temperatures, mix)
    if density is None:
      limit = max_fraction * n_sf
      policy = split_policy.choose(*common, target_vars=[
          jnp.where(target > 0, (scale * target)**2, 0.0) for (_, target), scale in zip(
              terms, target_scales)], cap=limit, min_uniform=min_base)
      size = importance.list_size(max_fraction, capacity)
    else:
      limit = jnp.clip(jnp.ceil(density * length.astype(jnp.float32))[:, None, None]
                       - exact_count, 0.0, n_sf)
      policy = split_policy.choose(*common, size=limit, unbiased=unbiased,
                                 d_hat=terms[1][1] if guarantee == "output" else None)
      size = importance.list_size(density, capacity)
    out_s, lse_s, pos, mask, top, overflow, expected, lowered = importance.residual_estimate(
        q, cache, p, residual, policy, importance.proposal(policy, weights_by_tau, mix), limit,
        key_final, size)
    # The exact expected size above the base's estimate (c lowered) is a clip too.
    clipped = policy.clipped | (lowered & (density is None)) | (overflow > 0)
    out, lse = combine_lse([out_f, out_s], [lse_f, lse_s])

    taken = jnp.sum(mask, -1).astype(jnp.float32)
    top = top.astype(jnp.float32)
    read = exact_count + taken + m0.astype(jnp.float32) - overlap(base_pos, base_mask, pos, mask,
                                                                         capacity)
    return make_result(
        q, out, lse, exact_count + taken, cache, over,
        predictors.nonfinite_keys(index, scores, length), topk=top, residual=n_sf,
        base=m0.astype(jnp.float32), budget=taken - top,
        budget_clipped=clipped, read=read,
        read_all_keys=jnp.full(shape, pred.reads_all_keys),
        temperature=jnp.where(policy.uniform, 0.0, policy.tau),
        expected=expected, selected_overflow=overflow.astype(jnp.float32))

  return Estimator(init, pred.append, attend)


def overlap(pos_a, mask_a, pos_b, mask_b, num_tokens: int) -> jax.Array:
  """``float32 [...]``: tokens in both position lists (each without repeats)."""
  in_a = selection.positions_mask(pos_a, mask_a, num_tokens)
  return jnp.sum(mask_b & jnp.take_along_axis(in_a, pos_b, axis=-1), -1).astype(jnp.float32)
