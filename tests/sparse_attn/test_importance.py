"""vAttention's importance-sampling residual (``sa.vattention_importance``: SimHash and
Spotlight proposals, ``density``)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from sparse_attn import predictors, synthetic
from sparse_attn._src import importance, split_policy
from tests import reference as ref


def problem(lengths=(2048, 1500), capacity=2048, scale=0.7, dtype=jnp.float32, group=2):
  return synthetic.llm_like(jax.random.PRNGKey(0), batch=len(lengths), num_kv_heads=2,
                            group=group, capacity=capacity, head_dim=32,
                            length=jnp.array(lengths, jnp.int32), query_scale=scale, dtype=dtype)


def hash_params(cache):
  return sa.hash_heads.init_params(jax.random.PRNGKey(4), cache.keys.shape[1],
                                   cache.keys.shape[3])


def make_proposal(name, cache):
  """The proposal called ``name``: "simhash" (1024 bits), "spotlight" or "uniform" (None)."""
  return {"simhash": lambda: sa.predictors.simhash(bits=1024),
          "spotlight": lambda: sa.predictors.spotlight(hash_params(cache)),
          "uniform": lambda: None}[name]()


def test_score_proxy_is_the_angle_estimate_times_the_norms_plus_the_centre():
  q, cache = problem()
  pred = predictors.simhash(bits=128).scorer(4, 64, norms=True)
  state = pred.init(cache, jax.random.PRNGKey(1))
  qg = q.reshape(2, 2, 2, 32)
  p = np.asarray(importance.score_proxy(qg, state.norms, pred.scores(qg, cache, state), 128,
                                        pred.key_mean(state)))
  # float64 numpy: signs of the projections of the query and the centred keys.
  planes = ref.f64(state.planes)
  keys = ref.f64(cache.keys) - ref.f64(state.key_mean)[:, :, None, :]
  q64 = ref.f64(qg)
  agree = ((q64 @ planes)[:, :, :, None, :] > 0) == ((keys @ planes)[:, :, None, :, :] > 0)
  cos = np.cos(math.pi * (1 - agree.mean(-1)))
  # Plus q . mu, so that p estimates the uncentred score q . k / sqrt(D).
  shift = np.einsum("bhgd,bhd->bhg", q64, ref.f64(state.key_mean))[..., None]
  want = (np.linalg.norm(q64, axis=-1)[..., None] * np.linalg.norm(keys, axis=-1)[:, :, None]
          * cos + shift) / math.sqrt(32)
  hashed = np.arange(2048)[None, :] < np.asarray(cache.length)[:, None]
  mask = np.broadcast_to(hashed[:, None, None, :], want.shape)
  # bf16 norms: 3 significant digits.
  np.testing.assert_allclose(p[mask], want[mask], rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_sharpened_puts_exact_scores_at_the_certain_base_tokens():
  rng = np.random.default_rng(0)
  p = rng.normal(size=(2, 3, 50)).astype(np.float32)
  pos = np.stack([rng.permutation(50)[:8] for _ in range(6)]).reshape(2, 3, 8)
  certain = rng.random((2, 3, 8)) < 0.5
  exact = rng.normal(size=(2, 3, 8)).astype(np.float32)
  got = np.asarray(importance.sharpened(jnp.asarray(p), jnp.asarray(pos, jnp.int32),
                                        jnp.asarray(certain), jnp.asarray(exact)))
  want = p.copy()
  for i in np.ndindex(2, 3):
    want[i][pos[i][certain[i]]] = exact[i][certain[i]]
  np.testing.assert_array_equal(got, want)


def test_calibrated_is_the_least_squares_line_with_a_nonnegative_slope():
  rng = np.random.default_rng(1)
  base_p = rng.normal(size=(3, 40))
  exact = np.stack([2.0 * base_p[0] + 1.0, -base_p[1], 0.5 * base_p[2]]) + 0.1 * rng.normal(
      size=(3, 40))
  mask = rng.random((3, 40)) < 0.7
  p = rng.normal(size=(3, 100))
  got = np.asarray(importance.calibrated(*(jnp.asarray(x, jnp.float32) for x in (
      p, base_p, exact)), jnp.asarray(mask)))
  for row in range(3):
    slope, icpt = np.polyfit(base_p[row][mask[row]], exact[row][mask[row]], 1)
    if slope < 0:  # no information: every token gets the base's mean score
      slope, icpt = 0.0, exact[row][mask[row]].mean()
    np.testing.assert_allclose(got[row], slope * p[row] + icpt, rtol=1e-4, atol=1e-4)


def test_base_sample_is_poisson_with_the_wanted_size():
  key = jax.random.PRNGKey(0)
  p = jax.random.normal(key, (2, 3, 1000)) * 3.0
  residual = jnp.broadcast_to(jnp.arange(1000)[None, None, :] < jnp.array([[[1000]], [[600]]]),
                              p.shape)
  p_max = importance.largest(p, residual)
  want = jnp.full((2, 3), 100.0)
  a, mean = importance.tempered(p, residual, p_max, (1.0,))[1.0]
  pilot = a + 0.1 * mean[..., None]
  draw = jax.jit(lambda k: importance.base_sample(k, pilot, residual, want, 400))
  pos, mask, rho, overflow = draw(key)
  assert int(jnp.max(overflow)) == 0
  # Below the cap of 1, the probabilities are proportional to the proposal a + 0.1 mean(a).
  res = np.asarray(residual)
  a = np.exp(ref.f64(p) - ref.f64(p_max)[..., None]) * res
  a = np.where(res, a + 0.1 * a.sum(-1, keepdims=True) / res.sum(-1, keepdims=True), 0.0)
  listed = np.take_along_axis(a, np.asarray(pos), -1)
  m, rho = np.asarray(mask), np.asarray(rho)
  assert np.all(res[np.arange(2)[:, None, None], np.arange(3)[None, :, None], np.asarray(pos)][m])
  for b in range(2):
    for h in range(3):
      keep = m[b, h] & (rho[b, h] < 1)
      ratio = rho[b, h][keep] / listed[b, h][keep]
      np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
  # The expected size is the wanted one (the cap's lost mass is put back): the mean count
  # over 200 keys is within 4 standard errors of 100 (sd <= 10 per draw, Poisson-binomial).
  counts = np.stack([np.asarray(draw(k)[1]).sum(-1) for k in jax.random.split(key, 200)])
  assert np.all(np.abs(counts.mean(0) - 100) <= 4 * 10 / math.sqrt(200)), counts.mean(0)


def test_largest_tokens_are_the_k_residual_tokens_of_largest_proxy():
  rng = np.random.default_rng(2)
  p = rng.normal(size=(3, 200)).astype(np.float32)
  residual = np.stack([np.ones(200, bool), rng.random(200) < 0.5, np.arange(200) < 7])
  got = np.asarray(importance.largest_tokens(jnp.asarray(p), jnp.asarray(residual), 10))
  for row in range(3):
    eligible = np.flatnonzero(residual[row])
    want = eligible[np.argsort(-p[row][eligible])[:10]]  # all 7 of the last row
    np.testing.assert_array_equal(np.flatnonzero(got[row]), np.sort(want))


def test_top_only_score_is_the_squared_dropped_total_scaled_to_the_kept_denominator():
  # One row of 8 tokens, a base of 4 with Horvitz-Thompson weights; float64 reference.
  rng = np.random.default_rng(0)
  p = rng.normal(size=(1, 8)).astype(np.float32)
  base_pos = np.array([[0, 2, 5, 7]])
  weights = np.array([[1.0, 2.0, 4.0, 1.5]], np.float32)
  y = rng.normal(size=(1, 4, 3)).astype(np.float32)  # the output quantity
  y_d = np.abs(rng.normal(size=(1, 4, 1))).astype(np.float32)  # the denominator's
  d_hat = np.array([100.0], np.float32)
  score, thr, k = split_policy.top_only_candidate(
      jnp.asarray(p), jnp.ones((1, 8), bool), jnp.asarray(np.take_along_axis(p, base_pos, -1)),
      jnp.asarray(weights), (jnp.asarray(y), jnp.asarray(y_d)), jnp.asarray([3.0]),
      jnp.asarray(d_hat))
  kept = p[0] >= np.sort(p[0])[-3]
  drop = ~kept[base_pos[0]]
  w = weights[0, drop].astype(np.float64)
  total = (w[:, None] * y[0, drop]).sum(0)
  d_kept = d_hat[0] - (w * y_d[0, drop, 0]).sum()
  assert int(k[0]) == 3 and float(thr[0]) == np.sort(p[0])[-3]
  np.testing.assert_allclose(float(score[0, 0]), (total**2).sum() * (d_hat[0] / d_kept)**2,
                             rtol=1e-5)


def test_base_sample_draws_the_certain_tokens_always_and_the_wanted_size_beside():
  key = jax.random.PRNGKey(3)
  residual = jnp.broadcast_to(jnp.arange(500)[None, :] >= 20, (4, 500))
  certain = residual & (jnp.arange(500)[None, :] % 7 == 0)  # 69 residual tokens
  pilot = jnp.exp(jax.random.normal(key, (4, 500)))
  want = jnp.full((4,), 60.0)
  draw = jax.jit(lambda k: importance.base_sample(k, pilot, residual, want, 300, certain))
  counts = []
  for k in jax.random.split(key, 100):
    pos, mask, rho, overflow = (np.asarray(x) for x in draw(k))
    assert np.all(overflow == 0)
    drawn = np.zeros((4, 500), bool)
    np.put_along_axis(drawn, np.where(mask, pos, 0), mask, -1)
    assert np.all(drawn[np.asarray(certain)])  # every draw holds them ...
    assert np.all(rho[mask & np.asarray(certain)[np.arange(4)[:, None], pos]] == 1.0)  # at 1
    assert not np.any(drawn[:, :20])  # nothing outside the residual
    counts.append((drawn & ~np.asarray(certain)).sum(-1))
  # ... and the others are a Poisson sample of expected size 60: the mean over 100 keys is
  # within 4 standard errors (sd <= sqrt(60) per draw; false alarm ~6e-5 per row).
  assert np.all(np.abs(np.mean(counts, 0) - 60) <= 4 * math.sqrt(60 / 100)), np.mean(counts, 0)


@pytest.mark.parametrize("proposal", ["simhash", "spotlight"])
@pytest.mark.parametrize("mode", ["guarantee", "density"])
def test_unbiased_numerator_and_denominator(proposal, mode):
  # E[D_hat] = D and E[N_hat] = N: given the base sample (which sets the policy), the final
  # draw is independent and weighted by 1/pi. 1000 keys on 8 queries: |z| <= 3.5 for each
  # denominator (false alarm about 0.4% in all for normal means; the estimates are
  # right-skewed, which makes low z more frequent), |z| <= 4 for the 8*32 numerator
  # components (about 2%).
  q, cache = problem(scale=0.5)
  kwargs = dict(epsilon=0.1, delta=0.1, max_fraction=0.1) if mode == "guarantee" else dict(
      density=0.05)
  est = sa.vattention_importance(proposal=make_proposal(proposal, cache), base_rate=0.02,
                                 min_base=32, **kwargs)
  index = est.init(cache, jax.random.PRNGKey(1))
  exact_out, exact_lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)
  trials = 1000
  outs, lses, sampled, temps = jax.lax.map(
      jax.jit(lambda k: (lambda r: (r.out, r.lse, r.stats["budget"], r.stats["temperature"]))(
          est.attend(q, cache, index, k))), jax.random.split(jax.random.PRNGKey(2), trials))
  assert float(jnp.std(sampled, axis=0).max()) > 0  # the sample really is random
  assert float(jnp.max(temps)) > 0  # importance proposals were chosen, not only uniform
  deviation, se, z = ref.monte_carlo_bias(outs, lses, exact_out, exact_lse)
  assert np.all(np.abs(deviation) <= 3.5 * se), (deviation, se)
  assert np.abs(z).max() <= 4


def test_density_mode_reads_the_asked_fraction():
  q, cache = problem(lengths=(2048, 2048), scale=1.0)
  for density in (0.02, 0.1):
    est = sa.vattention_importance(density=density)
    index = est.init(cache, jax.random.PRNGKey(1))
    dens = np.mean([np.asarray(est.attend(q, cache, index, jax.random.PRNGKey(s)).density)
                    for s in range(20)], axis=0)
    # The window (68 tokens, 3.3%) is always attended: 2% is the window alone.
    want = max(density, 68 / 2048)
    np.testing.assert_allclose(dens, want, rtol=0.15)


def test_least_error_mode_drops_the_residual_where_that_costs_less():
  # unbiased=False may keep the top part alone. Peaked heads (query scale 4): the residual
  # carries almost nothing and most draws drop it. On peaked and on flat heads (scale 0.1,
  # where the top 5% by the codes averages the values about as well as a sample), the mean
  # error over heads and 10 keys is no larger than the unbiased estimate's (measured:
  # 3e-5 against 7e-5 and 0.20 against 0.33; both drop the residual in every draw).
  for scale, least_drops in ((4.0, 0.5), (0.1, 0.0)):
    q, cache = problem(lengths=(2048, 2048), scale=scale)
    exact = sa.dense_attention(q, cache).out
    errors = {}
    for unbiased in (True, False):
      est = sa.vattention_importance(density=0.05, guarantee="output", unbiased=unbiased)
      index = est.init(cache, jax.random.PRNGKey(1))
      runs = [est.attend(q, cache, index, jax.random.PRNGKey(s)) for s in range(10)]
      errors[unbiased] = np.mean([ref.relative_error(r.out, exact).mean() for r in runs])
      dropped = np.mean([np.asarray(r.stats["budget"]) == 0 for r in runs])
      if unbiased:
        assert dropped == 0
    assert dropped >= least_drops, (scale, dropped)
    assert errors[False] <= errors[True], (scale, errors)


def test_certain_slice_sets_how_many_tokens_the_base_reads_beside_its_draws():
  # Residual ~1980 tokens (2048 less the window), so m0 = min_base = 128 expected draws
  # beside the slice; the draws' count has a variance below 128 (sd < 11.3), and 6 sd of
  # slack makes a false alarm ~2e-9 per row.
  q, cache = problem(lengths=(2048, 2048))
  for slice_size in (None, 300):
    est = sa.vattention_importance(0.1, 0.1, certain_slice=slice_size)
    res = est.attend(q, cache, est.init(cache, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
    base = np.asarray(res.stats["base"])
    assert np.all(np.abs(base - 128 - (slice_size or 128)) <= 6 * math.sqrt(128)), base


def test_bf16_short_cache_and_empty_residual_no_nan():
  q, cache = problem(lengths=(2048, 50), dtype=jnp.bfloat16)
  for kwargs in (dict(epsilon=0.1, delta=0.1), dict(density=0.05)):
    for proposal in ("simhash", "spotlight", "uniform"):
      if proposal == "uniform" and "epsilon" in kwargs:
        est = sa.vattention(**kwargs)
      else:
        est = sa.vattention_importance(proposal=make_proposal(proposal, cache), **kwargs)
      res = est.attend(q, cache, est.init(cache, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
      assert res.out.dtype == jnp.bfloat16
      assert bool(jnp.all(jnp.isfinite(res.out.astype(jnp.float32))))
      # 50 tokens: all inside the window (4 + 64), so the estimate is exact.
      out, _ = ref.dense_attention(q[1:], cache.keys[1:], cache.values[1:], cache.length[1:])
      assert ref.relative_error(res.out[1:], out).max() <= 1e-2


def test_append_keeps_norms_and_matches_a_fresh_index():
  q, cache = problem(lengths=(1500, 1000))
  est = sa.vattention_importance(0.1, 0.1)
  grown = cache._replace(length=cache.length + 300)
  appended = est.append(est.init(cache, jax.random.PRNGKey(1)), grown)
  fresh = est.init(grown, jax.random.PRNGKey(1))
  # The centring mean is fixed at init, so compare with the appended index's own hashing.
  for b, n in enumerate(np.asarray(grown.length)):
    assert np.all(np.asarray(appended.norms[b, :, :n], np.float32) > 0)
  assert appended.norms.dtype == fresh.norms.dtype == jnp.bfloat16
  res = est.attend(q, grown, appended, jax.random.PRNGKey(3))
  assert bool(jnp.all(jnp.isfinite(res.out)))


def test_validation():
  vi = sa.vattention_importance
  with pytest.raises(ValueError, match="proposal must be"):
    vi(0.1, 0.1, proposal="simhash")
  with pytest.raises(ValueError, match="proposal must be"):
    vi(0.1, 0.1, proposal=sa.predictors.oracle())
  with pytest.raises(ValueError, match="epsilon and delta"):
    vi()
  with pytest.raises(ValueError, match="with \\(epsilon, delta\\) that is sa.vattention"):
    vi(0.1, 0.1, proposal=None)
  with pytest.raises(ValueError, match="density fixes the size"):
    vi(0.1, 0.1, density=0.05)
  with pytest.raises(ValueError, match="density must be"):
    vi(density=1.5)
  with pytest.raises(ValueError, match="unbiased=False is a density-mode option"):
    vi(0.1, 0.1, unbiased=False)
  with pytest.raises(ValueError, match="mix"):
    vi(0.1, 0.1, mix=0.0)
  with pytest.raises(ValueError, match="params"):
    sa.predictors.spotlight(None)
  with pytest.raises(ValueError, match="certain_slice shapes a code proposal"):
    vi(density=0.1, proposal=None, certain_slice=64)
  for bad in (0, 2.5):
    with pytest.raises(ValueError, match="certain_slice must be an int >= 1"):
      vi(0.1, 0.1, certain_slice=bad)
  with pytest.raises(TypeError, match="proposal"):
    sa.vattention(0.1, 0.1, proposal=sa.predictors.simhash())  # the paper's has no proposal
