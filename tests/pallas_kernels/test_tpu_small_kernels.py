"""The five small kernels on a TPU's terms, without one.

* Lowering: ``jax.export`` for ``tpu`` under an abstract TPU mesh runs Pallas' Mosaic
  lowering on the CPU, with its block-shape rules (a block's last two dimensions are
  multiples of 8 and 128 or the array's own) and its lack of unsigned reductions. It stops
  before Mosaic compiles the module (that needs a TPU).
* Values: TPU interpret mode (``pltpu.InterpretParams``) runs each kernel with the TPU
  block layout the wrappers choose, simulating VMEM, SMEM and the DMAs between blocks, and
  compares with the ``*_reference`` twin, on token counts that are not a multiple of the
  block.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractMesh

from pallas_kernels import backend
from pallas_kernels import hamming_scores as hs
from pallas_kernels import kept_positions as kp
from pallas_kernels import pack_signs as ps
from pallas_kernels import score_histogram as sh
from pallas_kernels import table_match_counts as tmc

try:
  from jax.sharding import AbstractDevice
except ImportError:  # jax 0.10
  from jax._src.mesh import AbstractDevice

TPU = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
INTERPRET = pltpu.InterpretParams()


@pytest.fixture
def as_tpu():
  """The backend lowers for a TPU (so the wrappers pick Mosaic's block layout);
  ``backend.target`` clears jit's caches on both sides: a kernel traced for one backend
  must not be reused for another (the platform is not part of a cache key)."""
  with backend.target("tpu"):
    yield


def test_target_names_the_platform_within_its_block():
  before = backend.platform()
  with backend.target("tpu"):
    assert backend.platform() == "tpu"
    assert isinstance(backend.compiler_params(), pltpu.CompilerParams)
  assert backend.platform() == before
  with pytest.raises(ValueError, match="name must be"):
    with backend.target("cuda"):
      pass


def test_interpret_params_reach_pallas_call(as_tpu):
  """TPU interpret mode is asked for with an ``InterpretParams``, not ``True`` (that would
  run Pallas' generic interpreter, without the TPU's memory spaces)."""
  assert backend.resolve_interpret(INTERPRET) is INTERPRET
  assert backend.resolve_interpret(None) is False and not backend.masks_edges(INTERPRET)


def mosaic_module(fn, *args) -> str:
  """The exported module of ``fn`` for a TPU; it holds the kernels' Mosaic custom calls."""
  with jax.sharding.use_abstract_mesh(TPU):
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*args)
  text = exported.mlir_module()
  assert "tpu_custom_call" in text
  return text


def test_hamming_scores_lowers_for_tpu(as_tpu):
  q = jnp.zeros((2, 8, 4), jnp.uint32)
  k = jnp.zeros((2, 2, 1000, 4), jnp.uint32)  # 1000 is not a multiple of the 256 block
  mosaic_module(lambda q, k, n: hs.hamming_scores_kernel(q, k, n, 128, hs.BlockSizes(256)),
                q, k, jnp.array([1000, 3], jnp.int32))


@pytest.mark.parametrize("group,dim,capacity,block", [(4, 128, 300, 128), (3, 40, 97, 32)])
def test_hamming_scores_interprets_on_tpu(as_tpu, group, dim, capacity, block):
  kq, kk = jax.random.split(jax.random.PRNGKey(group))
  q = ps.pack_signs_reference(jax.random.normal(kq, (2, 2 * group, dim)))
  k = ps.pack_signs_reference(jax.random.normal(kk, (2, 2, capacity, dim)))
  length = jnp.array([capacity, capacity // 3], jnp.int32)
  got = hs.hamming_scores_kernel(q, k, length, dim, hs.BlockSizes(tokens=block),
                                 interpret=INTERPRET)
  want = hs.hamming_scores_reference(q, k, length, dim)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pack_signs_lowers_for_tpu(as_tpu, dtype):
  mosaic_module(lambda x: ps.pack_signs_kernel(x, ps.BlockSizes(rows=16)),
                jnp.zeros((37, 130), dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(37, 40), (3, 5, 64)])
def test_pack_signs_interprets_on_tpu(as_tpu, shape, dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), shape).astype(dtype)
  x = x.at[(0,) * (len(shape) - 1)].set(0.0)  # exact zeros count as negative in both
  x = x.at[..., 31].set(1.0)  # bit 31: the int32 sum's sign bit
  got = ps.pack_signs_kernel(x, ps.BlockSizes(rows=16), interpret=INTERPRET)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ps.pack_signs_reference(x)))
  assert got.dtype == jnp.uint32


@pytest.mark.parametrize("num_kv,group,tables,capacity", [(1, 4, 3, 300), (2, 4, 150, 1000)])
def test_table_match_counts_lowers_for_tpu(as_tpu, num_kv, group, tables, capacity):
  words = tmc.code_words(10, tables)  # MagicPIG: K = 10, L = 150 tables
  q = jnp.zeros((2, num_kv * group, words), jnp.uint32)
  k = jnp.zeros((2, num_kv, capacity, words), jnp.uint32)
  mosaic_module(lambda q, k, n: tmc.table_match_counts_kernel(q, k, n, 10, tables, 2,
                                                              tmc.BlockSizes(128)),
                q, k, jnp.array([capacity, 17], jnp.int32))


@pytest.mark.parametrize("group,K,tables,capacity,block", [
    (4, 3, 7, 300, 128), (3, 10, 15, 97, 32)])
def test_table_match_counts_interprets_on_tpu(as_tpu, group, K, tables, capacity, block):
  rng = np.random.default_rng(group)
  num_kv = 2
  q = jnp.asarray(rng.integers(0, 2**K, size=(2, num_kv * group, tables)), jnp.uint32)
  k = jnp.asarray(rng.integers(0, 2**K, size=(2, num_kv, capacity, tables)), jnp.uint32)
  k = k.at[0, 0, :9].set(q[0, 0])
  q, k = tmc.pack_codes(q, K), tmc.pack_codes(k, K)
  length = jnp.array([capacity, capacity // 3], jnp.int32)
  got = tmc.table_match_counts_kernel(q, k, length, K, tables, None,
                                      tmc.BlockSizes(tokens=block), interpret=INTERPRET)
  want = tmc.table_match_counts_reference(q, k, length, K, tables)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# The histogram's block need not be 128-aligned.
@pytest.mark.parametrize("block, bins", [(256, 1024), (100, 1024), (256, 256)])
def test_score_histogram_lowers_for_tpu(as_tpu, block, bins):
  mosaic_module(lambda s, n: sh.score_histogram_kernel(s, n, -1, 4, 16, sh.BlockSizes(block),
                                                       bins=bins),
                jnp.zeros((2, 2, 1000), jnp.int32), jnp.array([1000, 333], jnp.int32))


def histogram_problem(capacity=310):  # 310: no multiple of 100 or 128
  """Scores in [-1, 40) on a full row and a ragged one."""
  rng = np.random.default_rng(capacity)
  scores = jnp.asarray(rng.integers(-1, 40, size=(2, 2, capacity)), jnp.int32)
  return scores, jnp.array([capacity, capacity // 3], jnp.int32)


@pytest.mark.parametrize("block, bins", [(128, 1024), (100, 1024), (128, 256)])
def test_score_histogram_interprets_on_tpu(as_tpu, block, bins):
  scores, length = histogram_problem()
  got = sh.score_histogram_kernel(scores, length, -1, 4, 16, sh.BlockSizes(block),
                                  interpret=INTERPRET, bins=bins)
  want = sh.score_histogram_reference(scores, length, -1, 4, 16, block, bins)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def kept_problem(block, capacity=310, size=40):
  """A counting plan (``selection.counting_plan``) for ``histogram_problem``'s scores."""
  from sparse_attn._src import selection
  scores, length = histogram_problem(capacity)
  keep = jnp.array([[size, 7], [0, size]], jnp.int32)
  hist = sh.score_histogram_reference(scores, length, -1, 4, 16, block)
  plan = selection.counting_plan(hist, keep, -1)
  return (scores, length) + tuple(plan), keep


@pytest.mark.parametrize("size", [64, 700])  # 700: two chunks of output slots
def test_kept_positions_lowers_for_tpu(as_tpu, size):
  args, _ = kept_problem(256, capacity=1000)
  mosaic_module(lambda *a: kp.kept_positions_kernel(*a, sinks=4, local=16, size=size,
                                                    block=256), *args)


@pytest.mark.parametrize("block,chunk", [(128, 512), (100, 16)])
def test_kept_positions_interprets_on_tpu(as_tpu, monkeypatch, block, chunk):
  """With 16-slot chunks, a block's kept tokens span chunks and most chunks are skipped."""
  monkeypatch.setattr(kp, "TPU_SLOT_CHUNK", chunk)
  args, keep = kept_problem(block)
  got = kp.kept_positions_kernel(*args, sinks=4, local=16, size=40, block=block,
                                 interpret=INTERPRET)
  want = kp.kept_positions_reference(*args, sinks=4, local=16, size=40, block=block)
  for b, h in np.ndindex(keep.shape):  # past the kept count the slots are unspecified
    np.testing.assert_array_equal(np.asarray(got)[b, h, :keep[b, h]],
                                  np.asarray(want)[b, h, :keep[b, h]])
