"""MagicPIG's scan retrieval (the accelerators'): the tables' sample, and the GPU path's.

``retrieval="scan"`` counts collisions by a pass over every packed code instead of reading
buckets; the tokens that collide in ``min_collisions`` tables are the same, so the estimate
is the same. On the accelerator path (kernels in interpret mode: the packed-code scan, the
kept-positions compaction and the attention pass that computes the weights from each key's
score) the sample is still the same and the estimate unbiased over plane seeds.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from pallas_kernels import backend
from sparse_attn import synthetic
from tests import reference as ref
from tests.sparse_attn.test_gpu_path import accelerator_path  # noqa: F401 (a fixture)
from tests.sparse_attn.test_magicpig import SMALL, small_problem


def test_backend_picks_tables_on_a_cpu_and_the_scan_elsewhere():
  assert backend.magicpig_retrieval() == "tables"  # this machine
  for name in ("gpu", "tpu"):
    with backend.target(name):
      assert backend.magicpig_retrieval() == "scan"
  q, cache = small_problem()
  assert sa.magicpig(**SMALL).init(cache, jax.random.PRNGKey(1)).tables is not None
  assert sa.magicpig(**SMALL, retrieval="scan").init(cache, jax.random.PRNGKey(1)).tables is None
  with pytest.raises(ValueError, match="retrieval"):
    sa.magicpig(retrieval="buckets")
  del q


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scan_and_tables_give_the_same_estimate_before_and_after_appends(dtype):
  q, full = small_problem(lengths=(512, 400), dtype=dtype)
  prefill = full._replace(length=jnp.array([450, 360], jnp.int32))
  results = {}
  for retrieval in ("tables", "scan"):
    est = sa.magicpig(**SMALL, tail=64, retrieval=retrieval)
    index = est.init(prefill, jax.random.PRNGKey(3))
    before = est.attend(q, prefill, index, None)
    index = est.append(index, full)  # 62 and 40 tokens past the tables: the tail
    results[retrieval] = before, est.attend(q, full, index, None)
  for tables, scan in zip(*results.values()):
    np.testing.assert_array_equal(np.asarray(scan.stats["sampled"]),
                                  np.asarray(tables.stats["sampled"]))
    np.testing.assert_allclose(np.asarray(scan.out), np.asarray(tables.out), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(scan.lse), np.asarray(tables.lse), rtol=1e-6)
    assert float(jnp.min(scan.stats["sampled"])) > 10  # sampling is exercised


def test_accelerator_path_equals_the_cpu_path_bf16(request):
  q, cache = small_problem(lengths=(320, 201), capacity=320, dtype=jnp.bfloat16)
  key = jax.random.PRNGKey(2)
  # K=10 as the paper's; L=50 tables in 16 words, 10 of them across two words.
  cpu = sa.magicpig(K=10, L=50, sinks=4, local=16)
  want = cpu.attend(q, cache, cpu.init(cache, key), None)
  request.getfixturevalue("accelerator_path")
  gpu = sa.magicpig(K=10, L=50, sinks=4, local=16, retrieval="scan")
  got = gpu.attend(q, cache, gpu.init(cache, key), None)
  np.testing.assert_array_equal(np.asarray(got.stats["sampled"]),
                                np.asarray(want.stats["sampled"]))
  np.testing.assert_allclose(np.asarray(got.out), np.asarray(want.out), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got.lse), np.asarray(want.lse), rtol=1e-6)
  assert np.isfinite(np.asarray(got.out)).all()


def test_accelerator_path_is_unbiased_over_plane_seeds(accelerator_path):  # noqa: F811
  # test_magicpig's unbiasedness test on the accelerator path: 300 seeds at n = 2048, K=10,
  # L=150. z-tests: |z| <= 3 for each of the 2 denominators (false alarm 0.27% each) and
  # |z| <= 4 for each of the 2*32 numerator components (Bonferroni, about 0.4% in all); the
  # seeds are fixed, so the test is deterministic.
  seeds = 300
  q, cache = synthetic.llm_like(jax.random.PRNGKey(7), batch=1, num_kv_heads=1, group=2,
                                capacity=2048, head_dim=32, query_scale=0.7)
  est = sa.magicpig(K=10, L=150, max_selected=1.0, retrieval="scan")
  exact_out, exact_lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)

  @jax.jit
  def one(key):
    res = est.attend(q, cache, est.init(cache, key), None)
    return res.out, res.lse, res.density

  outs, lses, density = jax.lax.map(one, jax.random.split(jax.random.PRNGKey(8), seeds))
  ratio = np.exp(ref.f64(lses) - exact_lse)  # D_hat / D
  num = ratio[..., None] * ref.f64(outs)      # N_hat / D, to compare with N / D = o
  se = ratio.std(0, ddof=1) / math.sqrt(seeds)
  assert np.all(np.abs(ratio.mean(0) - 1) <= 3 * se), (ratio.mean(0), se)
  z = (num.mean(0) - exact_out) / (num.std(0, ddof=1) / math.sqrt(seeds))
  assert np.abs(z).max() <= 4, np.abs(z).max()
  assert 0.005 < float(density.mean()) < 0.2  # a sparse estimate, not dense in disguise
