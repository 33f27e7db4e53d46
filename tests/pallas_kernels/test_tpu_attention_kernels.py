"""The TPU (Mosaic) variants of the two attention kernels, checked without a TPU.

* Lowering: ``jax.export`` for ``platforms=["tpu"]`` on a CPU runs Pallas' Mosaic lowering
  (and its block-shape rules) under an abstract TPU mesh; the module must hold a
  ``tpu_custom_call``. Mosaic's own compilation (layouts, DMA checks) happens only on a TPU.
* Numerics: Pallas' TPU interpret mode (``pltpu.InterpretParams``) runs the same kernels on
  the CPU, DMAs, semaphores and scalar prefetch simulated, against the jnp references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractMesh

from pallas_kernels import backend
from pallas_kernels import decode_attention as da
from pallas_kernels import sparse_decode_attention as sda
from tests.pallas_kernels.test_sparse_decode_attention import problem as sparse_reference_problem

try:  # public from jax 0.11; jax 0.10 keeps it in jax._src.mesh
  from jax.sharding import AbstractDevice
except ImportError:
  from jax._src.mesh import AbstractDevice

DTYPES = [jnp.float32, jnp.bfloat16]


@pytest.fixture
def as_tpu(monkeypatch):
  """The backend believes it is on a TPU."""
  monkeypatch.setattr(backend, "platform", lambda: "tpu")
  monkeypatch.setattr(backend, "compiler_params", lambda: pltpu.CompilerParams())


def tpu_module(fn, *args) -> str:
  """The exported StableHLO of ``fn`` lowered for a TPU (a v5e, one core)."""
  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
      device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*args)
  return exported.mlir_module()


def dense_problem(dtype, batch=2, num_kv=2, group=3, capacity=300, dim=128, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, num_kv * group, dim)) * 2, dtype)
  keys = jnp.asarray(rng.normal(size=(batch, num_kv, capacity, dim)), dtype)
  values = jnp.asarray(rng.normal(size=(batch, num_kv, capacity, dim)), dtype)
  length = jnp.asarray(([0, capacity - 3, 17] * batch)[:batch], jnp.int32)
  return q, keys, values, length


def sparse_problem(dtype, per_query_head=False, capacity=1000, n=300):
  """``test_sparse_decode_attention``'s problem at head dim 128 (a TPU lane width)."""
  return sparse_reference_problem(per_query_head, dtype, n=n, capacity=capacity, dim=128)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_decode_lowers_for_tpu(as_tpu, dtype):
  # S = 1000 is no multiple of the block (128) or the split (256); a GQA group of 4.
  args = dense_problem(dtype, batch=2, group=4, capacity=1000)
  text = tpu_module(lambda *a: da.decode_attention_kernel(
      *a, block_sizes=da.BlockSizes(block=128, split=256)), *args)
  assert "tpu_custom_call" in text and "triton" not in text


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_decode_tpu_interpret_equals_reference(dtype):
  args = dense_problem(dtype)
  ref_out, ref_lse = da.decode_attention_reference(*args)
  # S = 300 is no multiple of the block (64) or the split (128); length 297 is ragged.
  out, lse = da.decode_attention_kernel(*args, block_sizes=da.BlockSizes(block=64, split=128),
                                        interpret=pltpu.InterpretParams())
  assert out.dtype == lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(lse)[0], -np.inf)  # the empty row
  np.testing.assert_allclose(np.asarray(lse)[1:], np.asarray(ref_lse)[1:], rtol=1e-5)


def test_dense_decode_tpu_interpret_non_finite_keys_and_garbage_past_length():
  q, keys, values, length = dense_problem(jnp.float32, batch=3)
  keys = keys.at[2, 1, 5].set(jnp.nan)  # a valid position: KV head 1 of row 2 is NaN
  keys = keys.at[1, :, 297:].set(jnp.nan)  # past length: never part of the result
  values = values.at[1, :, 297:].set(jnp.nan)
  out, lse = da.decode_attention_kernel(q, keys, values, length,
                                        da.BlockSizes(block=64, split=128),
                                        interpret=pltpu.InterpretParams())
  ref_out, ref_lse = da.decode_attention_reference(
      q, keys.at[1, :, 297:].set(0), values.at[1, :, 297:].set(0), length)
  out, lse = np.asarray(out), np.asarray(lse)
  assert np.isnan(out[2, 3:]).all() and np.isnan(lse[2, 3:]).all()
  np.testing.assert_allclose(out[:2], np.asarray(ref_out)[:2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[2, :3], np.asarray(ref_out)[2, :3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse[1], np.asarray(ref_lse)[1], rtol=1e-5)


@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_decode_lowers_for_tpu(as_tpu, dtype, per_query_head):
  # N = 300 entries: no multiple of the block (128) or the split (256); GQA groups of 3.
  args = sparse_problem(dtype, per_query_head)
  text = tpu_module(lambda *a: sda.sparse_decode_attention_kernel(
      *a, block_sizes=sda.BlockSizes(block=128, split=256)), *args)
  assert "tpu_custom_call" in text and "triton" not in text
  text = tpu_module(sda.sparse_decode_attention_kernel, *args)  # the TPU's default sizes
  assert "tpu_custom_call" in text


def test_sparse_tpu_block_sizes_are_whole_tiles_and_blocks():
  assert sda.sparse_decode_attention_tpu.resolve(None, None, 300) == (128, 384)
  assert sda.sparse_decode_attention_tpu.resolve(20, 100, 300) == (32, 128)
  assert sda.sparse_decode_attention_tpu.resolve(64, 1000, 300) == (64, 320)


@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_decode_tpu_interpret_equals_reference(dtype, per_query_head):
  args = sparse_problem(dtype, per_query_head)
  ref_out, ref_lse = sda.sparse_decode_attention_reference(*args)
  out, lse = sda.sparse_decode_attention_kernel(
      *args, block_sizes=sda.BlockSizes(block=128, split=256),
      interpret=pltpu.InterpretParams())
  assert out.dtype == lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-5, atol=2e-5)
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))  # the empty list
  finite = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5)


def test_sparse_decode_tpu_reads_only_listed_rows_without_races():
  """NaN in every unlisted row and wild indices past ``count`` change nothing; with eager
  DMAs and the race detector, the double buffering shows no race."""
  q, keys, values, indices, log_weights, count = sparse_problem(jnp.bfloat16, capacity=600,
                                                                n=200)
  ref_out, ref_lse = sda.sparse_decode_attention_reference(q, keys, values, indices,
                                                           log_weights, count)
  listed = np.zeros(keys.shape[:3], bool)
  for b in range(indices.shape[0]):
    for h in range(indices.shape[1]):
      listed[b, h, np.asarray(indices[b, h, :count[b, h]])] = True
  keys = jnp.where(jnp.asarray(listed)[..., None], keys, jnp.nan)
  values = jnp.where(jnp.asarray(listed)[..., None], values, jnp.nan)
  past = jnp.arange(indices.shape[2])[None, None, :] >= count[..., None]
  indices = jnp.where(past, 10**6, indices)
  params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
  out, lse = sda.sparse_decode_attention_kernel(
      q, keys, values, indices, log_weights, count,
      block_sizes=sda.BlockSizes(block=64, split=128), interpret=params)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(ref_lse)))
  try:  # the detector's state is not public API
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call
  except ImportError:
    return
  assert not interpret_pallas_call.races.races_found
