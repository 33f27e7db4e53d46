"""Top-k predictors (oracle, SimHash Hamming similarity) and oracle top-p."""

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa
from sparse_attn import hash_heads, lsh, predictors, synthetic
from tests import reference as ref


def problem(lengths=(1024, 700)):
  return synthetic.llm_like(jax.random.PRNGKey(0), batch=len(lengths), num_kv_heads=2, group=2,
                            capacity=1024, head_dim=32, length=jnp.array(lengths, jnp.int32),
                            query_scale=0.7)


def test_hamming_similarity_counts_equal_bits():
  rng = np.random.default_rng(0)
  q = rng.integers(0, 2**32, size=(3, 2, 4), dtype=np.uint64).astype(np.uint32)
  k = rng.integers(0, 2**32, size=(3, 50, 4), dtype=np.uint64).astype(np.uint32)
  got = np.asarray(hash_heads.hamming_similarity(jnp.asarray(q), jnp.asarray(k), 128))
  bits = lambda x: np.unpackbits(x.view(np.uint8), axis=-1)  # noqa: E731
  want = (bits(q)[:, :, None, :] == bits(k)[:, None, :, :]).sum(-1)
  np.testing.assert_array_equal(got, want)


def test_simhash_topk_keeps_the_best_hamming_ranks_and_attends_exactly():
  q, cache = problem()
  k, sinks, local = 30, 4, 16
  est = sa.topk(k=k, sinks=sinks, local=local, predictor=sa.predictors.simhash(bits=64))
  state = est.init(cache, jax.random.PRNGKey(1))
  res = est.attend(q, cache, state, None)
  q_codes = np.asarray(lsh.simhash(q, state.planes, 32, 2))
  codes = np.asarray(state.codes)
  qq, keys, values = ref.f64(q), ref.f64(cache.keys), ref.f64(cache.values)
  for b, n in enumerate(np.asarray(cache.length)):
    exact = ref.exact_set(int(n), sinks, local)
    residual = np.array([i for i in range(n) if i not in set(exact)])
    for h in range(4):
      diff = np.bitwise_xor(q_codes[b, h], codes[b, h // 2, residual])
      sim = 64 - np.unpackbits(diff.view(np.uint8), axis=-1).sum(-1)
      # lax.top_k breaks ties by the lower index, like a stable sort of -sim.
      top = residual[np.argsort(-sim, kind="stable")[:k]]
      out, lse = ref.subset_attention(qq[b, h], keys[b, h // 2], values[b, h // 2],
                                      exact + top.tolist())
      assert ref.relative_error(res.out[b, h], out) <= 1e-5
      assert abs(float(res.lse[b, h]) - lse) <= 1e-4
  assert not bool(jnp.any(res.stats["read_all_keys"]))


def test_simhash_append_matches_hashing_from_scratch():
  q, full = problem()
  prefill = full._replace(length=jnp.array([900, 600], jnp.int32))
  pred = predictors.simhash(bits=64).scorer(4, 64)
  state = pred.append(pred.init(prefill, jax.random.PRNGKey(2)), full)
  centred = full.keys - state.key_mean[:, :, None, :]
  want = np.asarray(lsh.simhash(centred, state.planes, 32, 2))
  for b, n in enumerate((1024, 700)):
    np.testing.assert_array_equal(np.asarray(state.codes[b, :, :n]), want[b, :, :n])
  np.testing.assert_array_equal(np.asarray(state.length), [1024, 700])
  del q


def test_topp_is_the_smallest_set_with_enough_mass():
  q, cache = problem()
  p = 0.8
  res = sa.topp(p).attend(q, cache, (), None)
  qq, keys, values = ref.f64(q), ref.f64(cache.keys), ref.f64(cache.values)
  for b, n in enumerate(np.asarray(cache.length)):
    for h in range(4):
      s = keys[b, h // 2, :n] @ qq[b, h] / np.sqrt(32)
      order = np.argsort(-s)
      mass = np.cumsum(np.exp(s[order] - s.max())) / np.exp(s - s.max()).sum()
      size = int(np.searchsorted(mass, p) + 1)
      out, _ = ref.subset_attention(qq[b, h], keys[b, h // 2], values[b, h // 2], order[:size])
      assert int(res.stats["selected"][b, h]) == size
      assert ref.relative_error(res.out[b, h], out) <= 1e-5
