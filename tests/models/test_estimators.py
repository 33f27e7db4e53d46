"""Generation with each sparse estimator, under jit, with a ragged batch: density per step is
1 on dense layers and < 1 on sparse ones, and nothing is NaN."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import models
import sparse_attn as sa
from tests.models import fixtures as fx

LENGTHS = np.array([48, 36], np.int32)  # tiny contexts: small windows and budgets below
NEW = 5


def estimators(name, config):
  if name == "magicpig":
    return sa.magicpig(K=4, L=20, sinks=2, local=4)
  if name == "vattention":
    return sa.vattention(epsilon=0.1, delta=0.1, sinks=2, local=4, min_base=8)
  if name == "topk":
    return sa.topk(fraction=0.25, sinks=2, local=4)
  keys = jax.random.split(jax.random.key(3), config.num_layers)  # one hash head per layer
  return [sa.spotlight(sa.hash_heads.init_params(k, config.num_kv_heads, config.head_dim),
                       fraction=0.25, min_tokens=4) for k in keys]


@pytest.mark.parametrize("name", ["magicpig", "vattention", "topk", "spotlight"])
def test_generate_with_estimator(name):
  model = fx.model("qwen3")
  config = model.config
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.vocab_size, (2, LENGTHS.max())).astype(np.int32)
  out = models.generate(model, ids, NEW, attention=estimators(name, config), dense_layers=(0,),
                        key=jax.random.key(0), prompt_lengths=LENGTHS)
  tokens, density = np.asarray(out.tokens), np.asarray(out.density)
  assert tokens.shape == (2, NEW) and ((tokens >= 0) & (tokens < config.vocab_size)).all()
  assert density.shape == (NEW - 1, config.num_layers, 2, config.num_heads)
  assert np.isfinite(density).all()
  np.testing.assert_array_equal(density[:, 0], 1.0)
  assert (density[:, 1] > 0).all() and (density[:, 1] < 1).all(), density[:, 1]
