r"""Uniform random sampling of the residual with Horvitz-Thompson weights (a baseline).

Each residual token enters independently with probability ``rate`` (Poisson/Bernoulli
sampling) and weight ``1/rate``; the exact set (sinks + local) is attended exactly. The
numerator and denominator are unbiased; the output is their ratio. It is the baseline that
importance sampling (MagicPIG) must beat at the same density.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparse_attn._src import selection
from sparse_attn.attention import attend_rows, combine_lse, make_result
from sparse_attn.streaming import check_window, exact_part, residual_mask
from sparse_attn.types import Estimator, check_key, check_query, keep_index, no_index
from sparse_attn.types import configured, within_capacity


@configured
def uniform(rate: float, sinks: int = 4, local: int = 64) -> Estimator:
  """Bernoulli(``rate``) sampling of the residual, weights ``1/rate``.

  One sample per KV head, shared by its GQA group. The static buffer holds
  ``rate*S + 6*sqrt(rate*S) + 16`` tokens (the sample size exceeds it with probability
  below 1e-9); ``stats["selected_overflow"]`` counts any excess. ``attend`` consumes its
  ``key`` (the sample; required); ``init`` draws nothing.

  Args:
    rate: inclusion probability of each residual token, in (0, 1].
    sinks, local: sizes of the exact set.
  """
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"rate must be in (0, 1], got {rate!r}")
  check_window(sinks, local)

  def attend(q, cache, index, key=None):
    del index
    check_query(q, cache)
    check_key(key, purpose="sa.uniform's attend draws its sample from it")
    return _attend(q, cache, key)

  @jax.jit
  def _attend(q, cache, key):
    cache, over = within_capacity(cache)
    keys, values, length = cache
    batch, num_kv_heads, capacity, _ = keys.shape
    size = min(capacity, math.ceil(rate * capacity + 6 * math.sqrt(rate * capacity) + 16))
    positions = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
    u = jax.random.uniform(key, (batch, num_kv_heads, capacity))
    keep = (u < rate) & residual_mask(positions, length, sinks, local)
    sel, sel_mask, overflow = selection.compact(keep, size)
    out_s, lse_s = attend_rows(q, cache, sel, jnp.sum(sel_mask, axis=-1, dtype=jnp.int32))
    lse_s = lse_s - math.log(rate)  # every sampled token has weight 1/rate
    out_e, lse_e, exact = exact_part(q, cache, sinks, local)
    out, lse = combine_lse([out_e, out_s], [lse_e, lse_s])
    sampled = jnp.broadcast_to(jnp.sum(sel_mask, -1)[:, :, None], lse.shape).astype(jnp.float32)
    return make_result(q, out, lse, exact + sampled, cache, over, sampled=sampled,
                       selected_overflow=jnp.broadcast_to(overflow[:, :, None], lse.shape)
                       .astype(jnp.float32))

  return Estimator(no_index, keep_index, attend)
