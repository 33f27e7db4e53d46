"""``sa.vattention_importance`` on the accelerator path (kernels interpreted, counting
selection): the CPU path's sample, and the statistical promises of the estimator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from benchmarks import verify
from tests import reference as ref
from tests.sparse_attn.test_gpu_path import accelerator_path  # noqa: F401 - a fixture
from tests.sparse_attn.test_importance import problem


def estimators():
  return {"output": sa.vattention_importance(0.05, 0.05, guarantee="output", min_base=32),
          "uniform": sa.vattention_importance(density=0.05, proposal=None, min_base=32)}


@pytest.mark.parametrize("name", ["output", "uniform"])
def test_the_gpu_path_draws_the_cpu_paths_sample(name, request):
  # The counter-based uniforms are the same on both paths, so the same tokens are read;
  # the outputs differ by the attention kernel's summation order only.
  q, cache = problem(lengths=(2048, 1111), dtype=jnp.bfloat16)
  key = jax.random.PRNGKey(5)
  cpu = estimators()[name]
  want = cpu.attend(q, cache, cpu.init(cache, jax.random.PRNGKey(1)), key)
  request.getfixturevalue("accelerator_path")
  gpu = estimators()[name]
  got = gpu.attend(q, cache, gpu.init(cache, jax.random.PRNGKey(1)), key)
  for stat in ("selected", "budget", "base", "read", "temperature", "selected_overflow"):
    np.testing.assert_array_equal(np.asarray(got.stats[stat]), np.asarray(want.stats[stat]),
                                  err_msg=stat)
  assert float(jnp.max(want.stats["budget"])) > 0  # a sample was drawn
  np.testing.assert_allclose(np.asarray(got.out, np.float32), np.asarray(want.out, np.float32),
                             atol=8e-3, rtol=8e-3)  # one bf16 rounding step of the output
  np.testing.assert_allclose(np.asarray(got.lse), np.asarray(want.lse), rtol=1e-5)


@pytest.mark.parametrize("name", ["output", "uniform"])
def test_unbiased_on_the_gpu_path(name, accelerator_path):  # noqa: F811
  # test_importance's unbiasedness test on this path, 400 keys on 8 queries: |z| <= 4 for
  # each denominator (false alarm about 0.05% in all for normal means) and for the 8 * 32
  # numerator components (about 2%). "uniform" (density 5%, no codes): every head samples
  # its rest uniformly, the short row's (1500 tokens) at about b = 1 to 7 tokens, so the
  # empty-draw fallback (probability about e^-b) is exercised and must not bias it.
  q, cache = problem(scale=0.5)
  est = {"output": estimators()["output"],
         "uniform": estimators()["uniform"]}[name]
  index = est.init(cache, jax.random.PRNGKey(1))
  exact_out, exact_lse = ref.dense_attention(q, cache.keys, cache.values, cache.length)
  outs, lses, sampled, temps = jax.lax.map(
      jax.jit(lambda k: (lambda r: (r.out, r.lse, r.stats["budget"], r.stats["temperature"]))(
          est.attend(q, cache, index, k))), jax.random.split(jax.random.PRNGKey(2), 400))
  assert float(jnp.std(sampled, axis=0).max()) > 0  # the sample really is random
  if name == "uniform":
    assert float(jnp.max(temps)) == 0
    assert float(jnp.min(sampled)) >= 1 and float(jnp.mean(sampled[:, 1])) <= 10
  deviation, se, z = ref.monte_carlo_bias(outs, lses, exact_out, exact_lse)
  assert np.all(np.abs(deviation) <= 4 * se), (deviation, se)
  assert np.abs(z).max() <= 4


def test_coverage_on_the_gpu_path(accelerator_path):  # noqa: F811
  # test_verify's importance coverage experiment on this path (4 heads from flat to peaked,
  # 100 keys each, output guarantee eps = 0.1): failures <= delta + 3 sd on every unclipped
  # head (false alarm about 0.2% per head if the true rate were delta).
  cfg = verify.Config(length=2048, heads=4, trials=100, cases=(("output", 0.1),),
                      proposal="simhash")
  scales, q, cache = verify.problem(cfg)
  exact = sa.dense_attention(q, cache)
  est = sa.vattention_importance(0.1, cfg.delta, guarantee="output")
  cov = verify.coverage(cfg, est, q, cache, exact, "output", 0.1)
  assert np.all(cov["passed"]), cov
