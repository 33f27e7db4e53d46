"""Parity with transformers on the committed tiny checkpoints (goldens from
tests/fixtures/make_hf_fixtures.py), and decode == full forward.

Logits are compared by ``max |ours - golden| / max |golden|`` (float32).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import models
from models import decoding, params as params_lib
from tests.models import fixtures as fx

TOL = 1e-4


@pytest.mark.parametrize("name", fx.NAMES)
def test_logits_match_transformers(name):
  g = fx.golden(name)
  logits = fx.model(name)(jnp.asarray(g["input_ids"]))
  assert logits.dtype == jnp.float32 and logits.shape == g["logits"].shape
  assert fx.rel_err(logits, g["logits"]) < TOL


@pytest.mark.parametrize("name", fx.NAMES)
def test_greedy_ragged_batch_matches_transformers(name):
  g = fx.golden(name)
  ids, lengths = fx.ragged_prompts(name)
  out = models.generate(fx.model(name), ids, len(g["tokens_0"]), prompt_lengths=lengths)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.stack([g["tokens_0"], g["tokens_1"]]))
  assert out.density.shape == (len(g["tokens_0"]) - 1, 2, 2, 4)
  np.testing.assert_array_equal(np.asarray(out.density), 1.0)


def test_ragged_batch_equals_each_prompt_alone():
  name = "qwen3"
  ids, lengths = fx.ragged_prompts(name)
  model = fx.model(name)
  batch = np.asarray(models.generate(model, ids, 6, prompt_lengths=lengths).tokens)
  for row in range(2):
    alone = models.generate(model, ids[row:row + 1, :lengths[row]], 6).tokens
    np.testing.assert_array_equal(batch[row], np.asarray(alone)[0])


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_decode_equals_full_forward(name):
  model = fx.model(name)
  ids = fx.golden(name)["input_ids"]  # [2, 12]
  full = np.asarray(model(jnp.asarray(ids)))
  lengths = np.array([8, 5], np.int32)
  logits, state = models.prefill(model, ids[:, :8], lengths, capacity=16)
  rows = np.arange(2)
  assert fx.rel_err(logits, full[rows, lengths - 1]) < TOL
  for step in range(4):
    pos = lengths + step
    logits, state, density = models.decode_step(model, state, ids[rows, pos])
    assert fx.rel_err(logits, full[rows, pos]) < TOL
    np.testing.assert_array_equal(np.asarray(state.caches[0].length), pos + 1)
    assert density.shape == (2, 2, 4)


def test_decode_step_compiles_once():
  model = fx.model("llama3")
  ids, lengths = fx.ragged_prompts("llama3")
  models.generate(model, ids, 3, prompt_lengths=lengths, capacity=24)
  before = decoding._generate_step._cache_size()
  models.generate(model, ids, 7, prompt_lengths=lengths, capacity=24)
  assert decoding._generate_step._cache_size() == before


def test_rope_scaling_matters():
  """The llama3 fixture's goldens depend on its RoPE scaling (the parity test is sensitive)."""
  model = fx.model("llama3")
  g = fx.golden("llama3")
  graphdef, state = nnx.split(model)
  plain = models.Llama(dataclasses.replace(model.config, rope_scaling=None),
                       rngs=nnx.Rngs(0))
  nnx.update(plain, state)
  assert fx.rel_err(plain(jnp.asarray(g["input_ids"])), g["logits"]) > 1e-3


def test_bf16_checkpoint_is_read_exactly():
  """The mistral fixture is stored in BF16: read from raw bytes as ml_dtypes.bfloat16."""
  files = params_lib.checkpoint_files(fx.folder("mistral"))
  tensors = dict(params_lib.read_tensors(files[0]))
  emb = tensors["model.embed_tokens.weight"]
  assert emb.dtype == ml_dtypes.bfloat16 and emb.shape == (128, 64)
  loaded = fx.model("mistral").embed_tokens.embedding[...]
  np.testing.assert_array_equal(np.asarray(loaded), emb.astype(np.float32))


@pytest.mark.parametrize("name", ["mistral", "qwen3"])
def test_bf16_forward_and_generate(name):
  model = fx.model(name, "bfloat16")
  assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
  g = fx.golden(name)
  logits = model(jnp.asarray(g["input_ids"]))
  assert np.isfinite(np.asarray(logits)).all()
  assert fx.rel_err(logits, g["logits"]) < 0.1  # bf16 activations
  ids, lengths = fx.ragged_prompts(name)
  out = models.generate(model, ids, 4, prompt_lengths=lengths)
  assert out.tokens.shape == (2, 4) and np.isfinite(np.asarray(out.density)).all()


def test_sharded_checkpoint_uses_index():
  files = params_lib.checkpoint_files(fx.folder("llama3"))
  assert len(files) > 1 and all("-of-" in f.name for f in files)


def test_capture_shapes_and_padding():
  model = fx.model("qwen3")  # head_dim 32 != hidden / heads
  ids, lengths = fx.ragged_prompts("qwen3")
  qkv = models.capture(model, ids, lengths)
  assert len(qkv) == 2
  q, k, v = qkv[1]
  t = ids.shape[1]
  assert q.shape == (2, 4, t, 32) and k.shape == (2, 2, t, 32) and v.shape == (2, 2, t, 32)
  assert not np.asarray(k[1, :, lengths[1]:]).any()
  # The captured keys are the ones prefill writes to the cache.
  _, state = models.prefill(model, ids, lengths, capacity=t + 4)
  np.testing.assert_allclose(np.asarray(state.caches[1].keys[0, :, :t]), np.asarray(k[0]),
                             rtol=1e-6, atol=1e-6)


def test_sampling_uses_the_key():
  model = fx.model("mistral")
  ids, lengths = fx.ragged_prompts("mistral")
  kw = dict(prompt_lengths=lengths, temperature=1.0)
  a = models.generate(model, ids, 6, key=jax.random.key(1), **kw).tokens
  b = models.generate(model, ids, 6, key=jax.random.key(1), **kw).tokens
  c = models.generate(model, ids, 6, key=jax.random.key(2), **kw).tokens
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
