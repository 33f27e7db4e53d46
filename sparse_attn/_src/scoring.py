"""Predictors' functions: the ``Scorer`` an estimator gets from ``Predictor.scorer``, the
hashing predictors' states, and how they are filled at ``init`` and extended at ``append``
(``key_index``)."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import hamming_scores as pallas_hamming
from sparse_attn import hash_heads, lsh
from sparse_attn._src import key_index
from sparse_attn.attention import row_scores
from sparse_attn.types import KVCache, check_key, donated_index_hint, within_capacity


class Scorer(NamedTuple):
  """A predictor's functions: ``state = init(cache, key)``; ``state = append(state, cache)``;
  ``scores(qg [B, Hkv, G, D], cache, state) -> [B, Hkv, G, S]`` (float32 or integer);
  hashing predictors also ``counted(qg, cache, state, histogram) -> (scores, hist)``: the
  scores (``[B, Hkv, 1, S]`` where ``shared_by_group``) and their block histograms
  (``pallas_kernels.score_histogram``), counted as they are scored, for the selection by
  counting (``selection.top_of_residual``)."""

  init: Callable[[KVCache, jax.Array], Any]
  append: Callable[[Any, KVCache], Any]
  scores: Callable[[jax.Array, KVCache, Any], jax.Array]
  reads_all_keys: bool
  shared_by_group: bool = False  # every query of a GQA group gets the same scores
  # ``(group, head_dim) -> (lo, hi)``: integer scores lie in [lo, hi] (selection may count
  # instead of bisecting); None for float scores.
  score_range: Callable[[int, int], tuple[int, int]] | None = None
  # ``state -> [B, Hkv, D]``: the mean the keys were centred on before hashing (SimHash), or
  # None (uncentred codes).
  key_mean: Callable[[Any], jax.Array] | None = None
  counted: Callable[..., tuple[jax.Array, jax.Array]] | None = None


class SimHashState(NamedTuple):
  """``planes float32 [D, bits]``, ``key_mean [B, Hkv, D]`` (of the finite keys),
  ``codes uint32 [B, Hkv, S, W]`` (``W = bits / 32``), ``length int32 [B]`` (tokens hashed),
  with ``norms=True`` ``norms bfloat16 [B, Hkv, S]``, the norm of each hashed (centred) key,
  and ``first_nonfinite int32 [B, Hkv]``, the first hashed key with a NaN or inf entry
  (``S`` if none; ``key_index.append_rows``)."""

  planes: jax.Array
  key_mean: jax.Array
  codes: jax.Array
  length: jax.Array
  norms: jax.Array | None = None
  first_nonfinite: jax.Array | None = None


def rank_unhashed_last(sim: jax.Array, length: jax.Array) -> jax.Array:
  """Scores ``[B, ..., S]`` of tokens not hashed yet (at or past ``length [B]``: written to
  the cache but not appended) become -1, below every real similarity."""
  positions = jnp.arange(sim.shape[-1], dtype=jnp.int32).reshape((1,) * (sim.ndim - 1) + (-1,))
  hashed = positions < length.reshape(length.shape + (1,) * (sim.ndim - 1))
  return jnp.where(hashed, sim, -1)


NORM_DTYPE = jnp.bfloat16  # stored key norms: 2 bytes per token (they only shape a proposal)


def with_norms(derive, norms: bool):
  """``derive(state, keys) -> codes`` into ``(state, keys) -> (codes,)``, or ``(codes,
  norms)`` with ``norms``: the norm of the vector that was hashed, ``hashed(state, keys)``."""
  def both(state, rows):
    hashed, codes = derive(state, rows)
    if not norms:
      return (codes,)
    return codes, jnp.linalg.norm(hashed, axis=-1).astype(NORM_DTYPE)
  return both


def stored(state) -> tuple[jax.Array, ...]:
  return (state.codes,) if state.norms is None else (state.codes, state.norms)


def restored(state, new: tuple[jax.Array, ...], length: jax.Array, first_nonfinite: jax.Array):
  """``state`` with the arrays of ``stored`` replaced by ``new``."""
  return state._replace(codes=new[0], norms=new[1] if len(new) > 1 else None, length=length,
                        first_nonfinite=first_nonfinite)


def filled(state, cache: KVCache, derive, floats_per_token: int):
  """A state of zeros (``codes``, and ``norms`` unless None) filled for every cached token."""
  new, first = key_index.derive_all(stored(state), cache, lambda rows: derive(state, rows),
                                    floats_per_token)
  return restored(state, new, cache.length, first)


def nonfinite_keys(scorer: Scorer, state, scores: jax.Array, length: jax.Array) -> jax.Array:
  """``bool [B, Hkv, G or 1]``: a valid token of the KV head has a non-finite key.

  From the state's record (hashing predictors: no pass over the keys) or, for the oracle,
  from its exact ``scores [B, Hkv, G, S]`` (a non-finite key gives a non-finite score).
  """
  if not scorer.reads_all_keys:
    return key_index.has_nonfinite(state.first_nonfinite,
                                   jnp.minimum(state.length, length))[..., None]
  positions = jnp.arange(scores.shape[-1], dtype=jnp.int32)[None, None, None, :]
  valid = positions < length[:, None, None, None]
  return jnp.any(valid & ~jnp.isfinite(scores), axis=-1)


def code_appender(derive, append_chunk: int):
  """``append`` for states with ``codes [B, Hkv, S, W]``, ``length`` and optional ``norms``:
  derives the values of the new tokens only, ``derive(state, keys [B, Hkv, n, D]) ->
  (codes,)`` or ``(codes, norms)``. The state is donated (updated in place): keep only the
  returned state."""

  @functools.partial(jax.jit, donate_argnums=0)
  def _append(state, cache):
    new, length, first = key_index.append_rows(
        stored(state), state.length, cache, lambda rows: derive(state, rows), append_chunk,
        state.first_nonfinite)
    return restored(state, new, length, first)

  def append(state, cache):
    key_index.check_same_cache(state.codes, cache)
    with donated_index_hint():
      return _append(state, cache)

  return append


def oracle_scorer() -> Scorer:
  return Scorer(
      init=lambda cache, key: (),
      append=lambda state, cache: state,
      scores=lambda qg, cache, state: row_scores(qg, cache.keys),
      reads_all_keys=True)


def simhash_scorer(bits: int, sinks: int, local: int, append_chunk: int,
                    norms: bool) -> Scorer:
  """SimHash codes of centred keys (``sinks`` and ``local``, the exact set, left out of the
  centring mean), ranked by Hamming similarity."""
  words = bits // 32

  def hash_keys(keys, state_planes, key_mean):
    """``(centred keys, codes)``."""
    centred = keys.astype(jnp.float32) - key_mean[:, :, None, :]
    return centred, lsh.simhash(centred, state_planes, 32, words)

  derive = with_norms(lambda state, rows: hash_keys(rows, state.planes, state.key_mean), norms)

  def init(cache, key=None):
    check_key(key, purpose='the "simhash" predictor\'s init draws its hash planes from it')
    return _init(cache, key)

  @jax.jit
  def _init(cache, key):
    cache, _ = within_capacity(cache)
    batch, num_kv, capacity, head_dim = cache.keys.shape
    planes = lsh.planes(key, head_dim, 32, words)
    key_mean = key_index.residual_key_mean(cache, sinks, local)
    state = SimHashState(planes, key_mean, jnp.zeros((batch, num_kv, capacity, words),
                                                     jnp.uint32), cache.length,
                         jnp.zeros((batch, num_kv, capacity), NORM_DTYPE) if norms else None)
    return filled(state, cache, derive, bits + head_dim)

  def query_codes(qg, state):  # [B, Hq, W]
    batch, num_kv, group, _ = qg.shape
    return lsh.simhash(qg, state.planes, 32, words).reshape(batch, num_kv * group, words)

  # Tokens not hashed yet (at or past state.length) score -1 (rank_unhashed_last); the
  # kernel reads each key's code once for its group.
  def scores(qg, cache, state):
    return pallas_hamming.hamming_similarity(query_codes(qg, state), state.codes,
                                             state.length, bits).reshape(qg.shape[:3] + (-1,))

  def counted(qg, cache, state, histogram):
    return pallas_hamming.hamming_similarity_counted(
        query_codes(qg, state), state.codes, state.length, bits, cache.length, histogram)

  append = code_appender(derive, append_chunk)
  return Scorer(init, append, scores, reads_all_keys=False,
                score_range=lambda group, head_dim: (-1, bits),
                key_mean=lambda state: state.key_mean, counted=counted)


class SpotlightState(NamedTuple):
  """``params`` (hash heads), ``codes uint32 [B, Hkv, S, ceil(D/32)]``, ``length int32 [B]``,
  with ``norms=True`` ``norms bfloat16 [B, Hkv, S]``, each key's norm, and
  ``first_nonfinite int32 [B, Hkv]`` (as ``SimHashState``'s)."""

  params: dict
  codes: jax.Array
  length: jax.Array
  norms: jax.Array | None = None
  first_nonfinite: jax.Array | None = None


def spotlight_scorer(params: dict, append_chunk: int, norms: bool) -> Scorer:
  """Learned hash codes (Spotlight), scored by Hamming similarity summed over the group."""
  derive = with_norms(lambda state, rows: (rows, hash_heads.hash(state.params, rows)), norms)

  def init(cache, key=None):
    del key
    hash_heads.check_params(params, cache.keys.shape[1], cache.keys.shape[3])
    return _init(params, cache)

  @jax.jit
  def _init(params, cache):
    cache, _ = within_capacity(cache)
    batch, num_kv, capacity, head_dim = cache.keys.shape
    state = SpotlightState(params, jnp.zeros((batch, num_kv, capacity, -(-head_dim // 32)),
                                             jnp.uint32), cache.length,
                           jnp.zeros((batch, num_kv, capacity), NORM_DTYPE) if norms else None)
    return filled(state, cache, derive, 4 * head_dim)  # the MLP's activations

  def query_codes(qg, state):  # [B, Hq, W]
    batch, num_kv, group, _ = qg.shape
    return hash_heads.hash(state.params, qg).reshape(batch, num_kv * group, -1)

  def scores(qg, cache, state):
    # [B, Hkv, S]; tokens not hashed yet (not appended) score -1, below every other.
    sim = hash_heads.hamming_scores(query_codes(qg, state), state.codes, qg.shape[-1],
                                    state.length)
    return jnp.broadcast_to(sim[:, :, None, :], qg.shape[:3] + sim.shape[-1:])

  def counted(qg, cache, state, histogram):
    sim, hist = pallas_hamming.hamming_scores_counted(
        query_codes(qg, state), state.codes, state.length, qg.shape[-1], cache.length,
        histogram)
    return sim[:, :, None, :], hist

  append = code_appender(derive, append_chunk)
  return Scorer(init, append, scores, reads_all_keys=False, shared_by_group=True,
                score_range=lambda group, head_dim: (-1, group * head_dim), counted=counted)
