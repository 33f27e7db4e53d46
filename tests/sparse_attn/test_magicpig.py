"""MagicPIG: exact maths given the codes, unbiasedness over planes, appends, edge cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from pallas_kernels.table_match_counts import unpack_codes
from sparse_attn import lsh, synthetic
from tests import reference as ref
from tests.sparse_attn.test_gpu_path import accelerator_path  # noqa: F401 (a fixture)

SMALL = dict(K=6, L=20, sinks=4, local=16, max_selected=1.0, max_candidates=20.0)


def magicpig_reference(q, cache, index, K, L, m, sinks, local):
  """Float64 MagicPIG estimate given the index's planes, key mean and codes.

  Returns ``(out [B, Hq, D], lse [B, Hq], sampled [B, Hq])``.
  """
  q64 = ref.f64(q)
  keys, values = ref.f64(cache.keys), ref.f64(cache.values)
  codes = np.asarray(unpack_codes(index.codes, K, L)).astype(np.int64)
  mean = ref.f64(index.key_mean)
  q_codes = np.asarray(lsh.simhash(q, index.planes, K, L)).astype(np.int64)
  batch, num_q, head_dim = q.shape
  group = num_q // keys.shape[1]
  out = np.zeros((batch, num_q, head_dim))
  lse = np.zeros((batch, num_q))
  sampled = np.zeros((batch, num_q))
  for b in range(batch):
    n = int(cache.length[b])
    exact = ref.exact_set(n, sinks, local)
    residual = [i for i in range(n) if i not in set(exact)]
    for h in range(num_q):
      kv = h // group
      counts = (codes[b, kv] == q_codes[b, h][None, :]).sum(-1)
      chosen = [i for i in residual if counts[i] >= m]
      centred = keys[b, kv, chosen] - mean[b, kv]
      cos = centred @ q64[b, h] / (np.linalg.norm(centred, axis=-1) * np.linalg.norm(q64[b, h]))
      log_w = [math.log(ref.inclusion_probability(c, K, L, m)) for c in cos]
      out[b, h], lse[b, h] = ref.subset_attention(
          q64[b, h], keys[b, kv], values[b, kv], exact + chosen, [0.0] * len(exact) + log_w)
      sampled[b, h] = len(chosen)
  return out, lse, sampled


def small_problem(seed=0, lengths=(512, 300), capacity=512, head_dim=32, dtype=jnp.float32):
  return synthetic.llm_like(jax.random.PRNGKey(seed), batch=len(lengths), num_kv_heads=2,
                            group=2, capacity=capacity, head_dim=head_dim,
                            length=jnp.array(lengths, jnp.int32), dtype=dtype)


@pytest.mark.parametrize("path", ["tables", "scan", "scan on the accelerator path"])
def test_attend_equals_float64_estimate_given_the_codes(path, request):
  # The accelerator path: kernels interpreted, kept-positions listing, weights in the pass.
  if path.endswith("accelerator path"):
    request.getfixturevalue("accelerator_path")
  q, cache = small_problem()
  est = sa.magicpig(**SMALL, retrieval=path.split()[0])
  index = est.init(cache, jax.random.PRNGKey(1))
  res = est.attend(q, cache, index, None)
  out, lse, sampled = magicpig_reference(q, cache, index, 6, 20, 2, 4, 16)
  assert sampled.min() > 10, "the test must exercise sampling"
  np.testing.assert_array_equal(np.asarray(res.stats["sampled"]), sampled)
  assert ref.relative_error(res.out, out).max() <= 1e-5
  np.testing.assert_allclose(np.asarray(res.lse), lse, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(res.density),
                             (sampled + 20) / np.asarray(cache.length)[:, None], rtol=1e-6)
  for name in ("bucket_overflow", "selected_overflow", "unindexed"):
    assert float(jnp.max(res.stats[name])) == 0.0


def test_key_mean_is_the_mean_prefill_residual_key_and_codes_hash_centred_keys():
  q, cache = small_problem(lengths=(512, 300))
  index = sa.magicpig(**SMALL).init(cache, jax.random.PRNGKey(2))
  keys = ref.f64(cache.keys)
  for b, n in enumerate((512, 300)):
    np.testing.assert_allclose(np.asarray(index.key_mean[b]), keys[b, :, 4:n - 16].mean(1),
                               rtol=1e-5, atol=1e-5)
  centred = cache.keys - index.key_mean[:, :, None, :]
  np.testing.assert_array_equal(np.asarray(unpack_codes(index.codes, 6, 20)),
                                np.asarray(lsh.simhash(centred, index.planes, 6, 20)))
  np.testing.assert_allclose(np.asarray(index.key_norms), np.linalg.norm(
      keys - ref.f64(index.key_mean)[:, :, None, :], axis=-1), rtol=1e-5)
  del q


@pytest.mark.parametrize("tail,rebuilt", [(64, False), (8, True)])
def test_append_hashes_new_tokens_and_retrieves_them(tail, rebuilt):
  q, full = small_problem(lengths=(512, 400))
  prefill = full._replace(length=jnp.array([450, 360], jnp.int32))
  est = sa.magicpig(**SMALL, tail=tail)
  index = est.init(prefill, jax.random.PRNGKey(3))
  index = est.append(index, full)
  np.testing.assert_array_equal(np.asarray(index.length), [512, 400])
  assert bool(jnp.all(index.table_length == full.length)) == rebuilt
  # Appended tokens are hashed with the prefill's key mean, like the prefill's own.
  centred = full.keys - index.key_mean[:, :, None, :]
  want = np.asarray(lsh.simhash(centred, index.planes, 6, 20))
  for b, n in enumerate((512, 400)):
    np.testing.assert_array_equal(np.asarray(unpack_codes(index.codes, 6, 20)[b, :, :n]),
                                  want[b, :, :n])
  res = est.attend(q, full, index, None)
  out, lse, sampled = magicpig_reference(q, full, index, 6, 20, 2, 4, 16)
  np.testing.assert_array_equal(np.asarray(res.stats["sampled"]), sampled)
  assert ref.relative_error(res.out, out).max() <= 1e-5
  np.testing.assert_allclose(np.asarray(res.lse), lse, rtol=1e-5)


def test_tokens_missing_from_the_index_are_reported():
  q, full = small_problem(lengths=(512, 400))
  prefill = full._replace(length=jnp.array([400, 300], jnp.int32))
  est = sa.magicpig(**SMALL)
  res = est.attend(q, full, est.init(prefill, jax.random.PRNGKey(4)), None)
  # Residual ends at length - local; the index covers the prefill only.
  np.testing.assert_array_equal(np.asarray(res.stats["unindexed"][:, 0]),
                                [512 - 16 - 400, 400 - 16 - 300])


@pytest.mark.parametrize("jit", [False, True])
def test_a_small_candidate_buffer_costs_time_not_accuracy(jit):
  # Buckets that do not fit the buffer: the step counts collisions by a scan of every code,
  # so the estimate is the one an unbounded buffer gives, and the overflow is reported.
  q, cache = small_problem()
  small = sa.magicpig(K=6, L=20, local=16, max_selected=1.0, max_candidates=0.05)
  ample = sa.magicpig(K=6, L=20, local=16, max_selected=1.0, max_candidates=20.0)
  runs = []
  for est in (small, ample):
    attend = jax.jit(est.attend) if jit else est.attend
    runs.append(attend(q, cache, est.init(cache, jax.random.PRNGKey(5))))
  assert float(jnp.min(runs[0].stats["bucket_overflow"])) > 0
  assert float(jnp.max(runs[1].stats["bucket_overflow"])) == 0
  np.testing.assert_array_equal(np.asarray(runs[0].out), np.asarray(runs[1].out))
  np.testing.assert_array_equal(np.asarray(runs[0].stats["sampled"]),
                                np.asarray(runs[1].stats["sampled"]))


def aligned_problem():
  """Keys close to the queries' directions: far more tokens qualify than a key orthogonal
  to the query would bring."""
  q, cache = small_problem()
  direction = q.reshape(q.shape[0], cache.keys.shape[1], -1, q.shape[-1]).mean(axis=2)
  keys = cache.keys + 3.0 * direction[:, :, None, :] / jnp.linalg.norm(
      direction, axis=-1, keepdims=True)[:, :, None, :] * jnp.linalg.norm(
          cache.keys, axis=-1, keepdims=True)
  return q, cache._replace(keys=keys)


@pytest.mark.parametrize("jit", [False, True])
def test_the_default_selected_list_widens_instead_of_dropping(jit):
  # A traced init keeps the formula's list (2 w(0) + 1/64 = 9.4% of S for K=6, L=20), far
  # below what qualifies here. The step attends over a list of S: every qualified token is
  # sampled and the estimate is the uncapped one.
  q, cache = aligned_problem()
  default = sa.magicpig(K=6, L=20, local=16, max_candidates=20.0)
  uncapped = sa.magicpig(K=6, L=20, local=16, max_candidates=20.0, max_selected=1.0)
  runs = []
  for est in (default, uncapped):
    attend = jax.jit(est.attend) if jit else est.attend
    runs.append(attend(q, cache, jax.jit(est.init)(cache, jax.random.PRNGKey(5))))
  listed = math.ceil((2 * float(sa.lsh.collision_probability(0.0, 6, 20, 2)) + 1 / 64) * 512)
  assert float(jnp.max(runs[0].stats["sampled"])) > listed
  assert float(jnp.max(runs[0].stats["selected_overflow"])) > 0
  np.testing.assert_array_equal(np.asarray(runs[0].stats["sampled"]),
                                np.asarray(runs[1].stats["sampled"]))
  np.testing.assert_allclose(np.asarray(runs[0].out), np.asarray(runs[1].out), atol=1e-5)


def test_an_explicit_selected_cap_fixes_the_cost():
  q, cache = small_problem()
  est = sa.magicpig(K=6, L=20, local=16, max_selected=0.01, max_candidates=20.0)
  res = est.attend(q, cache, est.init(cache, jax.random.PRNGKey(5)), None)
  assert float(jnp.min(res.stats["selected_overflow"])) > 0
  np.testing.assert_array_equal(np.asarray(res.stats["sampled"]), math.ceil(0.01 * 512))


def test_unbiased_numerator_and_denominator_over_plane_seeds():
  # Horvitz-Thompson: E[D_hat] = D and E[N_hat] = N over the random planes. 500 seeds at
  # n = 4096 with the paper's K=10, L=150. z-tests: |z| <= 3 for the denominator (false
  # alarm 0.27% per query) and |z| <= 4 for each of the 2*32 numerator components
  # (Bonferroni, about 0.4% in all); the seeds are fixed, so the test is deterministic.
  seeds = 500
  q, cache = synthetic.llm_like(jax.random.PRNGKey(7), batch=1, num_kv_heads=1, group=2,
                                capacity=4096, head_dim=32, query_scale=0.7)
  est = sa.magicpig(K=10, L=150, max_selected=1.0, max_candidates=8.0)
  exact_out, exact_lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)

  @jax.jit
  def one(key):
    res = est.attend(q, cache, est.init(cache, key), None)
    overflow = res.stats["bucket_overflow"] + res.stats["selected_overflow"]
    return res.out, res.lse, overflow, res.density

  outs, lses, overflow, density = jax.lax.map(one, jax.random.split(jax.random.PRNGKey(8), seeds))
  assert float(jnp.max(overflow)) == 0
  ratio = np.exp(ref.f64(lses) - exact_lse)  # D_hat / D
  num = ratio[..., None] * ref.f64(outs)      # N_hat / D, to compare with N / D = o
  se = ratio.std(0, ddof=1) / math.sqrt(seeds)
  assert np.all(np.abs(ratio.mean(0) - 1) <= 3 * se), (ratio.mean(0), se)
  se_num = num.std(0, ddof=1) / math.sqrt(seeds)
  z = (num.mean(0) - exact_out) / se_num
  assert np.abs(z).max() <= 4, np.abs(z).max()
  assert 0.005 < float(density.mean()) < 0.2  # a sparse estimate, not dense in disguise


def test_cache_shorter_than_sinks_plus_local_is_exact_bf16():
  q, cache = small_problem(lengths=(512, 50), dtype=jnp.bfloat16)
  est = sa.magicpig(K=6, L=20, sinks=4, local=64)
  res = est.attend(q, cache, est.init(cache, jax.random.PRNGKey(9)), None)
  dense = sa.dense_attention(q, cache)
  assert res.out.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(res.out, np.float32)).all()
  np.testing.assert_allclose(np.asarray(res.out[1], np.float32),
                             np.asarray(dense.out[1], np.float32), rtol=2e-2, atol=2e-2)
  assert float(res.density[1, 0]) == 1.0


def test_query_orthogonal_to_every_key_bf16_no_nan():
  D = 32
  keys = jnp.zeros((1, 2, 256, D)).at[..., : D // 2].set(
      jax.random.normal(jax.random.PRNGKey(10), (1, 2, 256, D // 2)))
  values = jax.random.normal(jax.random.PRNGKey(11), (1, 2, 256, D))
  q = jnp.zeros((1, 4, D)).at[..., D // 2:].set(1.0)
  cache = sa.KVCache(keys.astype(jnp.bfloat16), values.astype(jnp.bfloat16),
                     jnp.array([256], jnp.int32))
  for query in (q, jnp.zeros_like(q)):
    est = sa.magicpig(K=6, L=20)
    res = est.attend(query.astype(jnp.bfloat16), cache, est.init(cache, jax.random.PRNGKey(12)),
                     None)
    assert np.isfinite(np.asarray(res.out, np.float32)).all()
    assert np.isfinite(np.asarray(res.lse)).all()


def test_jit_of_the_whole_decode_step_and_bad_arguments():
  q, cache = small_problem()
  est = sa.magicpig(**SMALL)

  @jax.jit
  def step(q, cache, key):
    index = est.init(cache, key)
    return est.attend(q, cache, est.append(index, cache), None)

  res = step(q, cache, jax.random.PRNGKey(13))
  eager = est.attend(q, cache, est.init(cache, jax.random.PRNGKey(13)), None)
  np.testing.assert_allclose(np.asarray(res.out), np.asarray(eager.out), rtol=1e-5, atol=1e-6)
  for K in (0, 17):  # one message, the real range
    with pytest.raises(ValueError, match=r"K \(bits per table\) must be in \[1, 16\]"):
      sa.magicpig(K=K)
  with pytest.raises(ValueError, match="max_selected must be a fraction"):
    sa.magicpig(max_selected=1.5)
  with pytest.raises(ValueError, match="key must be a single jax.random key"):
    est.init(cache, jax.random.split(jax.random.PRNGKey(0), 2))
  with pytest.raises(ValueError, match="index was built for a cache of shape"):
    est.append(est.init(cache, jax.random.PRNGKey(0)),
               sa.KVCache(cache.keys[:, :, :256], cache.values[:, :, :256],
                          jnp.minimum(cache.length, 256)))


def test_reusing_a_donated_index_says_so():
  q, cache = small_problem()
  est = sa.magicpig(**SMALL)
  index = est.init(cache, jax.random.PRNGKey(1))
  grown = cache._replace(length=jnp.minimum(cache.length + 1, cache.keys.shape[2]))
  new = est.append(index, grown)  # donates index
  with pytest.raises((RuntimeError, ValueError), match="append donates its index"):
    est.attend(q, grown, index)
  with pytest.raises((RuntimeError, ValueError), match="append donates its index"):
    est.append(index, grown)
  assert np.isfinite(np.asarray(est.attend(q, grown, new).out)).all()


def test_unbiased_over_plane_seeds_when_max_selected_binds():
  # A deliberately small cap: about 11 of the ~40-80 qualified tokens per query are kept,
  # subsampled uniformly and weighted by qualified / kept (two-stage Horvitz-Thompson), so
  # D_hat and N_hat stay unbiased over the random planes and the second stage. 400 seeds;
  # z-tests as in the test above: |z| <= 3 for each of the 2 denominators (false alarm 0.27%
  # each) and |z| <= 4 for each of the 2*32 numerator components (about 0.4% in all). Keeping
  # the first tokens instead (the old rule) biases D_hat by far more than 3 standard errors.
  seeds = 400
  q, cache = synthetic.llm_like(jax.random.PRNGKey(7), batch=1, num_kv_heads=1, group=2,
                                capacity=1024, head_dim=32, query_scale=0.7)
  est = sa.magicpig(K=6, L=20, sinks=4, local=16, max_selected=0.01, max_candidates=20.0)
  exact_out, exact_lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)

  @jax.jit
  def one(key):
    res = est.attend(q, cache, est.init(cache, key), None)
    return (res.out, res.lse, res.stats["selected_overflow"], res.stats["bucket_overflow"],
            res.stats["sampled"])

  outs, lses, overflow, dropped, sampled = jax.lax.map(
      one, jax.random.split(jax.random.PRNGKey(8), seeds))
  assert float(jnp.max(dropped)) == 0 and float(jnp.min(overflow)) > 0  # only this cap binds
  np.testing.assert_array_equal(np.asarray(sampled), math.ceil(0.01 * 1024))
  ratio = np.exp(ref.f64(lses) - exact_lse)  # D_hat / D
  se = ratio.std(0, ddof=1) / math.sqrt(seeds)
  assert np.all(np.abs(ratio.mean(0) - 1) <= 3 * se), (ratio.mean(0), se)
  num = ratio[..., None] * ref.f64(outs)  # N_hat / D
  z = (num.mean(0) - exact_out) / (num.std(0, ddof=1) / math.sqrt(seeds))
  assert np.abs(z).max() <= 4, np.abs(z).max()


def test_attend_key_draws_only_the_second_stage():
  q, cache = small_problem()
  index = sa.magicpig(**SMALL).init(cache, jax.random.PRNGKey(1))
  below = sa.magicpig(**SMALL)  # caps off: the key changes nothing
  a, b = (below.attend(q, cache, index, k) for k in (None, jax.random.PRNGKey(5)))
  np.testing.assert_array_equal(np.asarray(a.out), np.asarray(b.out))
  capped = sa.magicpig(**{**SMALL, "max_selected": 0.01})
  a, b = (capped.attend(q, cache, index, k) for k in (jax.random.PRNGKey(4), jax.random.PRNGKey(5)))
  assert float(jnp.min(a.stats["selected_overflow"])) > 0
  assert not np.array_equal(np.asarray(a.out), np.asarray(b.out))
  again = capped.attend(q, cache, index, jax.random.PRNGKey(4))
  np.testing.assert_array_equal(np.asarray(a.out), np.asarray(again.out))
