"""``models.decode_loop``: steps inside one compiled scan equal as many ``decode_step`` calls
with the argmax token fed back, dense and with an estimator in every layer."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import models
import sparse_attn as sa
from tests.models import fixtures as fx

STEPS = 3


def attention(name, config):
  if name == "dense":
    return None
  return sa.spotlight(sa.hash_heads.init_params(jax.random.key(3), config.num_kv_heads,
                                                config.head_dim), fraction=0.25, min_tokens=4)


@pytest.mark.parametrize("name", ["dense", "spotlight"])
def test_loop_equals_steps(name):
  model = fx.model("llama3")
  ids, lengths = fx.ragged_prompts("llama3")
  est, key = attention(name, model.config), jax.random.key(5)
  logits, state = models.prefill(model, ids, lengths, capacity=24, attention=est, key=key)
  first = np.asarray(logits).argmax(-1).astype(np.int32)
  token, want, step_logits = first, [], None
  for step_key in jax.random.split(key, STEPS):
    step_logits, state, _ = models.decode_step(model, state, token, attention=est, key=step_key)
    token = np.asarray(step_logits).argmax(-1).astype(np.int32)
    want.append(token)
  _, state = models.prefill(model, ids, lengths, capacity=24, attention=est, key=key)
  out, state = models.decode_loop(model, state, first, STEPS, attention=est, key=key)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.stack(want, axis=1))
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(step_logits), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(state.caches[0].length), lengths + STEPS)
  density = np.asarray(out.density)
  assert density.shape == (STEPS, model.config.num_layers, 2, model.config.num_heads)
  assert (density == 1).all() if est is None else (density < 1).all()


def test_steps_must_be_positive():
  model = fx.model("llama3")
  ids, lengths = fx.ragged_prompts("llama3")
  _, state = models.prefill(model, ids, lengths, capacity=24)
  with pytest.raises(ValueError, match="steps"):
    models.decode_loop(model, state, ids[:, 0], 0)
