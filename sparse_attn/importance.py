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
head that is the code plus a bfloat16 norm (2 bytes): 130 bytes with the SimHash proposal's
1024 bits, 18 with Spotlight's ``D = 128`` learned bits, against ``2 D = 256`` (bfloat16) or
``4 D = 512`` (float32) bytes for the key alone. Nothing reads every key.

**Code length.** ``b`` SimHash bits give the angle with a standard error of about
:math:`\pi \sqrt{h (1 - h) / b}` (0.14 rad at 90 degrees for ``b = 128``), so the proxy errs
by about :math:`\|q\| \|k - \mu\| \sin\theta` times that, over :math:`\sqrt D`: 1.2 for
128 bits on the LLM-shaped synthetic heads at query scale 0.5, whose bulk scores have a
standard deviation of 0.75 (the proxy is mostly noise there), 0.42 for 1024. Hence
``SIMHASH_PROPOSAL_BITS``; ``bits=`` trades it for memory. Relative output errors at 2% / 5%
density (``python -m sparse_attn equal-density`` cells, 128 against 1024 bits): synthetic
scale 0.5, 0.155 / 0.096 against 0.112 / 0.068; scale 1, 0.074 / 0.039 against 0.024 /
0.013; reference model layers 2 / 3 at 5% with ``unbiased=False``, 0.247 / 0.308 against
0.216 / 0.257 (512 bits: 0.118 / 0.071 at scale 0.5, 0.221 / 0.264 on the model). MagicPIG
holds ``K L`` = 800 to 1500 bits per token at those densities. The 128K decode step on 2 CPU
cores (``python -m sparse_attn bench``, ``(0.05, 0.05)``) took 1.01x / 1.04x / 1.13x
vAttention's time with 128 / 512 / 1024 bits (one run).

**Candidates.** A threshold :math:`t` (tokens with :math:`p_i \ge t` form the *top part*,
attended exactly with weight 1) and a sampler for the rest :math:`R_t` (:math:`n_r` tokens):

* *uniform* (temperature 0): ``b`` tokens drawn uniformly without replacement from
  :math:`R_t`, weight :math:`n_r / b` (the estimate of ``sparse_attn.vattention``);
* *Poisson* (temperature :math:`\tau > 0`): token ``i`` enters independently with probability
  :math:`\pi_i = \min(1, c\,(a_i + \lambda \bar a))`, :math:`a_i = e^{\tau (p_i - \max p)}`,
  weight :math:`1/\pi_i` (Horvitz-Thompson). :math:`\lambda` (``mix``) is a defensive uniform
  share (:math:`\bar a` the mean of :math:`a` over the residual): no probability falls below
  :math:`c \lambda \bar a`, so a token the codes misjudge cannot blow up the variance.

The temperatures are ``TEMPERATURES``; which candidate a head takes, and how large its sample
is, is ``sparse_attn.split_policy``'s choice, made on the base sample below.

**Unbiasedness.** The final draw uses fresh uniforms, independent of the base sample that
chose the candidate and its size; given those, both samplers give :math:`E \hat Y =
\sum_R y_i` for every :math:`y` (every :math:`\pi_i > 0`), so the numerator and the
denominator are unbiased (the output is their ratio).

**Base sample.** ``m0`` tokens (``base_rate`` of the residual, at least ``min_base``) drawn by
Poisson sampling with probabilities :math:`\rho_i` from a pilot proposal
(``BASE_TEMPERATURE``, ``base_sample``), and beside them a *certain slice*: the
``certain_slice`` (default ``min_base``) tokens of largest proxy, with :math:`\rho_i = 1`
(``largest_tokens``). All are read exactly.
Residual totals of any per-token quantity ``f`` are estimated as
:math:`\sum_{\text{base}} f_i / \rho_i` (unbiased), with the estimated variance
:math:`\sum (1 - \rho_i) f_i^2 / \rho_i^2`. A uniform base of a heavy-tailed head usually
misses the few tokens that dominate the variance, and its variance estimate is then far too
small (the failure of the uniform residual with the SimHash predictor). The pilot proposal
puts more base tokens where the codes expect large scores; the certain slice makes sure of
the likeliest ones, and with their exact scores (below) the top part holds them. On the
reference model's real attention (1K tokens, where the slice doubles the base) the slice
took the SimHash proposal's output guarantee on layers 2-3 from 14.1% / 11.6% failures to
7.8% / 6.2% (bound about 9%), and its least-error estimate at 2% density from 0.63 / 0.69 to
0.52 / 0.56 (``benchmarks/eval_vattention_guarantee.py``, ``python -m sparse_attn
equal-density``; 128 SimHash bits). By default it is ``min_base`` tokens and not ``m0``: at
128K tokens a slice of ``m0`` (2,600, then picked by bisection) made the decode step 1.7x
vAttention's time; 128 tokens by ``lax.top_k`` keep it at 1.1x. The Spotlight proposal's
coarser proxies (the reference model's ``D = 32`` learned bits) need more on real attention:
with 128, layer 3 fails its output guarantee (11.5% against a bound of 10.7%); with
``certain_slice=512`` every layer holds (2.4 / 4.0 / 4.4 / 2.8%) and the errors on layers 2-3
fall from 0.20 / 0.22 to 0.073 / 0.099, at half the context read (1K tokens).

**Exact scores of the base (SimHash).** The base reads its tokens' keys, so their proxies are
replaced by their exact scores (``sharpened``) before the policy: the top part and the
proposals then rank them exactly. The final draw stays unbiased whatever the base changed (it
only fixes the design that the fresh uniforms then draw from). The SimHash proxy estimates
the score itself. Spotlight's learned codes give an angle that is not on the scores' scale
(mixed in as they are, the base tokens outranked every other token on the synthetic heads:
error 0.62 against 0.12 at 2%), so its proxies are first mapped onto it by the least-squares
line from the base's proxies to their exact scores (``calibrated``; for SimHash the same fit
helped some cells and hurt others, and is not used). Under
``(epsilon, delta)`` only the tokens the base drew with probability 1 are replaced: each of
the others also stands for residual tokens the base did not read, whose proxies the variance
estimates must keep. ``density`` claims no bound and replaces them all.

**The draw.** The base only estimates a Poisson head's expected size: ``residual_estimate``
lowers :math:`c` until the exact expected size over every residual token is within the limit
(under ``(epsilon, delta)`` that is flagged as a clip), so the static sample list does not
overflow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparse_attn import selection
from sparse_attn.attention import attend_rows

PROPOSALS = ("uniform", "simhash", "spotlight")
TEMPERATURES = (0.0, 0.5, 1.0)
BASE_TEMPERATURE = 0.5  # the pilot proposal that draws the base sample
SIMHASH_PROPOSAL_BITS = 1024  # the SimHash proposal's code length (module docstring)


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


def calibrated(p, base_p, exact, mask):
  """The proxies ``p [..., S]`` mapped by the least-squares line from the base's proxies
  ``base_p [..., M]`` to its exact scores ``exact [..., M]`` (where ``mask``), per row; the
  slope is kept >= 0 (0: the proxies carry no information, and every token gets the base's
  mean score)."""
  m = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(m, -1, keepdims=True), 1.0)
  mean_p = jnp.sum(m * base_p, -1, keepdims=True) / count
  mean_s = jnp.sum(m * exact, -1, keepdims=True) / count
  dp = m * (base_p - mean_p)
  var = jnp.sum(dp**2, -1, keepdims=True)
  cov = jnp.sum(dp * (exact - mean_s), -1, keepdims=True)
  slope = jnp.where(var > 0, jnp.maximum(cov, 0.0) / jnp.where(var > 0, var, 1.0), 0.0)
  return mean_s + slope * (p - mean_p)


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


def largest_tokens(p, residual, k: int):
  """``bool [..., S]``: the ``k`` residual tokens of largest ``p [..., S]`` (all of them where
  the residual is smaller). ``lax.top_k``: at 128K tokens 8x faster on the CPU than the
  bisection of ``selection.top``, which a static ``k`` does not need."""
  _, idx = jax.lax.top_k(jnp.where(residual, p, -jnp.inf), k)
  return selection.positions_mask(idx, jnp.take_along_axis(residual, idx, -1), p.shape[-1])


def base_sample(key, a, residual, want, size: int, certain=None):
  r"""The base sample: Poisson with :math:`\rho_i \propto a_i` (``a [..., S]``, the pilot
  proposal, or None for uniform), capped at 1, expected size ``want [...]``; the tokens of
  ``certain [..., S]`` (if given) are drawn with :math:`\rho_i = 1`, beyond ``want``.

  Returns:
    ``(positions, mask, rho, overflow)``: the sample in a static list of ``size``, the
    inclusion probability of each listed token, and the tokens that did not fit.
  """
  certain = jnp.zeros(residual.shape, bool) if certain is None else certain & residual
  a = jnp.where(residual & ~certain, 1.0 if a is None else a, 0.0)
  total = jnp.sum(a, -1, keepdims=True)
  c = want[..., None] / jnp.where(total > 0, total, 1.0)
  # Probabilities capped at 1 lose mass: Newton steps on the concave E(c) = sum min(1, c a)
  # from below put it back (each step lands at or below the root, never past it).
  for _ in range(3):
    capped = c * a >= 1.0
    got = jnp.sum(jnp.where(capped, 1.0, c * a), -1, keepdims=True)
    slope = jnp.sum(jnp.where(capped, 0.0, a), -1, keepdims=True)
    c = c + jnp.where(slope > 0, (want[..., None] - got) / jnp.where(slope > 0, slope, 1.0), 0.0)
  rho = jnp.where(certain, 1.0, jnp.minimum(1.0, c * a))
  u = jax.random.uniform(key, a.shape)
  positions, mask, overflow = selection.compact(residual & (u < rho), size)
  return positions, mask, jnp.take_along_axis(rho, positions, -1), overflow


def defended(a, mean_a, mix):
  """``a + mix * mean(a)``: the proposal with its defensive uniform share."""
  return a + mix * mean_a[..., None]


def proposal(policy, weights: dict, mix):
  """The proposal of each head's chosen temperature (``weights`` from ``tempered``; a
  uniform head's entry is unused), ``[..., S]``."""
  tau = policy.tau[..., None]
  return defended(sum(jnp.where(tau == t, w, 0.0) for t, (w, _) in weights.items()),
                  policy.mean_a, mix)


def inclusion(above, a, log_c):
  r""":math:`\pi` of a Poisson head: 1 at or above the threshold, else ``min(1, c a)``."""
  return jnp.where(above, 1.0, jnp.minimum(1.0, jnp.exp(log_c)[..., None] * a))


def residual_estimate(q, cache, p, residual, policy, a, limit, key, size: int):
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
    policy: from ``split_policy.choose``; ``a``: from ``proposal``.
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
