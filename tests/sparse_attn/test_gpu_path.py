"""The accelerator path (Pallas kernels, counting selection) gives the CPU path's answer.

Both paths run here: the kernels in interpret mode and the selection by counting, against
the jnp references and the bisection, on a ragged bf16 cache (Spotlight with and without
an exact window). Same selection (so the same number of selected tokens, ties included)
and the same output up to bf16 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from sparse_attn._src import selection


def problem():
  rng = np.random.default_rng(0)
  batch, num_kv, group, capacity, dim = 2, 2, 4, 700, 32
  q = jnp.asarray(rng.normal(size=(batch, num_kv * group, dim)), jnp.bfloat16)
  keys = rng.normal(size=(batch, num_kv, capacity, dim)) + rng.normal(size=(1, num_kv, 1, dim))
  values = rng.normal(size=(batch, num_kv, capacity, dim))
  cache = sa.KVCache(jnp.asarray(keys, jnp.bfloat16), jnp.asarray(values, jnp.bfloat16),
                     jnp.array([700, 333], jnp.int32))
  return q, cache


def estimators():
  params = sa.hash_heads.init_params(jax.random.PRNGKey(3), 2, 32)
  return {"spotlight": sa.spotlight(params, fraction=0.05),
          "spotlight_window": sa.spotlight(params, fraction=0.05, sinks=4, local=16),
          "topk_simhash": sa.topk(fraction=0.05, predictor=sa.predictors.simhash(bits=64)),
          "dense": sa.dense()}


@pytest.fixture
def accelerator_path(monkeypatch):
  """Kernels on (interpreted) and counting selection, for functions traced meanwhile."""
  monkeypatch.setenv("SPARSE_ATTN_PALLAS", "1")
  monkeypatch.setattr(selection, "prefers_counting", lambda: True)
  jax.clear_caches()  # module-level jitted functions (dense_attention) trace again
  yield
  jax.clear_caches()  # and later tests do not reuse these traces


@pytest.mark.parametrize("name", ["spotlight", "spotlight_window", "topk_simhash", "dense"])
def test_kernels_and_counting_match_the_cpu_path(name, request):
  q, cache = problem()
  key = jax.random.PRNGKey(4)
  cpu = estimators()[name]
  want = cpu.attend(q, cache, cpu.init(cache, key), None)
  request.getfixturevalue("accelerator_path")
  gpu = estimators()[name]
  got = gpu.attend(q, cache, gpu.init(cache, key), None)
  np.testing.assert_array_equal(np.asarray(got.stats["selected"]),
                                np.asarray(want.stats["selected"]))
  np.testing.assert_allclose(np.asarray(got.out, np.float32), np.asarray(want.out, np.float32),
                             atol=8e-3, rtol=8e-3)  # one bf16 rounding step of the output
  np.testing.assert_allclose(np.asarray(got.lse), np.asarray(want.lse), rtol=2e-6)
