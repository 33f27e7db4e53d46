"""SimHash codes and MagicPIG's collision / inclusion probabilities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import lsh
from tests import reference as ref


@pytest.mark.parametrize("K,L,m,cos,expected", [
    (10, 150, 2, 0.0, 0.00968),
    (10, 150, 2, 0.3, 0.21367),
    (10, 150, 2, 0.5, 0.73555),
    (11, 300, 2, 0.5, 0.86227),
    (10, 150, 1, 0.0, 0.13632),
])
def test_collision_probability_anchors(K, L, m, cos, expected):
  # Anchors from DESIGN.md / the MagicPIG issue, to the 5 digits given.
  got = float(lsh.collision_probability(jnp.float32(cos), K, L, min_collisions=m))
  assert abs(got - expected) <= 1e-5


@pytest.mark.parametrize("K,L,m", [(10, 150, 2), (8, 75, 2), (10, 150, 1), (6, 40, 3)])
def test_collision_probability_matches_float64_everywhere(K, L, m):
  cos = np.linspace(-0.95, 1.0, 400)
  got = np.asarray(lsh.collision_probability(jnp.asarray(cos, jnp.float32), K, L, m))
  want = np.array([ref.inclusion_probability(c, K, L, m) for c in cos])
  # Relative accuracy matters: 1/w becomes an importance weight. float32 arccos limits it.
  ok = want > 1e-30
  np.testing.assert_allclose(got[ok], want[ok], rtol=1e-4)
  assert np.all(np.diff(got) >= -1e-7), "w must not decrease with the cosine"


def test_collision_probability_bf16_and_out_of_range_cos_no_nan():
  cos = jnp.array([-1.0, -1.0001, 0.0, 1.0, 1.0001, 1.01], jnp.bfloat16)
  w = np.asarray(lsh.collision_probability(cos, 10, 150))
  assert np.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
  assert w[-1] == 1.0 and w[0] == 0.0


def test_simhash_bits_are_the_plane_signs_packed_lsb_first():
  K, L, D = 5, 7, 16
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, D))
  w = lsh.planes(jax.random.PRNGKey(1), D, K, L)
  codes = np.asarray(lsh.simhash(x, w, K, L))
  assert codes.dtype == np.uint32 and codes.shape == (3, 4, L)
  proj = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  for l in range(L):
    for i in range(K):
      bit = (codes[..., l] >> i) & 1
      margin = np.abs(proj[..., l * K + i]) > 1e-4  # float32 vs float64 sign agrees here
      np.testing.assert_array_equal(bit[margin], (proj[..., l * K + i] > 0)[margin])
  assert codes.max() < 2**K


@pytest.mark.parametrize("theta", [math.pi / 6, math.pi / 3, math.pi / 2, 2 * math.pi / 3])
def test_per_table_collision_rate_matches_formula_by_monte_carlo(theta):
  # 4000 independent K=4 tables for one pair at angle theta: the collision rate must lie
  # within 3 standard errors of (1 - theta/pi)^K. False-alarm rate 0.27% per angle (fixed seed).
  K, L, D = 4, 4000, 16
  basis = np.linalg.qr(np.random.default_rng(0).normal(size=(D, 2)))[0].T
  x = basis[0]
  y = math.cos(theta) * basis[0] + math.sin(theta) * basis[1]
  w = lsh.planes(jax.random.PRNGKey(42), D, K, L)
  cx = np.asarray(lsh.simhash(jnp.asarray(x, jnp.float32), w, K, L))
  cy = np.asarray(lsh.simhash(jnp.asarray(y, jnp.float32), w, K, L))
  rate = np.mean(cx == cy)
  p = (1 - theta / math.pi)**K
  assert abs(rate - p) <= 3 * math.sqrt(p * (1 - p) / L)
  assert abs(float(lsh.table_collision_probability(jnp.float32(math.cos(theta)), K)) - p) < 1e-6


def test_table_shape_validation():
  with pytest.raises(ValueError, match=r"K \(bits per table\) must be in \[1, 32\]"):
    lsh.collision_probability(0.0, 33, 10)
  with pytest.raises(ValueError, match=r"min_collisions must be in \[1, L=10\]"):
    lsh.collision_probability(0.0, 8, 10, min_collisions=11)
  with pytest.raises(ValueError, match="L must be a Python int|L \\(number"):
    lsh.collision_probability(0.0, 8, 0)
