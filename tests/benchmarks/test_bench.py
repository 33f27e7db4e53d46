"""``python -m benchmarks bench``: its dense baseline is exact attention."""

import numpy as np

import sparse_attn as sa
from benchmarks.bench import dense_xla
from tests.sparse_attn.test_attention import random_problem


def test_dense_attention_matches_jax_nn_dot_product_attention_used_by_bench():
  q, cache = random_problem(9, lengths=(96, 50, 7), scale=2.0)
  np.testing.assert_allclose(np.asarray(dense_xla(q, cache)),
                             np.asarray(sa.dense_attention(q, cache).out), rtol=2e-5, atol=2e-6)
