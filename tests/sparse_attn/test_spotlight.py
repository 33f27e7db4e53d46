"""Spotlight: the estimator, its use as a top-k predictor, training, storage."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from sparse_attn import hash_heads, synthetic, train
from tests import reference as ref


def problem(lengths=(1024, 700)):
  return synthetic.llm_like(jax.random.PRNGKey(0), batch=len(lengths), num_kv_heads=2, group=2,
                            capacity=1024, head_dim=32, length=jnp.array(lengths, jnp.int32),
                            query_scale=0.7)


def trained_like_params(seed=1):
  # Non-trivial weights (not near identity), so the test does not reduce to sign(x).
  return {n: v * 150 for n, v in hash_heads.init_params(jax.random.PRNGKey(seed), 2, 32).items()}


def test_spotlight_attends_exactly_over_the_top_hamming_tokens_of_the_group():
  q, cache = problem()
  params = trained_like_params()
  est = sa.spotlight(params, fraction=0.02, min_tokens=20)
  index = est.init(cache)
  res = est.attend(q, cache, index)
  y_q = np.asarray(hash_heads.forward(params, q.reshape(2, 2, 2, 32)))
  y_k = np.asarray(hash_heads.forward(params, cache.keys))
  qq, keys, values = ref.f64(q), ref.f64(cache.keys), ref.f64(cache.values)
  for b, n in enumerate((1024, 700)):
    keep = max(min(n, 20), math.ceil(0.02 * n))
    for kv in range(2):
      sq = np.where(y_q[b, kv] > 0, 1, -1)  # [G, D]
      sk = np.where(y_k[b, kv, :n] > 0, 1, -1)
      score = ((32 + sk @ sq.T) // 2).sum(-1)  # summed over the group
      top = np.argsort(-score, kind="stable")[:keep]  # ties: lower index first
      for g in range(2):
        out, lse = ref.subset_attention(qq[b, 2 * kv + g], keys[b, kv], values[b, kv], top)
        assert ref.relative_error(res.out[b, 2 * kv + g], out) <= 1e-5
        assert abs(float(res.lse[b, 2 * kv + g]) - lse) <= 1e-4
    np.testing.assert_allclose(np.asarray(res.density[b]), keep / n, rtol=1e-6)
  assert not bool(jnp.any(res.stats["read_all_keys"]))


def test_spotlight_as_topk_predictor_and_vattention_predictor():
  q, cache = problem()
  params = trained_like_params()
  direct = sa.spotlight(params)
  res = direct.attend(q, cache, direct.init(cache))
  via_topk = sa.topk(fraction=0.02, sinks=0, local=0,
                     predictor=sa.predictors.spotlight(params))
  other = via_topk.attend(q, cache, via_topk.init(cache, None))
  # Row 0 (n = 1024) keeps ceil(0.02 n) = 21 = max(20, 21) tokens in both; row 1 (n = 700)
  # keeps 14 in top-k but min_tokens = 20 in Spotlight.
  np.testing.assert_allclose(np.asarray(other.out[0]), np.asarray(res.out[0]), rtol=1e-5,
                             atol=1e-6)
  est = sa.vattention(0.1, 0.05, predictor=sa.predictors.spotlight(params))
  out = est.attend(q, cache, est.init(cache, None), jax.random.PRNGKey(2))
  assert np.isfinite(np.asarray(out.out)).all()


def test_spotlight_append_hashes_only_new_tokens_like_init():
  q, full = problem()
  params = trained_like_params()
  est = sa.spotlight(params)
  prefill = full._replace(length=jnp.array([1000, 650], jnp.int32))
  appended = est.append(est.init(prefill), full)
  fresh = est.init(full)
  for b, n in enumerate((1024, 700)):
    np.testing.assert_array_equal(np.asarray(appended.codes[b, :, :n]),
                                  np.asarray(fresh.codes[b, :, :n]))
  np.testing.assert_allclose(np.asarray(est.attend(q, full, appended).out),
                             np.asarray(est.attend(q, full, fresh).out), rtol=1e-6)


def test_training_raises_iou_over_the_identity_hash(tmp_path):
  # Hidden low-rank structure: the identity-initialised hash (plain sign of x) ranks keys
  # poorly; training must raise top-2% IoU well above it on held-out data, and the loss and
  # the misordered-pair fraction must fall. lr 1e-2 (the recipe's 1e-3 needs ~10x the steps).
  structure = jax.random.PRNGKey(42)

  def batches():
    for i in range(10**6):
      yield synthetic.hidden_structure(jax.random.PRNGKey(1000 + i), length=512, head_dim=64,
                                       structure_key=structure)

  params0 = hash_heads.init_params(jax.random.PRNGKey(1), 2, 64)
  held_q, held_k = synthetic.hidden_structure(jax.random.PRNGKey(5), length=1024, head_dim=64,
                                              num_queries=64, structure_key=structure)
  params, history = train.fit_hash_heads(
      params0, batches(), steps=300, key=jax.random.PRNGKey(2), progress=False,
      learning_rate=1e-2, loss_kwargs=dict(max_queries=128, max_other=256))
  before = float(train.topk_iou(params0, held_q, held_k))
  after = float(train.topk_iou(params, held_q, held_k))
  assert after > 2.5 * before, (before, after)
  assert np.mean(history["loss"][-20:]) < 0.7 * np.mean(history["loss"][:20])
  assert np.mean(history["misordered"][-20:]) < 0.7 * np.mean(history["misordered"][:20])
  assert min(history["tokens_per_s"]) > 0
  path = str(tmp_path / "hash.safetensors")
  train.save_params(path, params)
  loaded = train.load_params(path)
  for name in ("w", "b"):
    np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(params[name]))


def test_spotlight_through_the_pallas_kernels_in_interpret_mode(monkeypatch):
  q, cache = problem()
  params = trained_like_params()
  monkeypatch.setenv("SPARSE_ATTN_PALLAS", "1")  # kernels (interpreted on CPU)
  est = sa.spotlight(params)
  with_kernels = est.attend(q, cache, est.init(cache))
  monkeypatch.setenv("SPARSE_ATTN_PALLAS", "0")  # jnp references
  est = sa.spotlight(params)
  reference = est.attend(q, cache, est.init(cache))
  np.testing.assert_array_equal(np.asarray(with_kernels.out), np.asarray(reference.out))


def test_fit_hash_heads_learning_rate_and_one_redraw_per_step(monkeypatch):
  import inspect

  import tqdm.auto
  assert inspect.signature(train.fit_hash_heads).parameters["learning_rate"].default == 1e-3
  params0 = hash_heads.init_params(jax.random.PRNGKey(1), 2, 32)
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    train.fit_hash_heads(params0, [], steps=1, key=jax.random.PRNGKey(0), learning_rate=0.0)

  class Counting(tqdm.auto.tqdm):  # draws at every update (no time throttle), counted
    draws = 0

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})

    def refresh(self, *args, **kwargs):
      Counting.draws += 1
      return super().refresh(*args, **kwargs)

  monkeypatch.setattr(tqdm.auto, "tqdm", Counting)
  q, k = synthetic.hidden_structure(jax.random.PRNGKey(0), length=64, head_dim=32)
  steps = 5
  fits = [train.fit_hash_heads(params0, [(q, k)], steps=steps, key=jax.random.PRNGKey(2),
                               learning_rate=lr, progress=progress)[0]
          for lr, progress in ((1e-2, True), (1e-3, False))]
  assert not np.array_equal(np.asarray(fits[0]["w"]), np.asarray(fits[1]["w"]))
  # One draw per step and one at the close (2 per step when set_postfix refreshed too).
  assert 1 <= Counting.draws <= steps + 1, Counting.draws


def test_spotlight_reusing_a_donated_index_says_so():
  q, cache = problem()
  est = sa.spotlight(trained_like_params())
  index = est.init(cache)
  grown = cache._replace(length=jnp.array([1024, 701], jnp.int32))
  est.append(index, grown)
  with pytest.raises((RuntimeError, ValueError), match="append donates its index"):
    est.attend(q, grown, index)
