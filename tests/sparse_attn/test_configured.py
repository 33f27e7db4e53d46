"""Estimators are their configuration: equal settings compare and hash equal, so a freshly
built one passed to a jitted decode step does not compile again (``types.configured``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from sparse_attn import synthetic

PARAMS = sa.hash_heads.init_params(jax.random.PRNGKey(3), 2, 32)

FACTORIES = {
    "dense": lambda: sa.dense(),
    "streaming": lambda: sa.streaming(4, 16),
    "uniform": lambda: sa.uniform(0.1, sinks=4, local=16),
    "topk simhash": lambda: sa.topk(fraction=0.05, predictor=sa.predictors.simhash(bits=64)),
    "topp": lambda: sa.topp(0.9),
    "spotlight": lambda: sa.spotlight(PARAMS),
    "magicpig": lambda: sa.magicpig(K=6, L=20, sinks=4, local=16),
    "vattention": lambda: sa.vattention(0.1, 0.1, min_base=16),
    "vattention_importance": lambda: sa.vattention_importance(
        density=0.1, proposal=sa.predictors.spotlight(PARAMS)),
}


def problem():
  return synthetic.llm_like(jax.random.PRNGKey(0), batch=2, num_kv_heads=2, group=2,
                            capacity=256, head_dim=32, length=jnp.array([256, 100], jnp.int32))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_equal_settings_give_equal_estimators(name):
  first, second = FACTORIES[name](), FACTORIES[name]()
  assert first == second and hash(first) == hash(second)


def test_a_fresh_estimator_does_not_recompile_a_jitted_step():
  q, cache = problem()
  traces = []

  def step(est, q, cache, index, key):
    traces.append(est)
    grown = cache._replace(length=cache.length + 1)
    return est.attend(q, grown, est.append(index, grown), key).out

  jitted = jax.jit(step, static_argnums=0)
  outs = []
  for _ in range(3):  # built afresh each time, as in a loop over requests
    est = sa.magicpig(K=6, L=20, sinks=4, local=16)
    index = est.init(cache, jax.random.PRNGKey(1))
    outs.append(jitted(est, q, cache, index, jax.random.PRNGKey(2)))
  assert len(traces) == 1, f"compiled {len(traces)} times for one configuration"
  np.testing.assert_array_equal(outs[0], outs[2])
  jitted(sa.magicpig(K=6, L=21, sinks=4, local=16), q, cache,
         sa.magicpig(K=6, L=21, sinks=4, local=16).init(cache, jax.random.PRNGKey(1)),
         jax.random.PRNGKey(2))
  assert len(traces) == 2  # another configuration is another program


def test_eager_calls_share_the_compiled_functions():
  q, cache = problem()
  est = sa.vattention(0.1, 0.1, min_base=16)
  index = est.init(cache)
  est.attend(q, cache, index, jax.random.PRNGKey(0))
  # The same object comes back, so its jitted attend (and its compilation) is reused.
  assert sa.vattention(0.1, 0.1, min_base=16) is est
  assert sa.vattention(delta=0.1, epsilon=0.1, min_base=16) is est  # keywords bind alike


def test_different_settings_differ():
  assert sa.magicpig(K=6, L=20) != sa.magicpig(K=6, L=21)
  assert sa.topk(k=8) != sa.topk(k=8, predictor=sa.predictors.simhash())
  assert sa.topk(k=8, predictor=sa.predictors.simhash(bits=64)) != sa.topk(
      k=8, predictor=sa.predictors.simhash(bits=128))
  assert sa.dense() != sa.streaming()


def test_arrays_count_by_identity_not_value():
  # Hash-head parameters are compared by identity: the same dict gives the same estimator;
  # an equal copy is another one (comparing arrays by value would read them back).
  copy = jax.tree.map(jnp.copy, PARAMS)
  assert sa.spotlight(PARAMS) == sa.spotlight(PARAMS)
  assert sa.spotlight(copy) != sa.spotlight(PARAMS)
  assert sa.predictors.spotlight(PARAMS) == sa.predictors.spotlight(PARAMS)
  assert sa.predictors.spotlight(copy) != sa.predictors.spotlight(PARAMS)


def test_a_changed_estimator_is_no_longer_its_factorys():
  est = sa.dense()
  changed = est._replace(append=lambda index, cache: index)
  assert changed.config is None and changed != est and changed == changed
  assert sa.Estimator(est.init, est.append, est.attend) != est
