"""``pallas_kernels.poisson_positions``: the kernels (interpret mode) equal their reference,
the counter-based uniforms are uniform and independent, and the hash is a bijection."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import poisson_positions as pp


def problem(dtype=jnp.float32):
  """Rows that keep many, few, all-certain, nothing (fallback or not) and past the list."""
  rng = np.random.default_rng(0)
  prob = rng.random((2, 3, 1333)) * 0.05  # 1333: not a multiple of the blocks
  prob[0, 0] = 0.0
  prob[0, 0, 100:200] = 1e-6  # almost surely keeps nothing: the fallback picks one
  prob[0, 1] = prob[0, 0]  # the same without a fallback: nothing
  prob[0, 2, 500:520] = 1.0  # a fallback row with certain tokens: it picks one beside them
  prob[1, 1, :50] = 1.0  # certain tokens beside a sample
  prob[1, 2] = 0.5  # ~666 kept: past a list of 100
  seeds = rng.integers(0, 2**32, (2, 3), dtype=np.uint64).astype(np.uint32)
  fallback = np.array([[True, False, True], [False, True, True]])
  return (jnp.asarray(prob, dtype), jnp.asarray(seeds), jnp.asarray(fallback))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("size,block", [(100, 256), (1333, 512)])
def test_kernel_equals_reference(dtype, size, block):
  prob, seeds, fallback = problem(dtype)
  want = pp.poisson_positions_reference(prob.astype(jnp.float32), seeds, fallback, size)
  got = pp.poisson_positions_kernel(prob, seeds, fallback, size, block=block, interpret=True)
  count = np.asarray(want[2])
  np.testing.assert_array_equal(np.asarray(got[2]), count)
  assert count[0, 0] == 1 and count[0, 1] == 0 and count[1, 2] > 100  # the rows' cases
  for i in np.ndindex(count.shape):
    n = min(count[i], size)
    np.testing.assert_array_equal(np.asarray(got[0])[i][:n], np.asarray(want[0])[i][:n])
    np.testing.assert_array_equal(np.asarray(got[1])[i][:n], np.asarray(want[1])[i][:n])
  # The reference against float64 numpy: u < prob, positions ascending, log prob.
  p64 = np.asarray(prob.astype(jnp.float32), np.float64)
  u = np.asarray(pp.uniform(pp.counter_bits(seeds[..., None], jnp.arange(1333)[None, None])),
                 np.float64)
  kept = u < p64
  for i in [(1, 0), (1, 1), (1, 2)]:
    pos = np.flatnonzero(kept[i])
    assert count[i] == len(pos)
    n = min(len(pos), size)
    np.testing.assert_array_equal(np.asarray(want[0])[i][:n], pos[:n])
    np.testing.assert_allclose(np.asarray(want[1])[i][:n], np.log(p64[i][pos[:n]]), rtol=1e-6)
  # The fallback row keeps the token of smallest hash among those with 0 < prob < 1.
  bits = np.asarray(pp.counter_bits(seeds[0, 0], jnp.arange(1333)))
  assert int(want[0][0, 0, 0]) == 100 + int(np.argmin(bits[100:200]))
  # Beside its draw, a fallback row keeps its smallest hash of 0 < prob < 1 (once).
  rest = (p64[0, 2] > 0) & (p64[0, 2] < 1)
  bits = np.asarray(pp.counter_bits(seeds[0, 2], jnp.arange(1333)))
  pick = np.flatnonzero(rest)[np.argmin(bits[rest])]
  pos = np.flatnonzero(kept[0, 2] | (np.arange(1333) == pick))
  assert count[0, 2] == len(pos) and set(range(500, 520)) <= set(pos)
  np.testing.assert_array_equal(np.asarray(want[0])[0, 2][:min(len(pos), size)],
                                pos[:size])


def test_counter_bits_are_a_bijection_of_the_position():
  bits = np.asarray(pp.counter_bits(jnp.uint32(12345), jnp.arange(1 << 20)))
  assert len(np.unique(bits)) == 1 << 20


def test_counter_uniforms_are_uniform_and_independent():
  # 2000 seeds x 4096 positions. Each position's mean over seeds: |z| <= 5 (false alarm
  # ~2e-3 over the 4096 positions); lag-1 correlation along positions and across adjacent
  # seeds within 5 standard errors (1/sqrt(n)); the histogram of 64 bins chi-square.
  seeds = jnp.arange(2000, dtype=jnp.uint32)[:, None] * jnp.uint32(7919)
  u = np.asarray(pp.uniform(pp.counter_bits(seeds, jnp.arange(4096)[None, :])), np.float64)
  z = (u.mean(0) - 0.5) / math.sqrt(1 / 12 / 2000)
  assert np.abs(z).max() <= 5
  c = u - 0.5
  for a, b in ((c[:, 1:], c[:, :-1]), (c[1:], c[:-1])):
    corr = (a * b).mean() / (1 / 12)
    assert abs(corr) <= 5 / math.sqrt(a.size), corr
  counts = np.histogram(u, bins=64, range=(0, 1))[0]
  expected = u.size / 64
  chi2 = ((counts - expected)**2 / expected).sum()
  assert chi2 <= 63 + 5 * math.sqrt(2 * 63), chi2  # chi-square(63): 5 sd, false alarm < 1e-4
