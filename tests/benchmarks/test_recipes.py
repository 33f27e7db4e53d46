"""The long-context recipes: parameter and FLOP counts, the plan, attention remat."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from benchmarks.reference import attention, recipes, tasks, train


@pytest.mark.parametrize("name", ["cpu75", "gpu16k", "cpu-smoke16k"])
def test_parameters_count_the_model(name):
  config = recipes.recipe_config(recipes.RECIPES[name])
  model = models.Llama(config, rngs=nnx.Rngs(0))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert recipes.parameters(config) == sum(x.size for x in leaves)


def test_long_recipe_shape():
  rec = recipes.RECIPES["gpu16k"]
  config = recipes.recipe_config(rec)
  assert 5e6 <= recipes.parameters(config) <= 10e6
  assert recipes.parameters(config) * 4 <= 20.5e6  # float32 safetensors, about 20 MB
  assert (config.num_heads, config.num_kv_heads) == (8, 2) and 32 <= config.head_dim <= 64
  assert rec.phases[-1].length == 16384 and config.max_position_embeddings >= 32768
  assert {length for _, length, _ in rec.final_suite} == {16384, 32768}
  for phase in rec.phases:  # every task of every phase fits its length
    for task, _ in phase.mixture:
      tasks.make(task, 0, phase.length)
  smoke = recipes.RECIPES["cpu-smoke16k"]
  assert smoke.remat and smoke.block == rec.block
  assert max(l for _, l, _ in smoke.final_suite) > smoke.phases[-1].length


def test_train_flops_match_xla_cost_analysis():
  """Against XLA's own count of the compiled step (which adds softmax, norms and the
  optimizer's elementwise work: within 15% at these shapes)."""
  config = train.model_config(hidden_size=64, intermediate_size=128, num_layers=2,
                              head_dim=16)
  graphdef, params = nnx.split(models.Llama(config, rngs=nnx.Rngs(0)))
  rec = recipes.Recipe(phases=(recipes.Phase(512, 1, (("text", 1.0),)),), block=128)
  tx = train.make_optimizer(rec)
  with jax.numpy_dtype_promotion("standard"):
    opt_state = tx.init(params)
  tokens = jnp.zeros((2, 512), jnp.int32)
  for remat in (False, True):
    step = train.make_train_step(graphdef, tx, rec.block, remat)
    cost = step.lower(params, opt_state, tokens, jnp.ones((2, 512))).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    want = recipes.train_flops(config, 512, 2, rec.block, remat)
    assert 0.85 < cost["flops"] / want < 1.15, (remat, cost["flops"], want)


def test_plan_adds_up_and_refuses_bad_input():
  rec = recipes.RECIPES["gpu16k"]
  p = recipes.plan(rec, 32768, 20e12)
  assert sum(ph["steps"] for ph in p["phases"]) == rec.total_steps
  assert np.isclose(sum(ph["seconds"] for ph in p["phases"]), p["seconds"])
  assert p["chunks"] == int(np.ceil(p["seconds"] / 480))
  # Doubling the length at a fixed tokens per step: the attention part doubles.
  c = recipes.recipe_config(rec)
  f1, f2, f4 = (recipes.train_flops(c, n, 65536 // n, 512, True) for n in (4096, 8192, 16384))
  assert np.isclose(f4 - f2, 2 * (f2 - f1))
  with pytest.raises(ValueError, match="flops_per_second"):
    recipes.plan(rec, 32768, 0.0)
  with pytest.raises(ValueError, match="recipe"):
    train.train("/nonexistent", recipe="nope")


def test_remat_gives_the_same_values_and_gradients():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, 4, 96, 8))
  k = jax.random.normal(keys[1], (1, 2, 96, 8))
  v = jax.random.normal(keys[2], (1, 2, 96, 8))

  def loss(remat):
    return lambda q, k, v: jnp.sum(
        jnp.sin(attention.blockwise_causal_attention(q, k, v, 32, remat)))

  plain = jax.value_and_grad(loss(False), argnums=(0, 1, 2))(q, k, v)
  remat = jax.value_and_grad(loss(True), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_chunk_that_stops_early_skips_the_final_suite(tmp_path):
  tiny = train.model_config(hidden_size=32, intermediate_size=64, num_layers=2, head_dim=8)
  model, final = train.train(tmp_path, recipe="tiny", config=tiny, minutes=0.0,
                             tokens_per_step=512, eval_suite=(), progress=False,
                             final_suite=(("needle_single", 256, 1),))
  kinds = [json.loads(line)["kind"] for line in
           (tmp_path / "train_log.jsonl").read_text().splitlines()]
  assert final is None and kinds == ["start"] and (tmp_path / "hf" / "config.json").is_file()
