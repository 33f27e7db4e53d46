r"""Proxies and samplers of vAttention's importance-sampling residual
(``sa.vattention_importance``; derivations and measurements: ``docs/importance.md``).

**Proxies.** Each residual token ``i`` (valid, outside the sinks and the local window) has a
proxy :math:`p_i` of its score :math:`s_i = q \cdot k_i / \sqrt D` from the proposal's codes and
one stored key norm (``score_proxy``): the fraction :math:`h_i` of matching code bits estimates
the angle :math:`\theta_i = \pi (1 - h_i)` between the query and the hashed key, so
:math:`p_i = (\|q\| \|k_i - \mu\| \cos\theta_i + q \cdot \mu) / \sqrt D`, where SimHash hashes
keys centred on :math:`\mu` (Spotlight: :math:`\mu = 0`). Per token and KV head that is the
code plus a bfloat16 norm; nothing reads every key. ``b`` SimHash bits give the angle with a
standard error of about :math:`\pi \sqrt{h (1 - h) / b}`, hence 1024 bits by default.

**Candidates.** A threshold :math:`t` (tokens with :math:`p_i \ge t` form the *top part*,
attended exactly with weight 1) and a sampler for the rest :math:`R_t` (:math:`n_r` tokens):

* *uniform* (temperature 0): ``b`` tokens drawn uniformly without replacement from
  :math:`R_t`, weight :math:`n_r / b`;
* *Poisson* (temperature :math:`\tau > 0`): token ``i`` enters independently with probability
  :math:`\pi_i = \min(1, c\,(a_i + \lambda \bar a))`, :math:`a_i = e^{\tau (p_i - \max p)}`,
  weight :math:`1/\pi_i` (Horvitz-Thompson); :math:`\lambda` (``mix``) is a defensive uniform
  share, so no probability falls below :math:`c \lambda \bar a`.

The temperatures are ``TEMPERATURES``; ``sparse_attn._src.split_policy`` picks a head's candidate
and size on the base sample.

**Unbiasedness.** The final draw uses fresh uniforms, independent of the base sample that
chose the candidate and its size; given those, both samplers give :math:`E \hat Y =
\sum_R y_i` for every :math:`y` (every :math:`\pi_i > 0`).

**Base sample.** ``m0`` tokens drawn by Poisson sampling with probabilities :math:`\rho_i`
from a pilot proposal (``BASE_TEMPERATURE``, ``base_sample``), and a *certain slice* of the
``certain_slice`` tokens of largest proxy with :math:`\rho_i = 1` (``largest_tokens``), all
read exactly. Residual totals of a per-token ``f`` are estimated as
:math:`\sum_{\text{base}} f_i / \rho_i`, with variance estimate
:math:`\sum (1 - \rho_i) f_i^2 / \rho_i^2`. The base's exact scores replace their tokens'
proxies (``sharpened``: under ``(epsilon, delta)`` only where :math:`\rho_i = 1`, since the
others also stand for unread tokens); Spotlight's proxies are first mapped onto the scores'
scale by the least-squares line through the base (``calibrated``).

**The draw.** ``residual_estimate`` lowers :math:`c` until a Poisson head's exact expected
size is within the limit (a clip under ``(epsilon, delta)``), so the static list does not
overflow. Every draw (base and final) is a Poisson draw by counter-based uniforms
(``poisson_draw``): the CPU path and the kernels draw the same sample, without a sort.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import backend, poisson_positions
from sparse_attn._src import selection
from sparse_attn.attention import attend_rows

TEMPERATURES = (0.0, 0.5, 1.0)
BASE_TEMPERATURE = 0.5  # the pilot proposal that draws the base sample


def score_proxy(qg: jax.Array, norms: jax.Array, similarity: jax.Array, bits: int,
                key_mean: jax.Array | None = None) -> jax.Array:
  """Estimated scores ``p [B, Hkv, G, S]`` from code similarities.

  Args:
    qg: ``float32 [B, Hkv, G, D]`` queries.
    norms: ``[B, Hkv, S]`` the norm of each hashed key (a predictor state's ``norms``).
    similarity: ``int [B, Hkv, G, S]`` matching bits (summed over the group for Spotlight;
      ``bits`` counts them all); negative for tokens not hashed yet, which get ``p = 0``.
    bits: the largest similarity.
    key_mean: ``[B, Hkv, D]`` the mean the keys were centred on before hashing (SimHash),
      or None.
  """
  frac = similarity.astype(jnp.float32) / bits
  cos = jnp.where(similarity >= 0, jnp.cos(math.pi * (1.0 - frac)), 0.0)
  q_norm = jnp.linalg.norm(qg, axis=-1, keepdims=True)
  p = q_norm * norms[:, :, None, :].astype(jnp.float32) * cos
  if key_mean is not None:  # SimHash hashed k - mu: add q . mu back
    p = p + jnp.einsum("bhgd,bhd->bhg", qg, key_mean)[..., None]
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
  rho = jnp.where(residual, jnp.where(certain, 1.0, jnp.minimum(1.0, c * a)), 0.0)
  draw = poisson_draw(rho, jax.random.bits(key, rho.shape[:-1], jnp.uint32), size)
  return draw.positions, draw.mask, jnp.exp(draw.log_prob), draw.overflow


class Draw(NamedTuple):
  r"""A Poisson draw in a static list (``poisson_draw``): ``positions, mask, log_prob``
  ``[..., size]`` (the kept tokens ascending, a prefix of the list, and their
  :math:`\log \pi`); ``count [...]`` every kept token, ``overflow [...]`` those that did
  not fit."""

  positions: jax.Array
  mask: jax.Array
  log_prob: jax.Array
  count: jax.Array
  overflow: jax.Array


def poisson_draw(prob, seeds, size: int, fallback=None) -> Draw:
  r"""Token ``i`` of each row kept when :math:`u_i < \pi_i` (``prob [..., S]``), with the
  counter-based uniforms of ``pallas_kernels.poisson_positions`` under ``seeds uint32
  [...]``: the same sample on every path. A ``fallback [...]`` row also keeps its token
  of smallest hash among those with :math:`0 < \pi < 1` (at a uniform rate: one token,
  where the draw kept none of them). The kernels
  (a counting pass, a writing pass) where they are used; else the jnp predicate and
  ``selection.compact``.
  """
  lead, capacity = prob.shape[:-1], prob.shape[-1]
  fallback = jnp.zeros(lead, bool) if fallback is None else jnp.broadcast_to(fallback, lead)
  if backend.use_kernels("poisson_positions") and not backend.mosaic_layout(None):
    flat = lambda x: x.reshape((lead[0], -1) + x.shape[len(lead):])  # noqa: E731
    positions, log_prob, count = poisson_positions.poisson_positions_kernel(
        flat(prob), flat(seeds), flat(fallback), size)
    positions, log_prob, count = (x.reshape(lead + x.shape[2:]) for x in (
        positions, log_prob, count))
    mask = jnp.arange(size, dtype=jnp.int32).reshape((1,) * len(lead) + (size,)) < (
        jnp.minimum(count, size)[..., None])
    positions = jnp.where(mask, positions, 0)  # legal positions, as compact's
  else:
    pos = jnp.arange(capacity, dtype=jnp.int32).reshape((1,) * len(lead) + (capacity,))
    bits = poisson_positions.counter_bits(seeds[..., None], pos)
    kept = poisson_positions.uniform(bits) < prob
    rest = (prob > 0.0) & (prob < 1.0)
    rest_min = jnp.min(jnp.where(rest, bits, jnp.uint32(0xFFFFFFFF)), -1)
    kept = kept | (fallback[..., None] & rest & (bits == rest_min[..., None]))
    count = jnp.sum(kept, -1, dtype=jnp.int32)
    positions, mask, _ = selection.compact(kept, size)
    log_prob = jnp.log(jnp.take_along_axis(prob, positions, -1))
  return Draw(positions, mask, jnp.where(mask, log_prob, 0.0), count,
              jnp.maximum(count - size, 0))


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


class ResidualSample(NamedTuple):
  """The residual's estimate: ``out, lse``, the weighted partial result; ``positions, mask``
  ``[B, Hkv, G, size]``, the sample; ``top``, its certain (top part) tokens; ``overflow``,
  tokens that did not fit the list; ``expected``, the expected sample size; ``lowered``,
  whether ``c`` was lowered to fit the limit."""

  out: jax.Array
  lse: jax.Array
  positions: jax.Array
  mask: jax.Array
  top: jax.Array
  overflow: jax.Array
  expected: jax.Array
  lowered: jax.Array


def residual_estimate(q, cache, p, residual, policy, a, limit, key, size: int,
                      oversample: bool = True):
  """Fits a Poisson head's expected size, draws the residual sample by the policy and
  attends over it.

  The base only estimated a Poisson head's expected size: ``c`` is lowered until the exact
  one, ``E(c) = sum_R min(1, c a_i)`` (top part included), is within ``limit [...]``. ``E``
  is concave in ``c`` with ``E(0) = k`` (the top part), so ``c <- c (limit - k) / (E(c) -
  k)`` never undershoots; three steps.

  One Poisson draw for both kinds of head (``poisson_draw``, no sort): a Poisson head keeps
  token ``i`` when ``u_i < pi_i`` (weight ``1 / pi_i``); a uniform head keeps its top part
  and each other token at the rate ``r = (b + sqrt(b)) / n_r`` (``oversample``; else
  ``b / n_r``). Given its size ``m``, that draw is a uniform sample of ``m`` without
  replacement, weighted ``n_r / m``; an empty draw keeps the token of smallest hash, a
  uniform sample of 1 (``docs/importance.md``: exactly unbiased, and the guarantee at
  ``b`` holds on average over ``m``).

  Args:
    p: ``[B, Hkv, G, S]`` proxies; ``residual``: bool, same shape.
    policy: from ``split_policy.choose``; ``a``: from ``proposal``.
    size: the static list size.
    oversample: the uniform heads' rate ``(b + sqrt(b)) / n_r`` (under a guarantee), else
      ``b / n_r`` (a fixed density).

  Returns:
    A ``ResidualSample``.
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
  n_r = jnp.sum(residual & ~above, -1).astype(jnp.float32)  # the rest, below the threshold
  rate = jnp.minimum(1.0, (b + (jnp.sqrt(b) if oversample else 0.0)) / jnp.maximum(n_r, 1.0))
  uniform = policy.uniform[..., None]
  prob = jnp.where(residual, jnp.where(uniform, jnp.where(above, 1.0, rate[..., None]), pi),
                   0.0)
  draw = poisson_draw(prob, jax.random.bits(key, p.shape[:-1], jnp.uint32), size,
                      fallback=policy.uniform)
  # Uniform heads: given its size m, the rest's draw is a uniform sample of m without
  # replacement: weight n_r / m (log_prob < 0: drawn at the rate, not certain).
  drawn = draw.mask & (draw.log_prob < 0.0)
  m = jnp.sum(drawn, -1).astype(jnp.float32)
  log_w = jnp.where(uniform & drawn, jnp.log(jnp.maximum(m, 1.0) / jnp.maximum(n_r, 1.0))[
      ..., None], draw.log_prob)
  out, lse = attend_rows(q, cache, draw.positions, jnp.sum(draw.mask, -1, dtype=jnp.int32),
                         log_w)
  expected = jnp.where(policy.uniform, top.astype(jnp.float32) + rate * n_r,
                       jnp.sum(jnp.where(residual, pi, 0.0), -1))
  return ResidualSample(out, lse, draw.positions, draw.mask, top, draw.overflow, expected,
                        lowered)


def list_size(fraction: float, capacity: int) -> int:
  """A static list that holds a Poisson sample of expected size ``fraction * capacity``
  (six standard deviations of slack)."""
  mean = fraction * capacity
  return min(capacity, math.ceil(mean + 6 * math.sqrt(mean) + 16))
