"""Learned hash heads: the MLP, sign packing, Hamming parity, the Bradley-Terry loss, NNX."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from sparse_attn import hash_heads, synthetic
from tests import reference as ref


def test_init_is_small_gaussian_near_identity():
  params = hash_heads.init_params(jax.random.PRNGKey(0), 4, 64)
  assert params["w"].shape == (4, 2, 64, 64) and params["b"].shape == (4, 2, 64)
  assert abs(float(jnp.std(params["w"])) - 1e-3) < 1e-4
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 10, 64))
  np.testing.assert_allclose(np.asarray(hash_heads.forward(params, x)), np.asarray(x), atol=0.05)


def test_forward_matches_float64_mlp():
  params = {k: v * 300 for k, v in hash_heads.init_params(jax.random.PRNGKey(2), 2, 16).items()}
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 2, 5, 16))
  w, b, h = ref.f64(params["w"]), ref.f64(params["b"]), ref.f64(x)
  silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
  y1 = silu(np.einsum("bhnd,hde->bhne", h, w[:, 0]) + b[None, :, None, 0]) + h
  y = np.einsum("bhnd,hde->bhne", y1, w[:, 1]) + b[None, :, None, 1] + y1
  np.testing.assert_allclose(np.asarray(hash_heads.forward(params, x)), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [64, 40])
def test_pack_signs_is_lsb_first_with_zero_as_negative(d):
  y = jax.random.normal(jax.random.PRNGKey(4), (3, 7, d)).at[0, 0, :5].set(0.0)
  codes = np.asarray(hash_heads.pack_signs(y))
  assert codes.shape == (3, 7, math.ceil(d / 32)) and codes.dtype == np.uint32
  for j in range(d):
    np.testing.assert_array_equal((codes[..., j // 32] >> (j % 32)) & 1, np.asarray(y[..., j] > 0))


@pytest.mark.parametrize("d,group", [(64, 1), (40, 3)])
def test_hamming_similarity_equals_sign_inner_product_parity(d, group):
  # matches = (D + s_a . s_b) / 2 exactly, s = +1 where y > 0 else -1 (zeros included).
  kq, kk = jax.random.split(jax.random.PRNGKey(5))
  yq = jnp.round(jax.random.normal(kq, (2, 2 * group, d)))  # many exact zeros
  yk = jnp.round(jax.random.normal(kk, (2, 2, 30, d)))
  got = np.asarray(hash_heads.hamming_scores(hash_heads.pack_signs(yq),
                                             hash_heads.pack_signs(yk), d))
  sq = np.where(np.asarray(yq) > 0, 1, -1).reshape(2, 2, group, d)
  sk = np.where(np.asarray(yk) > 0, 1, -1)
  want = ((d + np.einsum("bhgd,bhsd->bhgs", sq, sk)) // 2).sum(2)
  assert (np.asarray(yq) == 0).any() and (np.asarray(yk) == 0).any()
  np.testing.assert_array_equal(got, want)


def small_batch(seed=0, length=128):
  return synthetic.hidden_structure(jax.random.PRNGKey(seed), batch=1, num_kv_heads=2, group=2,
                                    length=length, head_dim=16, rank=4)


def test_bradley_terry_loss_gradients_are_finite_and_match_finite_differences():
  q, k = small_batch()
  params = {n: v * 100 for n, v in hash_heads.init_params(jax.random.PRNGKey(6), 2, 16).items()}
  key = jax.random.PRNGKey(7)
  loss = lambda p: hash_heads.bradley_terry_loss(  # noqa: E731
      p, q, k, key, top_fraction=0.1, max_other=32, max_queries=16, gamma=4.0)
  grads = jax.grad(loss)(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["w"]).max()) > 0
  check_grads(loss, (params,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-3)


def test_loss_is_the_mean_softplus_over_top_other_pairs():
  # With all queries, all top keys and many others, the loss approaches the exact mean
  # over (top, other) pairs, computed here in float64 with causal masking.
  q, k = small_batch(length=64)
  params = {n: v * 200 for n, v in hash_heads.init_params(jax.random.PRNGKey(8), 2, 16).items()}
  got = float(hash_heads.bradley_terry_loss(params, q, k, jax.random.PRNGKey(9), top_fraction=0.1,
                                            max_other=4096, max_queries=64, gamma=2.0))
  h = lambda x: 2.0 * x / (1 + np.abs(2.0 * x))  # noqa: E731
  hq = h(ref.f64(hash_heads.forward(params, q.reshape(1, 2, 128, 16)))).reshape(1, 4, 64, 16)
  hk = h(ref.f64(hash_heads.forward(params, k)))
  qq, kk = ref.f64(q), ref.f64(k)
  total, count = 0.0, 0
  for hd in range(4):
    for t in range(9, 64):  # queries with at least 1/top_fraction causal keys
      true = kk[0, hd // 2, :t + 1] @ qq[0, hd, t]
      n_top = math.ceil(0.1 * (t + 1))
      order = np.argsort(-true)
      top, other = order[:n_top], order[n_top:]
      r = hk[0, hd // 2, :t + 1] @ hq[0, hd, t]
      diff = r[top][:, None] - r[other][None, :]
      total += np.log1p(np.exp(-diff)).sum()
      count += diff.size
  assert abs(got - total / count) < 0.03 * total / count


def test_nnx_module_matches_the_pure_functions():
  module = hash_heads.HashHead(2, 16, rngs=nnx.Rngs(params=3))
  params = hash_heads.init_params(jax.random.PRNGKey(3), 2, 16)
  x = jax.random.normal(jax.random.PRNGKey(10), (1, 2, 5, 16))
  np.testing.assert_array_equal(np.asarray(module.params()["w"]).shape, (2, 2, 16, 16))
  np.testing.assert_allclose(np.asarray(module(x)),
                             np.asarray(hash_heads.forward(module.params(), x)), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(module.hash(x)),
                                np.asarray(hash_heads.hash(module.params(), x)))
  assert params["w"].shape == module.params()["w"].shape


def test_validation():
  with pytest.raises(ValueError, match="head_dim must be a positive int"):
    hash_heads.init_params(jax.random.PRNGKey(0), 2, 0)
  with pytest.raises(ValueError, match="hash params must be w"):
    hash_heads.check_params({"w": jnp.zeros((2, 2, 4, 5)), "b": jnp.zeros((2, 2, 4))})
  q, k = small_batch()
  with pytest.raises(ValueError, match="causal training needs one query per key"):
    hash_heads.bradley_terry_loss(hash_heads.init_params(jax.random.PRNGKey(0), 2, 16),
                                  q[:, :, :10], k, jax.random.PRNGKey(0))
