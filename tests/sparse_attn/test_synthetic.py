"""The built-in synthetic attention spans flat to peaked heads, as documented."""

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa
from sparse_attn import synthetic


def test_query_scale_moves_attention_from_flat_to_peaked():
  n = 2048
  entropies = []
  for scale in (0.25, 1.0, 4.0):
    q, cache = synthetic.llm_like(jax.random.PRNGKey(0), batch=1, num_kv_heads=2, group=2,
                                  capacity=n, head_dim=64, query_scale=scale)
    scores = jnp.einsum("bhd,bhsd->bhs", q, jnp.repeat(cache.keys, 2, axis=1)) / 8.0
    p = np.asarray(jax.nn.softmax(scores, axis=-1), np.float64)
    entropies.append(float(np.mean(-(p * np.log(p + 1e-300)).sum(-1)) / np.log(n)))
    assert cache.keys.shape == (1, 2, n, 64) and q.shape == (1, 4, 64)
  assert entropies[0] > 0.9 and entropies[2] < 0.1 and entropies[0] > entropies[1] > entropies[2]


def test_same_key_same_data_and_dtype():
  a = synthetic.llm_like(jax.random.PRNGKey(1), capacity=64, dtype=jnp.bfloat16)
  b = synthetic.llm_like(jax.random.PRNGKey(1), capacity=64, dtype=jnp.bfloat16)
  assert a[0].dtype == jnp.bfloat16 and a[1].keys.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(a[1].keys, np.float32),
                                np.asarray(b[1].keys, np.float32))
  assert isinstance(a[1], sa.KVCache)
