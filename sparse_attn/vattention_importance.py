r"""vAttention with the residual sampled by hash codes (beyond the paper).

``sa.vattention`` keeps a fixed top-k and samples the rest uniformly. Here each residual
token gets a proxy of its score from the proposal's codes and one stored key norm
(``sparse_attn._src.importance``), a base sample shaped by those proxies reads some tokens
exactly, and per query head the split policy (``sparse_attn._src.split_policy``) chooses how many
tokens to attend exactly (the top part) and how to sample the rest (uniformly, or by Poisson
sampling with inclusion probabilities from the proxies, Horvitz-Thompson weights), either to
meet an ``(epsilon, delta)`` bound with the fewest tokens (``sparse_attn._src.budget``) or to
least estimated variance at a fixed ``density``. The final draw uses fresh uniforms, so the
estimate stays unbiased whatever the base chose. Derivations and measurements:
``docs/importance.md``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_attn import predictors
from sparse_attn._src import budget, importance, scoring, split_policy
from sparse_attn.attention import combine_lse, make_result
from sparse_attn.streaming import check_window, exact_part
from sparse_attn.types import Estimator, check_cache, check_key, check_query, configured
from sparse_attn.types import donated_index_hint, within_capacity
from sparse_attn.vattention import scored

SIMHASH_PROPOSAL_BITS = 1024  # the SimHash proposal's code length (docs/importance.md)


@configured
def vattention_importance(
    epsilon: float | None = None, delta: float | None = None, *,
    proposal: predictors.Predictor | None = predictors.simhash(bits=SIMHASH_PROPOSAL_BITS),
    density: float | None = None, guarantee: str = "denominator", sinks: int = 4,
    local: int = 64, base_rate: float = 0.02, min_base: int = 128, max_fraction: float = 0.25,
    mix: float = 0.1, unbiased: bool = True, certain_slice: int | None = None) -> Estimator:
  """vAttention with an importance-sampled residual: an ``(epsilon, delta)`` guarantee, or a
  fixed ``density``.

  Args:
    epsilon, delta: the guarantee's relative error and failure probability; or
    density: instead, a fixed size: the fraction of the valid tokens that enter the estimate
      (exact window included); the split policy minimises the estimated variance at that size
      and no guarantee is claimed.
    proposal: the codes that shape the sampling: ``sa.predictors.simhash(bits=1024)`` (the
      finer angle of 1024 bits is what its proxies need; ``docs/importance.md``) or
      ``sa.predictors.spotlight(params)``; its codes also rank the top part. ``None``: no
      codes, the residual is sampled uniformly and the top part ranked by the exact scores
      (``density`` only: with a guarantee that is ``sa.vattention``).
    guarantee: ``"denominator"``, ``"numerator"`` or ``"output"`` (``sparse_attn._src.budget``);
      with ``density``, the quantity whose variance the split policy minimises.
    sinks, local: sizes of the exact window.
    base_rate: base sample size, as a fraction of the residual.
    min_base: the smallest base sample; at least 2.
    max_fraction: the largest sample, as a fraction of the residual; a larger need is
      clipped and flagged in ``stats["budget_clipped"]``.
    mix: the defensive uniform share of the Poisson proposals (> 0).
    unbiased: False (``density`` only) lets a head keep its top part alone, without a
      residual sample, when that has the least estimated error (``split_policy``): the
      estimate is then no longer unbiased.
    certain_slice: with codes, the residual tokens of largest proxy that the base reads with
      probability 1, beside its draws; default ``min_base`` (``docs/importance.md``: 512 for
      the reference model's Spotlight codes).

  Returns:
    An ``Estimator``. Keys: ``attend`` consumes its ``key`` (the base and final samples;
    required); ``init`` consumes its ``key`` only with the SimHash proposal (the planes).
    ``stats``: those of ``sa.vattention`` (``base`` counts the draws plus the certain
    slice), and ``temperature`` (the chosen tau; 0: uniform), ``expected`` (expected sample
    size) and ``selected_overflow`` (sampled tokens that did not fit the static list;
    non-zero also sets ``budget_clipped``).
  """
  if proposal is not None and not isinstance(proposal, (predictors.SimHash,
                                                         predictors.Spotlight)):
    raise ValueError("proposal must be sa.predictors.simhash(...), sa.predictors.spotlight("
                     f"params) or None (uniform, density only), got {proposal!r}")
  if density is None:
    if proposal is None:
      raise ValueError("proposal=None samples uniformly: with (epsilon, delta) that is "
                       "sa.vattention; give density= for the fixed-size uniform sampler")
    z = budget.check_guarantee(epsilon, delta, guarantee)
    # The output guarantee also bounds the denominator (split_policy).
    target_scales = (epsilon / z,) * (2 if guarantee == "output" else 1)
  else:
    if epsilon is not None or delta is not None:
      raise ValueError("density fixes the size and claims no (epsilon, delta): give one of "
                       f"them, got epsilon={epsilon!r}, delta={delta!r}, density={density!r}")
    if not 0.0 < density <= 1.0:
      raise ValueError(f"density must be in (0, 1], got {density!r}")
    if guarantee not in budget.GUARANTEES:
      raise ValueError(f"guarantee must be one of {budget.GUARANTEES}, got {guarantee!r}")
  if not unbiased and density is None:
    raise ValueError("unbiased=False is a density-mode option: an (epsilon, delta) guarantee "
                     "needs the unbiased estimate")
  budget.check_sample_sizes(base_rate, min_base, max_fraction)
  if certain_slice is None:
    certain_slice = min_base
  elif proposal is None:
    raise ValueError("certain_slice shapes a code proposal's base: give a proposal, got None")
  if not isinstance(certain_slice, int) or certain_slice < 1:
    raise ValueError(f"certain_slice must be an int >= 1, got {certain_slice!r}")
  if not mix > 0:
    raise ValueError(f"mix must be > 0 (every token needs a positive probability), got {mix!r}")
  check_window(sinks, local)
  pred = (predictors.oracle() if proposal is None else proposal).scorer(
      sinks, local, norms=proposal is not None)

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
    capacity, head_dim = keys.shape[2:]
    qg, scores, residual = scored(q, cache, index, pred, sinks, local)
    shape = qg.shape[:3]  # [B, Hkv, G]
    if proposal is None:
      p, temperatures = scores.astype(jnp.float32), (0.0,)  # exact scores rank the top part
    else:
      _, similarity_bits = pred.score_range(shape[2], head_dim)
      p = importance.score_proxy(qg, index.norms, scores, similarity_bits,
                                 pred.key_mean and pred.key_mean(index))
      temperatures = importance.TEMPERATURES
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
    if proposal is not None:
      tau0 = importance.BASE_TEMPERATURE
      pilot = importance.defended(*importance.tempered(p, residual, p_max, (tau0,))[tau0], mix)
      certain = importance.largest_tokens(p, residual, min(capacity, certain_slice))
      base_size = min(capacity, base_size + certain_slice)
    base_pos, base_mask, rho, _ = importance.base_sample(key_base, pilot, residual, m0_want,
                                                         base_size, certain)
    weights = jnp.where(base_mask, 1.0 / jnp.where(base_mask, rho, 1.0), 0.0)
    base_s = budget.selected_scores(qg, cache, base_pos, scores, pred.reads_all_keys)
    if proposal is not None:  # base tokens rank by their exact scores (importance)
      if isinstance(proposal, predictors.Spotlight):  # proxies first put on the scores' scale
        p = importance.calibrated(p, jnp.take_along_axis(p, base_pos, -1), base_s, base_mask)
      p = importance.sharpened(p, base_pos, base_mask & ((rho >= 1.0) | (density is not None)),
                               base_s)
      p_max = importance.largest(p, residual)
    weights_by_tau = importance.tempered(p, residual, p_max, temperatures)
    terms = [budget.base_terms(base_s, base_mask, weights, values, base_pos, (out_f, lse_f), g)
             for g in ((guarantee, "denominator") if guarantee == "output" else (guarantee,))]
    m0 = jnp.sum(base_mask, -1)
    proxies = split_policy.Proxies(p, residual, p_max, weights_by_tau, temperatures, mix)
    base = split_policy.BaseSample(base_pos, rho, base_mask, [y for y, _ in terms])
    if density is None:
      limit = max_fraction * n_sf
      policy = split_policy.choose(proxies, base, target_vars=[
          jnp.where(target > 0, (scale * target)**2, 0.0) for (_, target), scale in zip(
              terms, target_scales)], cap=limit, min_uniform=min_base)
      size = importance.list_size(max_fraction, capacity)
    else:
      limit = jnp.clip(jnp.ceil(density * length.astype(jnp.float32))[:, None, None]
                       - exact_count, 0.0, n_sf)
      policy = split_policy.choose(proxies, base, size=limit, unbiased=unbiased,
                                 d_hat=terms[1][1] if guarantee == "output" else None)
      size = importance.list_size(density, capacity)
    sample = importance.residual_estimate(
        q, cache, p, residual, policy, importance.proposal(policy, weights_by_tau, mix), limit,
        key_final, size, oversample=density is None)
    # The exact expected size above the base's estimate (c lowered) is a clip too.
    clipped = policy.clipped | (sample.lowered & (density is None)) | (sample.overflow > 0)
    out, lse = combine_lse([out_f, sample.out], [lse_f, sample.lse])

    taken = jnp.sum(sample.mask, -1).astype(jnp.float32)
    top = sample.top.astype(jnp.float32)
    read = exact_count + taken + m0.astype(jnp.float32) - budget.overlap(
        base_pos, base_mask, sample.positions, sample.mask, capacity)
    return make_result(
        q, out, lse, exact_count + taken, cache, over,
        scoring.nonfinite_keys(pred, index, scores, length), topk=top, residual=n_sf,
        base=m0.astype(jnp.float32), budget=taken - top,
        budget_clipped=clipped, read=read,
        read_all_keys=jnp.full(shape, pred.reads_all_keys),
        temperature=jnp.where(policy.uniform, 0.0, policy.tau),
        expected=sample.expected, selected_overflow=sample.overflow.astype(jnp.float32))

  return Estimator(init, pred.append, attend)
