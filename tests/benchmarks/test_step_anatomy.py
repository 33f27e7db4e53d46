"""``benchmarks.step_anatomy``'s counting, on small modules lowered here."""

import jax
import jax.numpy as jnp

from benchmarks import step_anatomy

N = 4096  # "full": an array of N elements counts as large (at least N / 8)


def _anatomy(fn, *args):
  return step_anatomy.anatomy(jax.jit(fn).lower(*args).as_text(), N)


def test_a_cond_counts_one_branch_the_cheaper_and_the_dearer_apart():
  x = jnp.zeros((N,), jnp.float32)

  def step(x, flag):  # the cheap branch reads x once; the dear one sorts it and reads it
    return jax.lax.cond(flag, lambda: jnp.sum(x), lambda: jnp.sort(x)[0] + jnp.sum(x))

  got = _anatomy(step, x, True)
  assert got["passes_by_kind"] == {"reduce": 1}, got
  assert got["pass_bytes"] == 4 * N
  # The dearer branch: the sort (operand and result) and the reduction.
  assert got["pass_us_at_4tbps_dearer_branches"] == round(3 * 4 * N / 4e12 * 1e6, 1)


def test_a_counted_loop_multiplies_its_body_and_small_ops_do_not_count():
  x = jnp.zeros((N,), jnp.float32)

  def step(x):
    small = jnp.sum(x[:8])  # below N / 8 elements: not a pass
    return jax.lax.fori_loop(0, 5, lambda i, c: c + jnp.sum(x * i), small)

  got = _anatomy(step, x)
  assert got["passes_by_kind"].get("reduce") == 5, got
  assert got["pass_bytes"] == 5 * 4 * N
