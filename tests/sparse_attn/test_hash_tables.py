"""Bucketed tables: lookup returns exactly the query's buckets; dedup keeps one entry each."""

import jax.numpy as jnp
import numpy as np

from sparse_attn._src import hash_tables


def random_tables(seed, S=300, L=6, K=3):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2**K, size=(S, L), dtype=np.uint16)
  include = rng.random(S) < 0.8
  q_codes = rng.integers(0, 2**K, size=L, dtype=np.uint32)
  tables = hash_tables.build_tables(jnp.asarray(codes), jnp.asarray(include), K)
  return codes, include, q_codes, tables


def expected_entries(codes, include, q_codes):
  """Per table, in table order, the included token ids of the query's bucket (ascending)."""
  return [np.flatnonzero(include & (codes[:, l] == q_codes[l])) for l in range(codes.shape[1])]


def test_lookup_returns_the_query_buckets_in_table_order():
  codes, include, q_codes, tables = random_tables(0)
  want = np.concatenate(expected_entries(codes, include, q_codes))
  ids, valid, dropped = hash_tables.lookup(tables, jnp.asarray(q_codes), capacity=400)
  ids, valid = np.asarray(ids), np.asarray(valid)
  assert int(dropped) == 0 and valid.sum() == want.size
  np.testing.assert_array_equal(ids[valid], want)
  assert not valid[want.size:].any()


def test_lookup_counts_what_does_not_fit():
  codes, include, q_codes, tables = random_tables(1)
  want = np.concatenate(expected_entries(codes, include, q_codes))
  capacity = want.size // 2
  ids, valid, dropped = hash_tables.lookup(tables, jnp.asarray(q_codes), capacity=capacity)
  assert int(dropped) == want.size - capacity
  np.testing.assert_array_equal(np.asarray(ids), want[:capacity])
  assert np.asarray(valid).all()


def test_offsets_delimit_every_bucket():
  codes, include, _, tables = random_tables(2, K=4)
  offsets, sorted_ids = np.asarray(tables.offsets), np.asarray(tables.sorted_ids)
  for l in range(codes.shape[1]):
    for c in range(16):
      members = sorted_ids[l, offsets[l, c]:offsets[l, c + 1]]
      np.testing.assert_array_equal(members, np.flatnonzero(include & (codes[:, l] == c)))
    assert offsets[l, -1] == include.sum()


def test_collision_counts_counts_each_tokens_entries():
  rng = np.random.default_rng(3)
  S, H, E = 50, 3, 400
  ids = rng.integers(0, S, size=(H, E)).astype(np.int32)
  # A uint16 counter, then a uint8 one whose padding slot (~280 entries) wraps, harmlessly.
  for max_count, rate in ((E, 0.9), (255, 0.3)):
    valid = rng.random((H, E)) < rate
    counts = np.asarray(hash_tables.collision_counts(jnp.asarray(ids), jnp.asarray(valid), S,
                                                     max_count))
    for h in range(H):
      np.testing.assert_array_equal(counts[h], np.bincount(ids[h][valid[h]], minlength=S))


def test_build_tables_batched_leading_dims():
  rng = np.random.default_rng(4)
  codes = rng.integers(0, 8, size=(2, 3, 40, 5), dtype=np.uint16)
  include = rng.random((2, 3, 40)) < 0.7
  tables = hash_tables.build_tables(jnp.asarray(codes), jnp.asarray(include), 3)
  assert tables.sorted_ids.shape == (2, 3, 5, 40) and tables.offsets.shape == (2, 3, 5, 9)
  single = hash_tables.build_tables(jnp.asarray(codes[1, 2]), jnp.asarray(include[1, 2]), 3)
  np.testing.assert_array_equal(np.asarray(tables.offsets[1, 2]), np.asarray(single.offsets))
  np.testing.assert_array_equal(np.asarray(tables.sorted_ids[1, 2]), np.asarray(single.sorted_ids))
