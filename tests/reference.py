"""Float64 numpy references for the tests (independent of the code under test)."""

from __future__ import annotations

import math

import numpy as np


def f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32).astype(np.float64) if not isinstance(
      x, np.ndarray) or x.dtype != np.float64 else x


def subset_attention(q, keys, values, positions, log_weights=None):
  """Attention of one query over the given token positions, in float64.

  Args:
    q: ``[D]``; keys, values: ``[S, D]``; positions: int sequence (no duplicates);
    log_weights: per position, ``log w`` (the token's score becomes ``s - log w``).

  Returns:
    ``(out [D], lse)``; ``(0, -inf)`` for an empty set.
  """
  q, keys, values = f64(q), f64(keys), f64(values)
  positions = np.asarray(positions, dtype=np.int64)
  if positions.size == 0:
    return np.zeros(q.shape[-1]), -np.inf
  s = keys[positions] @ q / math.sqrt(q.shape[-1])
  if log_weights is not None:
    s = s - np.asarray(log_weights, np.float64)
  m = s.max()
  e = np.exp(s - m)
  return e @ values[positions] / e.sum(), m + math.log(e.sum())


def dense_attention(q, keys, values, length):
  """``q [B, Hq, D]``, ``keys/values [B, Hkv, S, D]``, ``length [B]`` -> (out, lse)."""
  q = f64(q)
  batch, num_q, head_dim = q.shape
  group = num_q // keys.shape[1]
  out = np.zeros((batch, num_q, head_dim))
  lse = np.zeros((batch, num_q))
  for b in range(batch):
    for h in range(num_q):
      out[b, h], lse[b, h] = subset_attention(
          q[b, h], keys[b, h // group], values[b, h // group], range(int(length[b])))
  return out, lse


def binomial_tail(p: float, L: int, m: int) -> float:
  """``P(Binomial(L, p) >= m)`` summed from the upper side (no cancellation)."""
  return math.fsum(math.comb(L, j) * p**j * (1 - p)**(L - j) for j in range(m, L + 1))


def inclusion_probability(cos: float, K: int, L: int, m: int) -> float:
  theta = math.acos(min(1.0, max(-1.0, cos)))
  return binomial_tail((1 - theta / math.pi)**K, L, m)


def exact_set(length: int, sinks: int, local: int) -> list[int]:
  return sorted(set(range(min(sinks, length))) | set(range(max(length - local, 0), length)))


def relative_error(a, b) -> np.ndarray:
  a, b = f64(a), f64(b)
  return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def monte_carlo_bias(outs, lses, exact_out, exact_lse):
  """Unbiasedness of an estimator's denominator and numerator over trials (axis 0 of
  ``outs [T, ..., dv]`` and ``lses [T, ...]``), against the exact output and log-sum-exp.

  Returns:
    ``(deviation, se, z)``: the mean of ``D_hat / D`` less 1 and its standard error per
    query, and the z-score of each component of the mean ``N_hat / D`` against ``N / D``.
  """
  trials = outs.shape[0]
  ratio = np.exp(f64(lses) - f64(exact_lse))
  num = ratio[..., None] * f64(outs)
  se = ratio.std(0, ddof=1) / np.sqrt(trials)
  z = (num.mean(0) - f64(exact_out)) / (num.std(0, ddof=1) / np.sqrt(trials))
  return ratio.mean(0) - 1, se, z
