"""Decoding with sparse attention: KV caches as explicit state, prefill, decode step, generate.

The decode state is one ``sparse_attn.KVCache`` per layer (post-RoPE keys and values
``[B, Hkv, S, D]``, ``length int32 [B]``) and one estimator index per layer. Prefill is a
dense causal forward over right-padded prompts (``lengths`` give the ragged sizes); it fills
the caches and builds each sparse layer's index with ``est.init(cache, key)``. A decode step
writes the new token's K/V at position ``length``, increments ``length``, extends the index
with ``est.append(index, cache)`` and attends with ``est.attend(q, cache, index, key)``;
``dense_layers`` use ``sparse_attn.dense_attention``.

Each function is jitted with the model's graph definition and the per-layer estimators as
static arguments (``nnx.split``): one compilation per shape, none per step. The decode state
is donated to the step, so the caches are updated in place.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparse_attn as sa
from models.llama import Llama


class DecodeState(NamedTuple):
  """Per-layer ``caches`` (``sa.KVCache``) and estimator ``indices`` (``()`` when dense)."""

  caches: tuple[sa.KVCache, ...]
  indices: tuple[Any, ...]


class GenerateOutput(NamedTuple):
  """``tokens int32 [B, N]``; ``density float32 [N - 1, layers, B, Hq]``, the density of each
  layer at each decode step (the first token comes from the dense prefill)."""

  tokens: jax.Array
  density: jax.Array


def layer_estimators(num_layers: int, attention, dense_layers: Sequence[int]) -> tuple:
  """Per-layer ``sa.Estimator`` or None (dense), validated.

  Args:
    num_layers: the model's layer count.
    attention: None (every layer dense), one ``sa.Estimator`` for every layer, or a sequence
      of ``num_layers`` estimators (None entries are dense), e.g. Spotlight's per-layer heads.
    dense_layers: layer indices that use exact ``sa.dense_attention`` whatever ``attention``.
  """
  dense = set()
  for i in dense_layers:
    if not isinstance(i, (int, np.integer)) or not 0 <= i < num_layers:
      raise ValueError(f"dense_layers must hold layer indices in [0, {num_layers}), got "
                       f"{list(dense_layers)}")
    dense.add(int(i))
  if attention is None or isinstance(attention, sa.Estimator):
    per_layer = [attention] * num_layers
  else:
    per_layer = list(attention)
    if len(per_layer) != num_layers:
      raise ValueError(f"attention must be an Estimator or a sequence of {num_layers} "
                       f"(one per layer), got a sequence of {len(per_layer)}")
  for i, est in enumerate(per_layer):
    if est is not None and not isinstance(est, sa.Estimator):
      raise ValueError(f"attention[{i}] must be a sparse_attn.Estimator or None, got "
                       f"{type(est).__name__}")
  return tuple(None if i in dense else est for i, est in enumerate(per_layer))


def _layer_key(key: jax.Array, layer: int) -> jax.Array:
  return jax.random.fold_in(key, layer)


def _init_indices(caches, ests, key) -> tuple:
  return tuple(() if est is None else est.init(cache, _layer_key(key, i))
               for i, (cache, est) in enumerate(zip(caches, ests)))


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "ests"))
def _prefill(graphdef, params, input_ids, lengths, key, capacity, ests):
  model = nnx.merge(graphdef, params)
  hidden, qkvs = model.forward(input_ids)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  pad = ((0, 0), (0, 0), (0, capacity - input_ids.shape[1]), (0, 0))
  caches = tuple(sa.KVCache(jnp.pad(k, pad), jnp.pad(v, pad), lengths) for _, k, v in qkvs)
  return model.logits(last), DecodeState(caches, _init_indices(caches, ests, key))


def _check_prompts(input_ids, lengths) -> tuple[jax.Array, jax.Array]:
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integer token ids [B, T], got {input_ids.dtype} "
                     f"{tuple(input_ids.shape)}")
  batch, seq = input_ids.shape
  if lengths is None:
    lengths = np.full((batch,), seq, np.int32)
  lengths = np.asarray(lengths)
  if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > seq:
    raise ValueError(f"lengths must be int [B={batch}] in [1, T={seq}] (prompts right-padded "
                     f"to T), got {lengths.tolist()}")
  return input_ids.astype(jnp.int32), jnp.asarray(lengths, jnp.int32)


def prefill(model: Llama, input_ids, lengths=None, *, capacity: int, attention=None,
            dense_layers: Sequence[int] = (), key: jax.Array | None = None):
  """Dense causal prefill of right-padded prompts into fresh caches of ``capacity`` tokens.

  Args:
    model: a ``Llama``.
    input_ids: ``int [B, T]`` prompts, right-padded to ``T``.
    lengths: ``int [B]`` prompt sizes (default: all ``T``).
    capacity: cache size ``S >= T``.
    attention, dense_layers: see ``layer_estimators``.
    key: PRNG key for the estimators' ``init`` (layer ``i`` gets ``fold_in(key, i)``).

  Returns:
    ``(logits float32 [B, V]`` of each prompt's last token, ``DecodeState)``.
  """
  input_ids, lengths = _check_prompts(input_ids, lengths)
  if not isinstance(capacity, int) or capacity < input_ids.shape[1]:
    raise ValueError(f"capacity must be an int >= the prompt length T={input_ids.shape[1]}, "
                     f"got {capacity!r}")
  ests = layer_estimators(model.config.num_layers, attention, dense_layers)
  graphdef, params = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  return _prefill(graphdef, params, input_ids, lengths, key, capacity, ests)


@functools.partial(jax.jit, static_argnames=("ests",))
def _start(caches, key, ests):
  return DecodeState(tuple(caches), _init_indices(caches, ests, key))


def start_decode(caches: Sequence[sa.KVCache], *, num_layers: int, attention=None,
                 dense_layers: Sequence[int] = (), key: jax.Array | None = None) -> DecodeState:
  """A ``DecodeState`` from filled caches (one per layer): builds the estimators' indices.

  For measurements that fill caches directly instead of prefilling through the model.
  """
  if len(caches) != num_layers:
    raise ValueError(f"caches must hold one KVCache per layer ({num_layers}), got {len(caches)}")
  ests = layer_estimators(num_layers, attention, dense_layers)
  return _start(tuple(caches), jax.random.key(0) if key is None else key, ests)


def _write_token(cache: sa.KVCache, k: jax.Array, v: jax.Array) -> sa.KVCache:
  """Writes ``k, v [B, Hkv, D]`` at each row's position ``length``; ``length += 1``.

  A row whose cache is full keeps its cache (the write would be out of range; ``generate``
  refuses such a capacity up front).
  """
  rows = jnp.arange(k.shape[0], dtype=jnp.int32)

  def write(keys, values):
    return (keys.at[rows, :, cache.length].set(k.astype(keys.dtype), mode="drop"),
            values.at[rows, :, cache.length].set(v.astype(values.dtype), mode="drop"))

  # The write sits in its own computation (a cond) so that XLA cannot fuse the update into
  # every reader of the cache: with B = 1, XLA:CPU otherwise re-applies it inside the
  # attention's matmul and copies the whole cache several times per step (10x slower).
  keys, values = jax.lax.cond(jnp.any(cache.length < cache.keys.shape[2]), write,
                              lambda keys, values: (keys, values), cache.keys, cache.values)
  return sa.KVCache(keys, values, cache.length + 1)


def _decode(model: Llama, state: DecodeState, tokens, key, ests):
  """One step: ``(logits [B, V], DecodeState, density [layers, B, Hq])``."""
  caches, indices, density = list(state.caches), list(state.indices), []

  def attention(i, q, k, v):
    caches[i] = cache = _write_token(caches[i], k, v)
    if ests[i] is None:
      res = sa.dense_attention(q, cache)
    else:
      indices[i] = ests[i].append(indices[i], cache)
      res = ests[i].attend(q, cache, indices[i], _layer_key(key, i))
    density.append(res.density)
    return res.out

  hidden = model.decode(tokens, state.caches[0].length, attention)
  return (model.logits(hidden), DecodeState(tuple(caches), tuple(indices)),
          jnp.stack(density))


@functools.partial(jax.jit, static_argnames=("graphdef", "ests"), donate_argnames=("state",))
def _decode_step(graphdef, params, state, tokens, key, ests):
  return _decode(nnx.merge(graphdef, params), state, tokens, key, ests)


def decode_step(model: Llama, state: DecodeState, tokens, *, attention=None,
                dense_layers: Sequence[int] = (), key: jax.Array | None = None):
  """Feeds ``tokens int [B]`` (one per row) at each row's position ``length``.

  ``state`` is donated (its caches are updated in place): use the returned one.

  Returns:
    ``(logits float32 [B, V], DecodeState, density float32 [layers, B, Hq])``.
  """
  ests = layer_estimators(model.config.num_layers, attention, dense_layers)
  graphdef, params = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  return _decode_step(graphdef, params, state, jnp.asarray(tokens, jnp.int32), key, ests)


class LoopOutput(NamedTuple):
  """``tokens int32 [B, steps]`` (greedy, each fed to the next step); ``logits float32 [B, V]``
  of the last step; ``density float32 [steps, layers, B, Hq]``."""

  tokens: jax.Array
  logits: jax.Array
  density: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "ests", "steps"),
                   donate_argnames=("state",))
def _decode_loop(graphdef, params, state, tokens, key, ests, steps):
  model = nnx.merge(graphdef, params)

  def body(carry, step_key):
    state, tokens, _ = carry
    logits, state, density = _decode(model, state, tokens, step_key, ests)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (state, nxt, logits), (nxt, density)

  logits = jnp.zeros((tokens.shape[0], model.config.vocab_size), jnp.float32)
  (state, _, logits), (out, density) = jax.lax.scan(body, (state, tokens, logits),
                                                    jax.random.split(key, steps))
  return LoopOutput(out.T, logits, density), state


def decode_loop(model: Llama, state: DecodeState, tokens, steps: int, *, attention=None,
                dense_layers: Sequence[int] = (), key: jax.Array | None = None):
  """``steps`` greedy decode steps inside one compiled program (a ``lax.scan``).

  Step ``i`` is ``decode_step`` with key ``jax.random.split(key, steps)[i]``; its argmax
  token is the next step's input. Host dispatch is paid once per call, as in a compiled
  decode loop (what end-to-end throughput is measured with). ``state`` is donated and
  carried: the caches are updated in place, one token per step.

  Returns:
    ``(LoopOutput, DecodeState)``.
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  ests = layer_estimators(model.config.num_layers, attention, dense_layers)
  graphdef, params = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  return _decode_loop(graphdef, params, state, jnp.asarray(tokens, jnp.int32), key, ests,
                      steps)


def _sample(logits, key, temperature, greedy: bool):
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "ests", "greedy"),
                   donate_argnames=("state",))
def _generate_step(graphdef, params, state, tokens, key, temperature, ests, greedy):
  key_attend, key_sample = jax.random.split(key)
  logits, state, density = _decode(nnx.merge(graphdef, params), state, tokens, key_attend, ests)
  return _sample(logits, key_sample, temperature, greedy), state, density


@functools.partial(jax.jit, static_argnames=("greedy",))
def _first_token(logits, key, temperature, greedy):
  return _sample(logits, key, temperature, greedy)


def generate(model: Llama, prompt_ids, max_new_tokens: int, attention=None,
             dense_layers: Sequence[int] = (), key: jax.Array | None = None,
             temperature: float = 0.0, prompt_lengths=None,
             capacity: int | None = None, mesh=None) -> GenerateOutput:
  """Generates ``max_new_tokens`` tokens per prompt: dense prefill, then estimator decode.

  Args:
    model: a ``Llama``.
    prompt_ids: ``int [B, T]`` prompts, right-padded to ``T`` when ragged.
    max_new_tokens: tokens to generate (>= 1).
    attention: None (dense), an ``sa.Estimator`` for every layer, or one per layer.
    dense_layers: layers that always use exact attention (e.g. ``(0, 1)``).
    key: PRNG key; required when sampling or when an estimator draws randomness.
    temperature: 0 is greedy (argmax); otherwise sample from ``softmax(logits / T)``.
    prompt_lengths: ``int [B]`` prompt sizes (default: all ``T``).
    capacity: cache size; default ``T + max_new_tokens`` (rounded up to a multiple of the
      mesh's devices with ``mesh``).
    mesh: a ``jax.sharding.Mesh`` with axis ``"seq"`` (``sa.distributed.sequence_mesh``):
      after the prefill (on one device) every layer's cache is split along the sequence
      over it and the decode steps run there. Sparse layers then need estimators built for
      that mesh (``sa.distributed.sharded``); dense layers are partitioned by XLA.

  Returns:
    ``GenerateOutput(tokens [B, max_new_tokens], density [max_new_tokens - 1, layers, B, Hq])``.
  """
  prompt_ids, lengths = _check_prompts(prompt_ids, prompt_lengths)
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature!r}")
  ests = layer_estimators(model.config.num_layers, attention, dense_layers)
  if key is None:
    if temperature > 0 or any(est is not None for est in ests):
      raise ValueError("key must be a jax.random key when sampling (temperature > 0) or when "
                       "a layer uses a sparse estimator")
    key = jax.random.key(0)  # unused: greedy and dense
  seq = prompt_ids.shape[1]
  needed = max(seq, int(np.max(np.asarray(lengths))) + max_new_tokens)
  if capacity is None:
    capacity = seq + max_new_tokens
    if mesh is not None:
      capacity = -(-capacity // mesh.shape[sa.distributed.AXIS]) * mesh.shape[
          sa.distributed.AXIS]
  if not isinstance(capacity, int) or capacity < needed:
    raise ValueError(f"capacity={capacity!r} is too small for the prompt plus max_new_tokens="
                     f"{max_new_tokens}: need at least {needed}")
  greedy = temperature == 0
  temperature = jnp.float32(temperature if temperature > 0 else 1.0)
  step_keys = jax.random.split(key, max_new_tokens + 1)
  graphdef, params = nnx.split(model)
  logits, state = _prefill(graphdef, params, prompt_ids, lengths, step_keys[0], capacity, ests)
  if mesh is not None:
    state = state._replace(caches=tuple(sa.distributed.shard_cache(c, mesh)
                                        for c in state.caches))
  token = _first_token(logits, step_keys[1], temperature, greedy)
  tokens, densities = [token], []
  for step in range(1, max_new_tokens):
    token, state, density = _generate_step(graphdef, params, state, token, step_keys[step + 1],
                                           temperature, ests, greedy)
    tokens.append(token)
    densities.append(density)
  num_heads = model.config.num_heads
  density = (jnp.stack(densities) if densities else
             jnp.zeros((0, len(ests), prompt_ids.shape[0], num_heads), jnp.float32))
  return GenerateOutput(jnp.stack(tokens, axis=1), density)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _capture(graphdef, params, input_ids, lengths):
  _, qkvs = nnx.merge(graphdef, params).forward(input_ids)
  valid = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]
  mask = valid[:, None, :, None]
  return [tuple(jnp.where(mask, x, jnp.zeros((), x.dtype)) for x in qkv) for qkv in qkvs]


def capture(model: Llama, input_ids, lengths=None) -> list[tuple[jax.Array, ...]]:
  """Per-layer post-RoPE ``(q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D])`` of a
  prefill, for evaluation and for training Spotlight's hash heads. Rows at or past each
  prompt's length (right padding) are zero."""
  input_ids, lengths = _check_prompts(input_ids, lengths)
  graphdef, params = nnx.split(model)
  return _capture(graphdef, params, input_ids, lengths)
