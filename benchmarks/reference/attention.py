"""Blockwise causal attention and the training forward of ``models.Llama`` that uses it.

``models.llama.causal_attention`` scores all ``T x T`` pairs and masks half of them. For
training at 1-2K tokens that wastes half the FLOPs and memory, so training uses
``blockwise_causal_attention``: queries are cut into blocks of ``block`` rows and block ``i``
scores only keys ``[0, (i + 1) * block)``, so the blocks above the diagonal are never computed
(about ``(1 + 1/n) / 2`` of the dense cost for ``n`` blocks). The result equals the dense one
up to float rounding (a test checks it). The model's own modules (projections, RoPE, MLP,
norms) are reused unchanged: ``forward_logits`` only swaps the attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.llama import HIGHEST, Llama
from models.rope import inverse_frequencies


def _block_attention(qg, k32, v32, start: int, stop: int, scale: float) -> jax.Array:
  """Rows ``[start, stop)`` of causal attention over keys ``[0, stop)``."""
  scores = jnp.einsum("bhgtd,bhsd->bhgts", qg, k32[:, :, :stop], precision=HIGHEST) * scale
  rows = jnp.arange(start, stop, dtype=jnp.int32)[:, None]
  cols = jnp.arange(stop, dtype=jnp.int32)[None, :]
  causal = (cols <= rows)[None, None, None]
  probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhgts,bhsd->bhgtd", probs, v32[:, :, :stop], precision=HIGHEST)


def blockwise_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                               block: int = 256, remat: bool = False) -> jax.Array:
  """Exact causal GQA attention that skips the masked blocks.

  Args:
    q: ``[B, Hq, T, D]`` post-RoPE queries.
    k, v: ``[B, Hkv, T, D]`` post-RoPE keys and values (``Hq % Hkv == 0``).
    block: query block size; ``T`` need not be a multiple of it.
    remat: under differentiation, recompute each block's probabilities in the backward pass
      (``jax.checkpoint``) instead of keeping them: memory ``O(block T)`` instead of
      ``O(T^2)`` per head, for one more forward of the attention.

  Returns:
    ``[B, Hq, T, D]`` in ``q.dtype``; scores and softmax in float32.
  """
  batch, num_heads, seq, head_dim = q.shape
  num_kv_heads = k.shape[1]
  if num_heads % num_kv_heads:
    raise ValueError(f"q heads ({num_heads}) must be a multiple of k heads ({num_kv_heads})")
  group = num_heads // num_kv_heads
  qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, seq, head_dim)
  k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
  scale = 1.0 / math.sqrt(head_dim)
  attend = _block_attention
  if remat:
    attend = jax.checkpoint(_block_attention, static_argnums=(3, 4, 5))
  outs = [attend(qg[:, :, :, start:min(start + block, seq)], k32, v32, start,
                 min(start + block, seq), scale) for start in range(0, seq, block)]
  out = jnp.concatenate(outs, axis=3)
  return out.reshape(q.shape).astype(q.dtype)


def forward_logits(model: Llama, input_ids: jax.Array, block: int = 256,
                   remat: bool = False) -> jax.Array:
  """``float32 [B, T, V]`` logits of ``model`` (positions ``0..T-1``), blockwise attention.

  The same computation as ``model(input_ids)`` with ``blockwise_causal_attention`` in place of
  the dense ``T x T`` attention.
  """
  batch, seq = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, :], (batch, seq))
  freqs = inverse_frequencies(model.config)
  x = model.embed_tokens(input_ids)
  for layer in model.layers:
    q, k, v = layer.self_attn.project(layer.input_layernorm(x), positions, freqs)
    x = layer.finish(x, blockwise_causal_attention(q, k, v, block, remat))
  return model.logits(model.norm(x))


def forward_qkv(model: Llama, input_ids: jax.Array,
                block: int = 256) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """Per layer, the post-RoPE ``(q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D])`` of a
  dense causal forward with blockwise attention: ``models.decoding.capture``'s values (up to
  float rounding) without its ``T x T`` score matrix, so that it runs at 16K tokens and more."""
  batch, seq = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, :], (batch, seq))
  freqs = inverse_frequencies(model.config)
  x = model.embed_tokens(input_ids)
  qkvs = []
  for layer in model.layers:
    q, k, v = layer.self_attn.project(layer.input_layernorm(x), positions, freqs)
    qkvs.append((q, k, v))
    x = layer.finish(x, blockwise_causal_attention(q, k, v, block))
  return qkvs
