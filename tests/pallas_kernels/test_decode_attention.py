"""Dense split-K decode attention: kernel (interpret mode) == reference == float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention as da


def numpy_attention(q, keys, values, length):
  """float64 softmax attention over each row's first ``length`` tokens (GQA)."""
  q, keys, values = (np.asarray(x, np.float64) for x in (q, keys, values))
  batch, num_q, dim = q.shape
  group = num_q // keys.shape[1]
  out, lse = np.zeros((batch, num_q, dim)), np.full((batch, num_q), -np.inf)
  for b in range(batch):
    n = int(length[b])
    for h in range(num_q):
      if n == 0:
        continue
      s = keys[b, h // group, :n] @ q[b, h] / np.sqrt(dim)
      m = s.max()
      e = np.exp(s - m)
      out[b, h] = e @ values[b, h // group, :n] / e.sum()
      lse[b, h] = m + np.log(e.sum())
  return out, lse


def problem(dtype, capacity=300, seed=0):
  rng = np.random.default_rng(seed)
  batch, num_kv, group, dim = 3, 2, 3, 32
  q = jnp.asarray(rng.normal(size=(batch, num_kv * group, dim)) * 2, dtype)
  keys = rng.normal(size=(batch, num_kv, capacity, dim))
  values = rng.normal(size=(batch, num_kv, capacity, dim))
  length = np.array([0, 257, capacity], np.int32)  # empty, ragged, full
  return q, jnp.asarray(keys, dtype), jnp.asarray(values, dtype), jnp.asarray(length)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_and_reference_equal_float64(dtype):
  args = problem(dtype)
  want_out, want_lse = numpy_attention(*args)
  ref = da.decode_attention_reference(*args)
  # S = 300 is no multiple of the block (64) or the split (128): the last block starts
  # early and masks the rows it reads twice.
  got = da.decode_attention_kernel(*args, block_sizes=da.BlockSizes(block=64, split=128),
                                   interpret=True)
  for out, lse in (ref, got):
    assert out.dtype == lse.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(lse)[0], -np.inf)  # the empty row
    np.testing.assert_allclose(np.asarray(lse)[1:], want_lse[1:], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-5)


def test_default_split_fills_the_grid_and_stays_a_multiple_of_the_block():
  assert da.BlockSizes().resolve(1, 8, 131072) == (128, 2048)  # 64 splits x 8 heads = 512
  assert da.BlockSizes().resolve(8, 8, 131072) == (128, 16384)
  assert da.BlockSizes().resolve(1, 2, 100) == (64, 64)  # a block never exceeds S
  assert not da.supported(96) and da.supported(128)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_keys_make_their_head_nan_and_garbage_past_length_is_ignored(dtype):
  q, keys, values, length = problem(dtype)
  keys = keys.at[2, 1, 5].set(jnp.nan).at[2, 0, 299].set(jnp.inf)  # valid positions
  keys = keys.at[1, :, 257:].set(jnp.nan)  # past length: never part of the result
  values = values.at[1, :, 257:].set(jnp.nan)
  want_out, _ = numpy_attention(q[:2], keys[:2].at[1, :, 257:].set(0),
                                values[:2].at[1, :, 257:].set(0), length[:2])
  got = da.decode_attention_kernel(q, keys, values, length, da.BlockSizes(block=64, split=128),
                                   interpret=True)
  ref = da.decode_attention_reference(q, keys.at[1, :, 257:].set(0),
                                      values.at[1, :, 257:].set(0), length)
  for out, lse in (got, ref):
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.isnan(out[2]).all() and np.isnan(lse[2]).all()  # both KV heads of row 2
    np.testing.assert_allclose(out[:2], want_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(lse[0], -np.inf)
