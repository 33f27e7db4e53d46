"""Every kernel equals its jnp reference in interpret mode, on awkward shapes and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend
from pallas_kernels import hamming_scores as hs
from pallas_kernels import pack_signs as ps
from pallas_kernels import table_match_counts as tmc


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(37, 40), (3, 5, 64), (1, 128), (130, 96)])
def test_pack_signs_kernel_equals_reference(shape, dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), shape).astype(dtype)
  x = x.at[(0,) * (len(shape) - 1)].set(0.0)  # exact zeros count as negative in both
  got = ps.pack_signs_kernel(x, ps.BlockSizes(rows=16), interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ps.pack_signs_reference(x)))
  assert got.dtype == jnp.uint32 and got.shape == shape[:-1] + (-(-shape[-1] // 32),)


def test_pack_signs_reference_bit_layout():
  x = jnp.zeros((40,)).at[jnp.array([0, 5, 31, 32, 39])].set(1.0).at[1].set(-2.0)
  words = np.asarray(ps.pack_signs_reference(x))
  assert words.tolist() == [(1 << 0) | (1 << 5) | (1 << 31), (1 << 0) | (1 << 7)]


@pytest.mark.parametrize("group,dim,capacity,block", [(4, 1024, 300, 64), (3, 40, 97, 32)])
def test_hamming_similarity_kernel_equals_reference_per_query(group, dim, capacity, block):
  kq, kk = jax.random.split(jax.random.PRNGKey(group + 7))
  q = ps.pack_signs_reference(jax.random.normal(kq, (2, 2 * group, dim)))
  k = ps.pack_signs_reference(jax.random.normal(kk, (2, 2, capacity, dim)))
  length = jnp.array([capacity, capacity // 3], jnp.int32)
  got = hs.hamming_similarity_kernel(q, k, length, dim, hs.BlockSizes(tokens=block),
                                     interpret=True)
  want = hs.hamming_similarity_reference(q, k, length, dim)
  assert got.dtype == want.dtype == jnp.int16  # half the bytes: read again by the selection
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The reference against numpy bit counting; -1 past the length.
  bits = lambda c: np.unpackbits(np.asarray(c).view(np.uint8), axis=-1, bitorder="little")[  # noqa: E731
      ..., :dim]
  qb, kb = bits(q).reshape(2, 2, group, dim), bits(k)
  matches = (qb[:, :, :, None, :] == kb[:, :, None, :, :]).sum(-1)
  matches[1, :, :, capacity // 3:] = -1
  np.testing.assert_array_equal(np.asarray(want), matches)


@pytest.mark.parametrize("group,dim,capacity,block", [(4, 128, 300, 64), (3, 40, 97, 32),
                                                      (1, 64, 1000, 512)])
def test_hamming_scores_kernel_equals_reference(group, dim, capacity, block):
  kq, kk = jax.random.split(jax.random.PRNGKey(group))
  q = ps.pack_signs_reference(jax.random.normal(kq, (2, 2 * group, dim)))
  k = ps.pack_signs_reference(jax.random.normal(kk, (2, 2, capacity, dim)))
  length = jnp.array([capacity, capacity // 3], jnp.int32)
  got = hs.hamming_scores_kernel(q, k, length, dim, hs.BlockSizes(tokens=block), interpret=True)
  want = hs.hamming_scores_reference(q, k, length, dim)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert (np.asarray(got)[1, :, capacity // 3:] == -1).all()
  # The reference against numpy bit counting, independent of both.
  bits = lambda c: np.unpackbits(np.asarray(c).view(np.uint8), axis=-1, bitorder="little")[  # noqa: E731
      ..., :dim]
  qb, kb = bits(q).reshape(2, 2, group, dim), bits(k)
  matches = (qb[:, :, :, None, :] == kb[:, :, None, :, :]).sum((-1, 2))
  np.testing.assert_array_equal(np.asarray(want)[0], matches[0])


def test_backend_decides_interpret_and_kernel_use(monkeypatch):
  assert backend.resolve_interpret(None) == (jax.default_backend() == "cpu")
  assert backend.resolve_interpret(True) is True
  monkeypatch.setenv("SPARSE_ATTN_PALLAS", "1")
  assert backend.use_kernels()
  monkeypatch.setenv("SPARSE_ATTN_PALLAS", "0")
  assert not backend.use_kernels()
  monkeypatch.delenv("SPARSE_ATTN_PALLAS")
  assert backend.use_kernels() == (jax.default_backend() in backend.VERIFIED)


@pytest.mark.parametrize("group,K,tables,cap,capacity,block", [
    (4, 3, 7, None, 300, 64), (3, 10, 15, 2, 97, 32), (1, 5, 13, None, 40, 256),
    (2, 10, 150, None, 70, 64)])
def test_table_match_counts_kernel_equals_reference(group, K, tables, cap, capacity, block):
  rng = np.random.default_rng(group)
  num_kv = 2
  q_codes = rng.integers(0, 2**K, size=(2, num_kv * group, tables))
  k_codes = rng.integers(0, 2**K, size=(2, num_kv, capacity, tables))
  k_codes[0, 0, :5] = q_codes[0, 0]  # every table matches
  k_codes[1, 1, 3, ::2] = q_codes[1, group, ::2]  # half of them do (fields across words)
  q = tmc.pack_codes(jnp.asarray(q_codes, jnp.uint32), K)
  k = tmc.pack_codes(jnp.asarray(k_codes, jnp.uint16), K)
  assert k.shape[-1] == -(-K * tables // 32)
  np.testing.assert_array_equal(np.asarray(tmc.unpack_codes(k, K, tables)), k_codes)
  length = jnp.array([capacity, capacity // 3], jnp.int32)
  got = tmc.table_match_counts_kernel(q, k, length, K, tables, cap, tmc.BlockSizes(tokens=block),
                                      interpret=True)
  want = tmc.table_match_counts_reference(q, k, length, K, tables, cap)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert got.dtype == want.dtype == (jnp.int8 if (cap or tables) <= 127 else jnp.int16)
  # The reference against a numpy loop on the unpacked codes, independent of both.
  for b in range(2):
    for h in range(num_kv * group):
      n = int(length[b])
      expect = (k_codes[b, h // group, :n] == q_codes[b, h]).sum(-1)
      np.testing.assert_array_equal(np.asarray(want)[b, h, :n],
                                    np.minimum(expect, cap or tables))
      assert (np.asarray(want)[b, h, n:] == -1).all()


def test_packed_codes_hold_each_table_in_its_own_bits():
  # Bit l*K + j of the packed string is bit j of table l's code (numpy, bit by bit).
  rng = np.random.default_rng(0)
  K, L = 10, 150
  codes = rng.integers(0, 2**K, size=(3, L))
  words = np.asarray(tmc.pack_codes(jnp.asarray(codes, jnp.uint16), K)).astype(np.uint64)
  bits = ((words[..., :, None] >> np.arange(32, dtype=np.uint64)) & 1).reshape(3, -1)
  want = (codes[..., :, None] >> np.arange(K)) & 1  # [3, L, K]
  np.testing.assert_array_equal(bits[:, :K * L], want.reshape(3, -1))
  assert not bits[:, K * L:].any() and words.shape[-1] == 47
  with pytest.raises(ValueError, match="ceil"):
    tmc.table_match_counts_reference(jnp.zeros((1, 2, 46), jnp.uint32),
                                     jnp.zeros((1, 1, 8, 47), jnp.uint32),
                                     jnp.array([8]), K, L)


