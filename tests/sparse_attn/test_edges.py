"""Every estimator at the edges, under jit as eagerly: past the capacity, empty rows,
non-finite keys (issue 20)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from sparse_attn import hash_heads, synthetic
from tests import reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[2]
CAPACITY = 256
PARAMS = hash_heads.init_params(jax.random.PRNGKey(3), 2, 32)

# name -> (factory, whether attend needs a PRNG key); small caps and windows: S = 256.
ESTIMATORS = {
    "dense": (sa.dense, False),
    "streaming": (lambda: sa.streaming(4, 16), False),
    "topk": (lambda: sa.topk(fraction=0.05, sinks=4, local=16), False),
    "topk simhash": (lambda: sa.topk(fraction=0.05, sinks=4, local=16,
                                     predictor=sa.predictors.simhash()), False),
    "topp": (lambda: sa.topp(0.9), False),
    "spotlight": (lambda: sa.spotlight(PARAMS), False),
    "uniform": (lambda: sa.uniform(0.1, sinks=4, local=16), True),
    "magicpig": (lambda: sa.magicpig(K=6, L=20, sinks=4, local=16), False),
    "vattention": (lambda: sa.vattention(0.1, 0.1, sinks=4, local=16, min_base=16), True),
    "vattention simhash": (lambda: sa.vattention_importance(
        0.1, 0.1, sinks=4, local=16, min_base=16, proposal=sa.predictors.simhash(bits=128)),
                           True),
}


def problem(lengths=(CAPACITY, 0, 100), seed=0):
  return synthetic.llm_like(jax.random.PRNGKey(seed), batch=len(lengths), num_kv_heads=2,
                            group=2, capacity=CAPACITY, head_dim=32,
                            length=jnp.array(lengths, jnp.int32), query_scale=0.7)


def run(name, q, cache, index_cache=None, jit=True):
  """``(index, result)`` of estimator ``name``; init on ``index_cache`` (default ``cache``)."""
  make, needs_key = ESTIMATORS[name]
  est = make()
  init = jax.jit(est.init) if jit else est.init
  attend = jax.jit(est.attend) if jit else est.attend
  index = init(cache if index_cache is None else index_cache, jax.random.PRNGKey(1))
  key = jax.random.PRNGKey(2) if needs_key else None
  return index, attend(q, cache, index, key)


# ---------------------------------------------------------------------------------------------
# Past the capacity.

HANG_SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp
    import sparse_attn as sa
    from sparse_attn import synthetic
    # The issue's reproduction: S = 1024, length 1025 in one row, under jit.
    q, cache = synthetic.llm_like(jax.random.PRNGKey(0), batch=2, num_kv_heads=2, group=2,
                                  capacity=1024, head_dim=64)
    key = jax.random.PRNGKey(3)
    over = cache._replace(length=jnp.array([1025, 600], jnp.int32))
    out = {}
    est = sa.spotlight(sa.hash_heads.init_params(key, 2, 64))
    out["spotlight init"] = jax.jit(est.init)(over, key).length.tolist()
    index = jax.jit(est.init)(cache._replace(length=jnp.array([1020, 600], jnp.int32)), key)
    out["spotlight append"] = jax.jit(est.append)(index, over).length.tolist()
    est = sa.magicpig(K=8, L=20)
    out["magicpig init"] = jax.jit(est.init)(over, key).length.tolist()
    index = jax.jit(est.init)(cache._replace(length=jnp.array([1020, 600], jnp.int32)), key)
    index = jax.jit(est.append)(index, over)
    out["magicpig append"] = index.length.tolist()
    res = jax.jit(est.attend)(q, over, index, None)
    out["magicpig over"] = res.stats["over_capacity"][:, 0].tolist()
    print(json.dumps(out))
""")


def test_length_past_capacity_under_jit_terminates():
  # In a subprocess with a timeout, so that a regression fails instead of hanging the suite.
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  done = subprocess.run([sys.executable, "-c", HANG_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  for name in ("spotlight init", "spotlight append", "magicpig init", "magicpig append"):
    assert out[name] == [1024, 600], (name, out)
  assert out["magicpig over"] == [True, False]


def assert_empty_rows(res, empty):
  """Rows ``empty`` (bool [B]): out 0, lse -inf, density 0; nothing NaN anywhere."""
  out, lse, density = (np.asarray(x, np.float32) for x in (res.out, res.lse, res.density))
  assert not np.isnan(out).any() and not np.isnan(lse).any() and not np.isnan(density).any()
  for name, x in res.stats.items():
    assert not np.isnan(np.asarray(x, np.float32)).any(), name
  np.testing.assert_array_equal(out[empty], 0.0)
  np.testing.assert_array_equal(lse[empty], -np.inf)
  np.testing.assert_array_equal(density[empty], 0.0)
  np.testing.assert_array_equal(np.asarray(res.stats["selected"])[empty], 0.0)
  np.testing.assert_array_equal(np.asarray(res.stats["valid"])[empty], 0.0)
  assert np.isfinite(lse[~empty]).all() and (density[~empty] > 0).all()


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_past_capacity_and_empty_rows_under_jit_and_eagerly(name):
  # One batch for both edges (each compile is shared): row 0 past the capacity under jit,
  # row 1 empty, row 2 ordinary.
  q, cache = problem()
  over = cache._replace(length=jnp.array([CAPACITY + 5, 0, 100], jnp.int32))
  _, res = run(name, q, over)
  np.testing.assert_array_equal(np.asarray(res.stats["over_capacity"]),
                                [[True] * 4, [False] * 4, [False] * 4])
  assert_empty_rows(res, np.array([False, True, False]))
  # Eagerly at length S: valid, the empty row too; past the capacity, the same estimate as
  # at length S (the same keys and index), to float rounding (jit may fuse differently).
  index, eager = run(name, q, cache, jit=False)
  assert not np.asarray(eager.stats["over_capacity"]).any()
  assert_empty_rows(eager, np.array([False, True, False]))
  np.testing.assert_allclose(np.asarray(res.out), np.asarray(eager.out), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(res.lse), np.asarray(eager.lse), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(res.stats["valid"][:, 0]), [CAPACITY, 0, 100])
  # An empty row that starts filling (a freed slot reused): append, then attend.
  make, needs_key = ESTIMATORS[name]
  est = make()
  grown = cache._replace(length=jnp.array([CAPACITY, 30, 100], jnp.int32))
  res = est.attend(q, grown, est.append(index, grown), jax.random.PRNGKey(2) if needs_key
                   else None)
  assert np.isfinite(np.asarray(res.lse)).all() and (np.asarray(res.density) > 0).all()
  np.testing.assert_array_equal(np.asarray(res.stats["valid"][:, 0]), [CAPACITY, 30, 100])


@pytest.mark.parametrize("name", ["dense", "magicpig", "spotlight", "vattention"])
def test_length_past_capacity_raises_eagerly_naming_cache_length(name):
  q, cache = problem()
  over = cache._replace(length=jnp.array([CAPACITY + 1, 0, 100], jnp.int32))
  make, needs_key = ESTIMATORS[name]
  est = make()
  with pytest.raises(ValueError, match=r"cache\.length.*S=256"):
    est.init(over, jax.random.PRNGKey(1))
  index = est.init(cache, jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match=r"cache\.length.*S=256"):
    est.attend(q, over, index, jax.random.PRNGKey(2) if needs_key else None)


def test_merge_ors_over_capacity():
  q, cache = problem()
  over = cache._replace(length=jnp.array([CAPACITY + 5, 0, 100], jnp.int32))
  parts = jax.jit(lambda q, a, b: sa.merge([sa.dense_attention(q, a),
                                            sa.dense_attention(q, b)]))(q, cache, over)
  np.testing.assert_array_equal(np.asarray(parts.stats["over_capacity"][:, 0]),
                                [True, False, False])


# ---------------------------------------------------------------------------------------------
# Empty rows in merge.


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_merge_of_empty_parts(jit):
  q, cache = problem()
  empty = cache._replace(length=jnp.zeros_like(cache.length))
  fn = lambda q, a, b: sa.merge([sa.dense_attention(q, a), sa.dense_attention(q, b)])
  res = (jax.jit(fn) if jit else fn)(q, cache, empty)
  assert_empty_rows(res, np.array([False, True, False]))
  whole = sa.dense_attention(q, cache)
  np.testing.assert_allclose(np.asarray(res.out), np.asarray(whole.out), rtol=1e-6, atol=1e-7)
  both = (jax.jit(fn) if jit else fn)(q, empty, empty)
  out, lse = np.asarray(both.out), np.asarray(both.lse)
  assert (out == 0).all() and (lse == -np.inf).all() and (np.asarray(both.density) == 0).all()


def test_negative_length_raises_eagerly_naming_cache_length():
  q, cache = problem()
  with pytest.raises(ValueError, match=r"cache\.length must lie in \[0, S=256\]"):
    sa.dense_attention(q, cache._replace(length=jnp.array([-1, 5, 0], jnp.int32)))


# ---------------------------------------------------------------------------------------------
# Non-finite keys: NaN out and lse for the heads that hold one, nothing else changes.

# Estimators that score or index every key flag a non-finite one wherever it is; streaming
# and uniform read only the rows they attend, and propagate it only when they read it.
READS_ONLY_WHAT_THEY_ATTEND = ("streaming", "uniform")


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_nonfinite_key_makes_its_heads_nan_and_leaves_the_others(name):
  q, cache = problem()
  keys = cache.keys.at[0, 0, 150, 3].set(jnp.nan).at[2, 1, 40, 0].set(jnp.inf)  # residual
  _, clean = run(name, q, cache, jit=False)
  index, res = run(name, q, cache._replace(keys=keys), jit=False)
  out, lse = np.asarray(res.out, np.float32), np.asarray(res.lse)
  poisoned = np.zeros((3, 4), bool)
  poisoned[0, :2] = poisoned[2, 2:] = True  # the GQA groups of KV heads (0, 0) and (2, 1)
  if name in READS_ONLY_WHAT_THEY_ATTEND:
    assert not np.isnan(out[~poisoned]).any()
  else:
    assert np.isnan(out[poisoned]).all() and np.isnan(lse[poisoned]).all()
  # lse consistent with out on every head: both NaN or neither.
  np.testing.assert_array_equal(np.isnan(out).any(-1), np.isnan(lse))
  # The other heads (and the empty row) are exactly as without the bad keys.
  np.testing.assert_array_equal(out[~poisoned], np.asarray(clean.out)[~poisoned])
  np.testing.assert_array_equal(lse[~poisoned], np.asarray(clean.lse)[~poisoned])
  np.testing.assert_array_equal(np.asarray(res.density)[~poisoned],
                                np.asarray(clean.density)[~poisoned])
  if name == "magicpig":
    # The centring mean of the poisoned head is over its finite residual keys: sampling goes
    # on (it was switched off for the whole head when one NaN made the mean NaN).
    residual = np.asarray(keys[0, 0, 4:CAPACITY - 16], np.float64)
    residual = residual[np.isfinite(residual).all(-1)]
    np.testing.assert_allclose(np.asarray(index.key_mean[0, 0]), residual.mean(0), rtol=1e-5,
                               atol=1e-5)
    sampled, clean_sampled = (np.asarray(r.stats["sampled"][0, :2]) for r in (res, clean))
    assert (sampled >= 0.5 * clean_sampled).all() and (sampled > 0).all(), (sampled,
                                                                             clean_sampled)


def test_merge_of_a_nonfinite_part_is_nan_in_out_and_lse():
  q, cache = problem()
  bad = cache._replace(keys=cache.keys.at[0, 1, 7, 0].set(jnp.nan))
  res = sa.merge([sa.dense_attention(q, bad), sa.dense_attention(q, cache)])
  assert np.isnan(np.asarray(res.out[0, 2:])).all() and np.isnan(np.asarray(res.lse[0, 2:])).all()
  assert np.isfinite(np.asarray(res.lse[0, :2])).all()


# ---------------------------------------------------------------------------------------------
# One key convention: optional where unused, a ValueError naming it where it is needed.

DRAWS_AT_INIT = ("magicpig", "topk simhash", "vattention simhash")  # hash planes


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_key_is_optional_where_unused_and_named_where_needed(name):
  q, cache = problem()
  make, draws_at_attend = ESTIMATORS[name]
  est = make()
  if name in DRAWS_AT_INIT:
    with pytest.raises(ValueError, match=r"key must be a jax.random key \(.*init.*\), got None"):
      est.init(cache)
    index = est.init(cache, jax.random.PRNGKey(1))
  else:
    index = est.init(cache)
  if draws_at_attend:
    with pytest.raises(ValueError, match=r"key must be a jax.random key \(.*attend.*\), got None"):
      est.attend(q, cache, index)
  else:
    res = est.attend(q, cache, index)
    ignored = est.attend(q, cache, index, jax.random.PRNGKey(9))
    np.testing.assert_array_equal(np.asarray(res.out), np.asarray(ignored.out))
