"""Static-size selections (top by score, compaction of a mask) against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attn._src import selection

_top = jax.jit(selection.top, static_argnums=2)
_compact = jax.jit(selection.compact, static_argnums=1)


@st.composite
def scored_rows(draw):
  rows = draw(st.integers(1, 3))
  length = draw(st.integers(1, 80))
  size = draw(st.integers(1, length))
  keep = draw(st.integers(0, size))
  kind = draw(st.sampled_from(["int", "float", "tiny", "huge", "inf"]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  ints = rng.integers(-4, 5, size=(rows, length))  # many ties
  if kind == "int":
    scores = ints.astype(np.int32)
  else:
    scale = {"float": 1.0, "tiny": 1e-38, "huge": 1e37, "inf": 1.0}[kind]
    scores = (ints * scale).astype(np.float32)
    if kind == "inf":
      scores[rng.random(scores.shape) < 0.2] = -np.inf
      scores[rng.random(scores.shape) < 0.1] = np.inf
  eligible = rng.random((rows, length)) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
  return scores, eligible, size, keep


@settings(max_examples=60, deadline=None)
@given(scored_rows())
def test_top_keeps_the_highest_scores(case):
  scores, eligible, size, keep = case
  positions, valid = map(np.asarray, _top(jnp.asarray(scores), jnp.asarray(eligible), size,
                                          keep))
  assert positions.shape == valid.shape == (scores.shape[0], size)
  for row in range(scores.shape[0]):
    want = min(keep, int(eligible[row].sum()))
    assert valid[row].sum() == want and valid[row, :want].all()  # valid slots come first
    chosen = positions[row, :want]
    assert np.all(np.diff(chosen) > 0)  # distinct, ascending
    assert eligible[row, chosen].all()
    best = np.sort(scores[row][eligible[row]])[::-1][:want]
    np.testing.assert_array_equal(np.sort(scores[row, chosen])[::-1], best)
    assert ((positions[row] >= 0) & (positions[row] < scores.shape[1])).all()


@settings(max_examples=60, deadline=None)
@given(scored_rows())
def test_kth_largest_is_the_numpy_order_statistic(case):
  scores, eligible, _, keep = case
  scores = scores.astype(np.float32)
  keep = np.arange(scores.shape[0]) + keep  # a different keep per row
  got = np.asarray(jax.jit(selection.kth_largest)(jnp.asarray(scores), jnp.asarray(eligible),
                                                  jnp.asarray(keep, jnp.int32)))
  for row in range(scores.shape[0]):
    ranked = np.sort(scores[row][eligible[row]])[::-1]
    want = (np.inf if keep[row] < 1 else -np.inf if not len(ranked)
            else ranked[min(keep[row], len(ranked)) - 1])
    assert got[row] == want, (row, got[row], want)


def test_top_breaks_ties_by_position_and_takes_an_array_keep():
  scores = jnp.array([[3, 1, 3, 3, 0, 3], [0, 0, 0, 0, 0, 0]], jnp.int32)
  keep = jnp.array([[3], [2]], jnp.int32)
  positions, valid = _top(scores, jnp.ones(scores.shape, bool), 4, keep)
  np.testing.assert_array_equal(np.asarray(positions)[np.asarray(valid)], [0, 2, 3, 0, 1])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(1, 200), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_compact_lists_marked_positions_in_order(length, size, rate, seed):
  mask = np.random.default_rng(seed).random((2, 3, length)) < rate
  positions, valid, overflow = map(np.asarray, _compact(jnp.asarray(mask), size))
  for idx in np.ndindex(mask.shape[:-1]):
    marked = np.flatnonzero(mask[idx])
    fit = marked[:size]
    np.testing.assert_array_equal(positions[idx][valid[idx]], fit)
    assert valid[idx].sum() == len(fit) and valid[idx][:len(fit)].all()
    assert overflow[idx] == len(marked) - len(fit)
    assert ((positions[idx] >= 0) & (positions[idx] < length)).all()


def test_positions_mask_ignores_invalid_repeats():
  positions = jnp.array([[2, 5, 5, 2]], jnp.int32)
  valid = jnp.array([[True, True, False, False]])
  mask = selection.positions_mask(positions, valid, 7)
  np.testing.assert_array_equal(np.asarray(mask), [[0, 0, 1, 0, 0, 1, 0]])


def test_order_keys_is_monotone_on_floats():
  x = np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 2.5, 3e38, np.inf], np.float32)
  keys = np.asarray(selection.order_keys(jnp.asarray(x)))
  assert np.all(np.diff(keys) >= 0) and np.all(np.diff(keys)[x[1:] != x[:-1]] > 0)


@pytest.mark.parametrize("length,size", [(37, 20), (300, 64)])
@pytest.mark.parametrize("score_range", [1, 7, 512])
def test_counting_selects_exactly_what_the_bisection_selects(length, size, score_range):
  """The GPU's counting threshold and the CPU's bisection pick the same positions (ties
  included) for integer scores in [-1, score_range - 1]: 6 random problems per shape, with a
  different keep and eligible rate per row, keep 0 and no eligible token among them."""
  rng = np.random.default_rng(length + score_range)
  for _ in range(6):
    scores = jnp.asarray(rng.integers(-1, score_range, size=(3, 2, length)), jnp.int32)
    rate = rng.choice([0.0, 0.3, 1.0], size=(3, 2, 1))
    eligible = jnp.asarray(rng.random((3, 2, length)) < rate)
    keep = jnp.asarray(rng.integers(0, size + 1, size=(3, 2, 1)), jnp.int32)
    counted = _top_by(scores, eligible, size, keep, (-1, score_range - 1), True)
    bisected = _top_by(scores, eligible, size, keep, None, False)
    for got, want in zip(counted, bisected):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


_top_by = jax.jit(selection.top, static_argnums=(2, 4, 5))


def test_counting_refuses_float_scores():
  with pytest.raises(ValueError, match="integer scores and score_range"):
    selection.top(jnp.zeros((1, 4)), jnp.ones((1, 4), bool), 2, 1, score_range=(0, 8),
                  counting=True)
