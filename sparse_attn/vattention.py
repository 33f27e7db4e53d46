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

The quantity each ``guarantee`` bounds, its ``y_i`` and target ``T`` are
``sparse_attn._src.budget``'s. The floor ``min_base`` keeps the spread of heavy-tailed
:math:`e_i` from being estimated on a handful of draws (``docs/vattention.md``: on the
reference model's real attention a floor of 128 held the output guarantee on every layer
where 20 and 64 did not).

Static shapes: one uniform priority per token and query; the ``m0_max`` (base) and ``b_max``
(final) lowest priorities among the residual are a uniform sample without replacement, and
all but the first ``m0`` / ``b`` are masked. When the needed ``b`` exceeds
``max_fraction * n_s`` it is clipped there and ``stats["budget_clipped"]`` is true: the
guarantee is then not claimed. Unlike a public reference that sampled *with* replacement
while weighting by ``n_s / b`` (which biases :math:`\hat D` low), both samples here are
without replacement and the weights are exact.

The residual sampled by the hash codes instead (beyond the paper) is
``sa.vattention_importance``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparse_attn import predictors
from sparse_attn._src import budget, scoring, selection
from sparse_attn.attention import attend_rows, combine_lse, group_queries, make_result
from sparse_attn.streaming import check_window, exact_part, residual_mask
from sparse_attn.types import Estimator, check_cache, check_key, check_query, configured
from sparse_attn.types import donated_index_hint, within_capacity


def uniform_base_sample(key, residual, n_s, base_rate: float, min_base: int):
  """``(positions, mask, m0)``: ``m0`` residual tokens drawn uniformly without replacement."""
  capacity = residual.shape[-1]
  m0_max = min(capacity, max(min_base, math.ceil(base_rate * capacity)))
  m0 = jnp.minimum(jnp.maximum(min_base, jnp.ceil(base_rate * n_s.astype(jnp.float32))
                               .astype(jnp.int32)), n_s)
  u = jax.random.uniform(key, residual.shape)
  positions, mask = selection.top(-u, residual, m0_max, m0[..., None])
  return positions, mask, m0


def scored(q, cache, index, pred: scoring.Scorer, sinks: int, local: int):
  """``(qg [B, Hkv, G, D], predictor scores [B, Hkv, G, S], residual mask, same shape)``."""
  qg = group_queries(q, cache.keys.shape[1])
  capacity = cache.keys.shape[2]
  positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, None, :]
  residual = jnp.broadcast_to(residual_mask(positions, cache.length, sinks, local),
                              qg.shape[:3] + (capacity,))
  return qg, pred.scores(qg, cache, index), residual


@configured
def vattention(epsilon: float, delta: float, *, guarantee: str = "denominator",
               predictor: predictors.Predictor = predictors.oracle(), sinks: int = 4,
               local: int = 64, topk_fraction: float = 0.02, base_rate: float = 0.02,
               min_base: int = 128, max_fraction: float = 0.25) -> Estimator:
  """vAttention estimator with a verified (epsilon, delta) guarantee.

  Args:
    epsilon: relative error bound.
    delta: failure probability.
    guarantee: ``"denominator"``, ``"numerator"`` or ``"output"`` (``sparse_attn._src.budget``).
    predictor: ranks the top-k: ``sa.predictors.oracle()`` (exact scores; reads every key),
      ``sa.predictors.simhash(bits=128)`` or ``sa.predictors.spotlight(params)``.
    sinks, local: sizes of the exact window.
    topk_fraction: top-k tokens kept exactly, as a fraction of the valid tokens (0 allowed).
    base_rate: base sample size, as a fraction of the residual.
    min_base: the smallest base sample (or the whole residual, if smaller); at least 2.
    max_fraction: the largest sample, as a fraction of the residual; a larger need is
      clipped and flagged in ``stats["budget_clipped"]``.

  Returns:
    An ``Estimator``. Keys: ``attend`` consumes its ``key`` (the base and final samples;
    required); ``init`` consumes its ``key`` only with the SimHash predictor (the planes),
    and otherwise draws nothing. ``stats``: ``selected``, ``valid``, ``topk``, ``residual``
    (n_s), ``base`` (m0), ``budget`` (b: sampled tokens beyond the top-k),
    ``budget_clipped``, ``read`` (tokens whose rows were read beyond the predictor: exact
    set, top-k, base and final samples), ``read_all_keys``.
  """
  z = budget.check_guarantee(epsilon, delta, guarantee)
  if not 0.0 <= topk_fraction < 1.0:
    raise ValueError(f"topk_fraction must be in [0, 1), got {topk_fraction!r}")
  budget.check_sample_sizes(base_rate, min_base, max_fraction)
  check_window(sinks, local)
  pred = predictors.check(predictor).scorer(sinks, local)

  def init(cache, key=None):
    check_cache(cache)
    return pred.init(cache, key)

  def attend(q, cache, index, key=None):
    check_query(q, cache)
    check_key(key, purpose="vattention's attend draws its samples from it")
    with donated_index_hint():
      return _attend(q, cache, index, key)

  @jax.jit
  def _attend(q, cache, index, key):
    cache, over = within_capacity(cache)
    keys, values, length = cache
    capacity = keys.shape[2]
    qg, scores, residual = scored(q, cache, index, pred, sinks, local)
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
    y, target = budget.base_terms(
        budget.selected_scores(qg, cache, base_pos, scores, pred.reads_all_keys), base_mask,
                           jnp.where(base_mask, (n_sf / m0f)[..., None], 0.0), values,
                           base_pos, (out_f, lse_f), guarantee)
    centred = jnp.where(base_mask[..., None], y - jnp.sum(y, -2, keepdims=True)
                        / m0f[..., None, None], 0.0)
    variance = jnp.sum(centred**2, axis=(-2, -1)) / jnp.maximum(m0f - 1.0, 1.0)
    n0 = jnp.where(target > 0, (z * n_sf * jnp.sqrt(variance) / (epsilon * jnp.where(
        target > 0, target, 1.0)))**2, jnp.inf)
    needed = jnp.clip(jnp.ceil(budget.finite_population_size(n0, n_s)).astype(jnp.int32), m0, n_s)
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
    read = exact + b_used + m0.astype(jnp.float32) - budget.overlap(base_pos, base_mask, final_pos,
                                                             final_mask, capacity)
    return make_result(
        q, out, lse, exact + b_used, cache, over,
        scoring.nonfinite_keys(pred, index, scores, length), topk=top_count, residual=n_sf,
        base=m0.astype(jnp.float32), budget=b_used, budget_clipped=clipped, read=read,
        read_all_keys=jnp.full(shape, pred.reads_all_keys))

  return Estimator(init, pred.append, attend)
