"""Every estimator that uses a kernel exports its decode step for a TPU from this CPU.

``append`` + ``attend`` is exported with ``jax.export`` for ``tpu`` under an abstract TPU
mesh, inside ``backend.target("tpu")`` with ``SPARSE_ATTN_PALLAS=1`` (TPU is not in
``backend.VERIFIED``), and the module must hold the kernels' Mosaic calls
(``tpu_custom_call``): the TPU path is the kernels, not the jnp references. Mosaic's own
compilation needs a TPU and is not run; the kernels' values are checked in TPU interpret
mode in ``tests/pallas_kernels/test_tpu_*``.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractMesh

import sparse_attn as sa
from pallas_kernels import backend

try:
  from jax.sharding import AbstractDevice
except ImportError:  # jax 0.10
  from jax._src.mesh import AbstractDevice

TPU = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="TPU v5 lite", num_cores=1, platform="tpu"))


# The Mosaic kernels each step must call (at least; with SPARSE_ATTN_PALLAS=1 the pending
# selection kernels appear too).
KERNELS = {
    "dense": {"decode_attention_tpu"},
    "spotlight": {"pack_signs", "hamming_scores", "sparse_decode_attention_tpu"},
    "topk_simhash": {"sparse_decode_attention_tpu"},
    "magicpig": {"table_match_counts", "sparse_decode_attention_tpu"},
    "vattention_simhash": {"sparse_decode_attention_tpu"},
}


def estimators():
  params = sa.hash_heads.init_params(jax.random.PRNGKey(3), 2, 128)
  return {
      "dense": sa.dense(),
      "spotlight": sa.spotlight(params, fraction=0.02),
      "topk_simhash": sa.topk(fraction=0.02, predictor=sa.predictors.simhash(bits=128)),
      "magicpig": sa.magicpig(K=10, L=150),
      "vattention_simhash": sa.vattention_importance(0.05, 0.05, guarantee="output"),
  }


@pytest.mark.parametrize("name", list(estimators()))
def test_the_decode_step_exports_for_tpu_with_mosaic_kernels(name, monkeypatch):
  monkeypatch.setenv("SPARSE_ATTN_PALLAS", "1")
  est = estimators()[name]
  q, cache = sa.synthetic.llm_like(jax.random.PRNGKey(0), batch=2, num_kv_heads=2, group=4,
                                   capacity=1000, head_dim=128, dtype=jnp.bfloat16,
                                   length=jnp.array([900, 333], jnp.int32))

  def step(q, cache, index, key):
    grown = cache._replace(length=cache.length + 1)
    return est.attend(q, grown, est.append(index, grown), key).out

  with backend.target("tpu"):
    index = jax.eval_shape(est.init, cache, jax.random.PRNGKey(1))  # the shapes only
    with jax.sharding.use_abstract_mesh(TPU):
      exported = export.export(jax.jit(step), platforms=["tpu"])(
          q, cache, index, jax.random.PRNGKey(2))
  assert exported.platforms == ("tpu",)
  module = exported.mlir_module()
  assert "tpu_custom_call" in module
  called = set(re.findall(r'kernel_name = "(\w+)"', module))
  assert KERNELS[name] <= called, (name, called)
