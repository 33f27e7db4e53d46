"""Every kernel lowers through Pallas' Triton path, as it does on a GPU, without one.

``jax.export`` lowers for ``cuda`` on a CPU-only machine; with ``debug=True`` the Triton
module is printed. Two faults found on an H100 (jax 0.11.2) stay fixed here: Triton cannot
compile ``math.ctpop`` (``lax.population_count``), and it does not clip a partial last
block, so loads and stores past the array's edge must carry a mask.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

import sparse_attn as sa
from pallas_kernels import backend
from pallas_kernels import decode_attention as da
from pallas_kernels import hamming_scores as hs
from pallas_kernels import kept_positions as kp
from pallas_kernels import pack_signs as ps
from pallas_kernels import poisson_positions as pp
from pallas_kernels import score_histogram as sh
from pallas_kernels import sparse_decode_attention as sda
from pallas_kernels import table_match_counts as tmc

# A CUDA-only capability check, no device needed (the Triton lowering falls back to sm_90).
TRITON_CALL = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


@pytest.fixture
def as_gpu(monkeypatch):
  """The backend believes it is on a GPU; ``pallas_call`` prints its Triton module."""
  monkeypatch.setattr(backend, "platform", lambda: "gpu")
  monkeypatch.setattr(backend, "compiler_params",
                      lambda: pltriton.CompilerParams(num_warps=4, num_stages=2))
  debug_pl = type("pl", (), {"pallas_call": staticmethod(
      functools.partial(pl.pallas_call, debug=True))})
  monkeypatch.setattr(backend, "pl", debug_pl)


def triton_module(capsys, fn, *args) -> str:
  export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[TRITON_CALL])(*args)
  text = capsys.readouterr().out
  assert "The Triton module" in text
  return text


def masked(text: str, op: str) -> int:
  """How many ``tt.load``/``tt.store`` ops take a mask operand."""
  lines = [line.split(":")[0] for line in text.splitlines() if f"{op} " in line]
  return sum(line.count("%") >= 3 for line in lines)


def test_hamming_scores_lowers_without_ctpop_and_masks_the_edge(as_gpu, capsys):
  q = jnp.zeros((1, 8, 4), jnp.uint32)
  k = jnp.zeros((1, 2, 1000, 4), jnp.uint32)  # 1000 is not a multiple of the 256 block
  text = triton_module(capsys, lambda q, k, n: hs.hamming_scores_kernel(
      q, k, n, 128, hs.BlockSizes(tokens=256)), q, k, jnp.array([1000], jnp.int32))
  assert "ctpop" not in text
  assert masked(text, "tt.load") >= 4 and masked(text, "tt.store") == 1


def test_table_match_counts_masks_the_edge(as_gpu, capsys):
  q = jnp.zeros((1, 4, 3), jnp.uint32)  # K = 10, L = 9: 3 words, tables 3 and 6 straddle
  k = jnp.zeros((1, 1, 300, 3), jnp.uint32)
  text = triton_module(capsys, lambda q, k, n: tmc.table_match_counts_kernel(
      q, k, n, 10, 9, 2, tmc.BlockSizes(tokens=128)), q, k, jnp.array([300], jnp.int32))
  assert masked(text, "tt.load") >= 3 and masked(text, "tt.store") == 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pack_signs_and_sparse_decode_lower(as_gpu, capsys, dtype):
  triton_module(capsys, lambda x: ps.pack_signs_kernel(x, ps.BlockSizes(rows=16)),
                jnp.zeros((37, 130), dtype))
  rng = np.random.default_rng(0)
  args = (jnp.zeros((1, 8, 128), dtype), jnp.zeros((1, 2, 1000, 128), dtype),
          jnp.zeros((1, 2, 1000, 128), dtype),
          jnp.asarray(rng.integers(0, 1000, (1, 2, 300)), jnp.int32),
          jnp.zeros((1, 2, 300), jnp.float32), jnp.array([[300, 17]], jnp.int32))
  triton_module(capsys, sda.sparse_decode_attention_kernel, *args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_decode_lowers_with_matrix_products(as_gpu, capsys, dtype):
  args = (jnp.zeros((2, 8, 128), dtype), jnp.zeros((2, 2, 1000, 128), dtype),
          jnp.zeros((2, 2, 1000, 128), dtype), jnp.array([1000, 17], jnp.int32))
  text = triton_module(capsys, lambda *a: da.decode_attention_kernel(
      *a, da.BlockSizes(block=128, split=256)), *args)
  assert "tt.dot" in text
  # float32 products stay float32 (Triton's default for them is TF32: ~1e-4 errors, seen on
  # an H200).
  assert "inputPrecision = tf32" not in text


@pytest.mark.parametrize("bins, dtype, chunk", [(256, jnp.int16, 64), (512, jnp.int32, 256),
                                               (1024, jnp.int32, 256)])
def test_score_histogram_lowers_to_a_matrix_product(as_gpu, capsys, bins, dtype, chunk):
  # tl.dot takes 16 x 16 products and up; int16 scores: hamming_similarity's
  text = triton_module(capsys, lambda s, n: sh.score_histogram_kernel(
      s, n, -1, 4, 16, sh.BlockSizes(block=256, chunk=chunk), bins=bins),
      jnp.zeros((1, 2, 1000), dtype), jnp.array([1000], jnp.int32))
  assert text.count("tt.dot") == 256 // chunk and masked(text, "tt.load") >= 1


@pytest.mark.parametrize("dtype", [jnp.int16, jnp.int32])  # SimHash's and Spotlight's scores
def test_kept_positions_lowers_to_a_prefix_sum_and_a_scattered_store(as_gpu, capsys, dtype):
  blocks = jnp.zeros((1, 2, 4), jnp.int32)
  text = triton_module(capsys, lambda s, n, t, need, tb, kb: kp.kept_positions_kernel(
      s, n, t, need, tb, kb, sinks=4, local=16, size=64, block=256),
      jnp.zeros((1, 2, 1000), dtype), jnp.array([1000], jnp.int32),
      jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), blocks, blocks)
  assert "tt.scan" in text and "tt.store" in text


def test_magicpig_scan_step_lowers_with_its_kernels(as_gpu, capsys, monkeypatch):
  # The whole decode step (append + attend) of MagicPIG's GPU path: the packed-code scan,
  # the kept-positions compaction and the attention pass computing 1/w from each key's
  # score (arccos of the cosine, then the binomial tail: no second read of the keys).
  import sparse_attn as sa
  monkeypatch.setenv("SPARSE_ATTN_PALLAS", "1")
  est = sa.magicpig(K=10, L=150)
  q, cache = sa.synthetic.llm_like(jax.random.PRNGKey(0), batch=2, num_kv_heads=2, group=4,
                                   capacity=1000, head_dim=128, dtype=jnp.bfloat16,
                                   length=jnp.array([900, 333], jnp.int32))
  index = jax.eval_shape(est.init, cache, jax.random.PRNGKey(1))
  assert index.tables is None  # backend.magicpig_retrieval() on a GPU: the scan

  def step(q, cache, index):
    grown = cache._replace(length=cache.length + 1)
    return est.attend(q, grown, est.append(index, grown)).out

  text = triton_module(capsys, step, q, cache, index)
  for name in ("table_match_counts", "kept_positions", "sparse_decode_attention"):
    assert name in text, name
  assert "acos" in text  # the weights are computed inside the attention kernel

def test_poisson_positions_lowers_with_integer_hashing_and_masks_the_edge(as_gpu, capsys):
  text = triton_module(capsys, lambda p, s, f: pp.poisson_positions_kernel(
      p, s, f, size=64, block=256), jnp.zeros((1, 2, 1000), jnp.float32),
      jnp.zeros((1, 2), jnp.uint32), jnp.zeros((1, 2), bool))
  assert "tt.scan" in text and "arith.muli" in text and "arith.shrui" in text
  assert masked(text, "tt.load") >= 2  # both passes mask the partial last block


def test_vattention_step_lowers_for_cuda_with_its_kernels():
  # The device run's vattention_simhash_kept step (append + attend, kernels on) lowers for
  # Triton from this CPU, and its anatomy (benchmarks/step_anatomy.py) shows the draws in
  # the kernels: no threefry and no compaction over the tokens.
  from benchmarks import step_anatomy
  module = step_anatomy.lowered_step(step_anatomy.methods()["vattention_simhash"](), 2, 4096)
  got = step_anatomy.anatomy(module, 2 * step_anatomy.KV_HEADS * 4096)
  assert got["custom_calls"] == {"hamming_similarity": 1, "poisson_positions_count": 2,
                                 "poisson_positions": 2, "sparse_decode_attention": 1}, (
                                     got["custom_calls"])
  threefry = [line for line in module.splitlines() if "call @threefry" in line]
  assert threefry and all(  # only per-row seeds: no random bits per token
      n < 4096 for line in threefry for n, _ in step_anatomy._tensors(line)), threefry
  dense = step_anatomy.anatomy(step_anatomy.lowered_step(sa.dense(), 2, 4096),
                               2 * step_anatomy.KV_HEADS * 4096)
  assert dense["custom_calls"] == {"decode_attention": 1} and dense["sorts"] == 0


def test_hamming_similarity_lowers_without_ctpop_and_masks_the_edge(as_gpu, capsys):
  q = jnp.zeros((1, 8, 4), jnp.uint32)
  k = jnp.zeros((1, 2, 1000, 4), jnp.uint32)  # 1000 is not a multiple of the 256 block
  text = triton_module(capsys, lambda q, k, n: hs.hamming_similarity_kernel(
      q, k, n, 128, hs.BlockSizes(tokens=256)), q, k, jnp.array([1000], jnp.int32))
  assert "ctpop" not in text
  assert masked(text, "tt.load") >= 4 and masked(text, "tt.store") == 4  # one per query


@pytest.mark.parametrize("per_query", [False, True])
def test_hamming_kernels_lower_with_their_histograms_fused(as_gpu, capsys, per_query):
  """The counted variants: scores and one-hot histogram products in one kernel (SimHash's
  256 bins per query, Spotlight's 1024 summed), the block in chunks of 512 tokens."""
  q = jnp.zeros((1, 8, 4), jnp.uint32)
  k = jnp.zeros((1, 2, 3000, 4), jnp.uint32)  # 3000: a ragged last block of 1024
  kernel = hs.hamming_similarity_kernel if per_query else hs.hamming_scores_kernel
  spec = sh.Histogram(-1, 4, 16, 256 if per_query else 1024)
  text = triton_module(capsys, lambda q, k, n: kernel(q, k, n, 128, histogram=spec,
                                                      cache_length=n),
                       q, k, jnp.array([3000], jnp.int32))
  assert "ctpop" not in text
  # one product per histogram and chunk of the 1024-token block
  chunks = sh.BlockSizes().block // hs.BlockSizes().tokens
  assert text.count("tt.dot") == chunks * (4 if per_query else 1)
