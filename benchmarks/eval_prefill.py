"""The evaluation's dense forward at any length, and greedy decoding through a method.

``models.decoding.prefill`` and ``capture`` score all ``T x T`` pairs at once (8.6 GB per
sequence, head and layer group at 16K tokens); here the forward uses the training's blockwise
attention, ``forward_tokens`` tokens at a time, and its keys and values become the caches
that every method decodes from (``decoding.start_decode``): one forward per task, shared by
every method, instead of one prefill per method.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparse_attn as sa
from benchmarks.reference.attention import forward_qkv
from benchmarks.task_codec import Codec
from models import decoding


class Prefill:
  """One dense forward of a task's held-out instances (blockwise attention, ``forward_tokens``
  at a time), shared by every method: each layer's keys and values (the caches that
  ``accuracy`` decodes from) and the queries of the first ``keep_queries`` instances (the
  attention metrics). Rows at or past each instance's length are zero. ``cfg``: an
  ``estimator_eval.Config`` (``forward_tokens``, ``block``; ``accuracy`` reads ``batch`` and
  ``dense_layers``)."""

  def __init__(self, model, group: list, codec: Codec, cfg, keep_queries: int):
    self.enc = codec.encode(group)
    self.qkv = dense_qkv(model, self.enc.tokens, self.enc.lengths, cfg, keep_queries)


def dense_qkv(model, tokens: np.ndarray, lengths: np.ndarray, cfg,
              keep_queries: int) -> list[tuple[jax.Array, ...]]:
  """``decoding.capture``'s per-layer ``(q, k, v)`` from blockwise forwards of
  ``cfg.forward_tokens`` tokens each (q of the first ``keep_queries`` rows only)."""
  graphdef, params = nnx.split(model)
  rows = max(1, cfg.forward_tokens // tokens.shape[1])
  parts = []
  for first in range(0, len(tokens), rows):
    idx = np.minimum(np.arange(first, first + rows), len(tokens) - 1)  # pad with the last
    qkv = _forward_qkv(graphdef, params, jnp.asarray(tokens[idx]), jnp.asarray(lengths[idx]),
                       cfg.block)
    take = min(rows, len(tokens) - first)
    parts.append([(q[:max(0, min(take, keep_queries - first))], k[:take], v[:take])
                  for q, k, v in qkv])
  return [tuple(jnp.concatenate([p[layer][i] for p in parts]) for i in range(3))
          for layer in range(len(parts[0]))]


@functools.partial(jax.jit, static_argnames=("graphdef", "block"))
def _forward_qkv(graphdef, params, tokens, lengths, block):
  valid = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]
  mask = valid[:, None, :, None]
  return [tuple(jnp.where(mask, x, jnp.zeros((), x.dtype)) for x in qkv)
          for qkv in forward_qkv(nnx.merge(graphdef, params), tokens, block)]


def accuracy(model, prefill: Prefill, n: int, ests: list, codec: Codec, cfg,
             key) -> float:
  """Exact match of the last answer of the first ``n`` instances of ``prefill``, decoded
  greedily through ``ests`` from the dense caches of every byte before the prompt's last."""
  enc, hits = prefill.enc, []
  for first in range(0, n, cfg.batch):
    idx = np.minimum(np.arange(first, first + cfg.batch), n - 1)  # padded with the last
    new = int(enc.answer_tokens[idx].max()) + codec.extra
    prompt = enc.starts[idx] - 1  # the prompt's last token is the first decode step
    # Whole sequences with a prompt length, so that every task has the same shapes; the
    # answer is overwritten as it is decoded.
    pad = ((0, 0), (0, 0), (0, new), (0, 0))
    caches = [sa.KVCache(jnp.pad(k[idx], pad), jnp.pad(v[idx], pad), jnp.asarray(prompt))
              for _, k, v in prefill.qkv]
    options = dict(attention=ests, dense_layers=cfg.dense_layers)
    state = decoding.start_decode(caches, num_layers=len(caches), key=key, **options)
    token, got = jnp.asarray(enc.tokens[idx, prompt]), []
    for step in range(new):
      logits, state, _ = decoding.decode_step(model, state, token,
                                              key=jax.random.fold_in(key, step), **options)
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      got.append(np.asarray(token))
    got = np.stack(got, axis=1)
    kept = min(cfg.batch, n - first)
    hits += [codec.decode(ids[:m + codec.extra]).startswith(enc.answers[i]) for ids, m, i in
             zip(got[:kept], enc.answer_tokens[idx[:kept]], idx[:kept])]
  return float(np.mean(hits))
