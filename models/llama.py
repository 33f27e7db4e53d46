"""The Llama-family decoder in Flax NNX (Llama 3.x, Mistral, Qwen2, Qwen3).

Module and parameter names follow Hugging Face's (``layers[i].self_attn.q_proj.kernel`` is
``model.layers.{i}.self_attn.q_proj.weight`` transposed), so that ``models.params`` maps them
with a short table. Two entry points:

* ``forward(input_ids)``: the full causal forward; returns the final hidden states and every
  layer's post-RoPE ``(q, k, v)`` (for the KV cache at prefill, and for ``capture``).
* ``decode(tokens, positions, attention)``: one token per row; the caller's ``attention(layer,
  q, k, v)`` owns the KV cache and the estimator, so the model holds no decode state.

Every matmul runs at ``Precision.HIGHEST`` (float32 stays float32 on GPUs too); attention and
norms accumulate in float32.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig
from models.rope import apply_rope, inverse_frequencies

HIGHEST = jax.lax.Precision.HIGHEST


class RMSNorm(nnx.Module):
  """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, normalised in float32."""

  def __init__(self, dim: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    weight = self.weight[...].astype(x.dtype)
    return weight.reshape((1,) * (y.ndim - 1) + (-1,)) * y


def _linear(n_in: int, n_out: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype,
                    precision=HIGHEST, rngs=rngs)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Exact causal GQA attention: ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` -> ``q``'s shape.

  Row ``t`` attends to ``[0, t]``; right padding therefore never reaches a valid token.
  """
  batch, num_heads, seq, head_dim = q.shape
  num_kv_heads = k.shape[1]
  qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, num_heads // num_kv_heads, seq,
                                     head_dim)
  scores = jnp.einsum("bhgtd,bhsd->bhgts", qg, k.astype(jnp.float32),
                      precision=HIGHEST) / math.sqrt(head_dim)
  causal = jnp.tril(jnp.ones((seq, seq), jnp.bool_))[None, None, None]
  probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  out = jnp.einsum("bhgts,bhsd->bhgtd", probs, v.astype(jnp.float32), precision=HIGHEST)
  return out.reshape(q.shape).astype(q.dtype)


class Attention(nnx.Module):
  """Projections, optional q/k RMSNorm (per head, before RoPE) and RoPE; GQA."""

  def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.q_proj = _linear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias, dtype, rngs)
    self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
    self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
    self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias, dtype, rngs)
    self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None
    self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None

  def project(self, x: jax.Array, positions: jax.Array, freqs) -> tuple[jax.Array, ...]:
    """``x [B, T, H]``, ``positions int32 [B, T]`` -> post-RoPE ``q [B, Hq, T, D]``,
    ``k, v [B, Hkv, T, D]``."""
    batch, seq, _ = x.shape

    def heads(y, n):
      return y.reshape(batch, seq, n, self.head_dim)

    q = heads(self.q_proj(x), self.num_heads)
    k = heads(self.k_proj(x), self.num_kv_heads)
    v = heads(self.v_proj(x), self.num_kv_heads)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (y.transpose(0, 2, 1, 3) for y in (q, k, v))
    return apply_rope(q, positions, freqs), apply_rope(k, positions, freqs), v

  def output(self, out: jax.Array) -> jax.Array:
    """``[B, Hq, T, D] -> [B, T, H]``."""
    batch, _, seq, _ = out.shape
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, seq, -1))


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
    c = config
    self.gate_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, rngs)
    self.up_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, rngs)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: attention, then MLP."""

  def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.self_attn = Attention(config, dtype, rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.mlp = MLP(config, dtype, rngs)

  def finish(self, x: jax.Array, attn_out: jax.Array) -> jax.Array:
    """Adds the attention output ``[B, Hq, T, D]`` to the residual, then the MLP."""
    x = x + self.self_attn.output(attn_out)
    return x + self.mlp(self.post_attention_layernorm(x))


# attention(layer, q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, D]) -> out [B, Hq, D]
DecodeAttention = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]


class Llama(nnx.Module):
  """A Llama-family causal LM.

  Args:
    config: a ``LlamaConfig`` (``LlamaConfig.from_hf`` parses a HF ``config.json``).
    dtype: parameter and activation dtype (float32 or bfloat16).
    rngs: initialisers' randomness (``models.load_hf`` overwrites every parameter).
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, dtype, rngs)
                            for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.lm_head = (None if config.tie_word_embeddings else
                    _linear(config.hidden_size, config.vocab_size, False, dtype, rngs))

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """Logits ``float32 [B, T, V]`` of the full causal forward of ``input_ids int32 [B, T]``."""
    hidden, _ = self.forward(input_ids)
    return self.logits(hidden)

  def forward(self, input_ids: jax.Array) -> tuple[jax.Array, list[tuple[jax.Array, ...]]]:
    """Causal forward at positions ``0..T-1``.

    Returns:
      ``(hidden [B, T, H]`` after the final norm, ``[(q, k, v)]`` per layer, post-RoPE:
      ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]``).
    """
    batch, seq = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, :], (batch, seq))
    freqs = inverse_frequencies(self.config)
    x = self.embed_tokens(input_ids)
    qkvs = []
    for layer in self.layers:
      q, k, v = layer.self_attn.project(layer.input_layernorm(x), positions, freqs)
      qkvs.append((q, k, v))
      x = layer.finish(x, causal_attention(q, k, v))
    return self.norm(x), qkvs

  def decode(self, tokens: jax.Array, positions: jax.Array,
             attention: DecodeAttention) -> jax.Array:
    """One decode step: ``tokens, positions int32 [B]`` -> hidden ``[B, H]`` (final norm).

    ``attention(layer, q, k, v)`` gets the new token's post-RoPE projections and returns the
    attention output ``[B, Hq, D]`` (it writes ``k, v`` to its cache first).
    """
    freqs = inverse_frequencies(self.config)
    x = self.embed_tokens(tokens[:, None])  # [B, 1, H]
    for i, layer in enumerate(self.layers):
      q, k, v = layer.self_attn.project(layer.input_layernorm(x), positions[:, None], freqs)
      out = attention(i, q[:, :, 0], k[:, :, 0], v[:, :, 0])
      x = layer.finish(x, out[:, :, None, :])
    return self.norm(x)[:, 0]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """``float32 [..., V]`` logits of final hidden states ``[..., H]``."""
    if self.lm_head is not None:
      return self.lm_head(hidden).astype(jnp.float32)
    table = self.embed_tokens.embedding[...].astype(hidden.dtype)
    return jnp.einsum("...h,vh->...v", hidden, table, precision=HIGHEST).astype(jnp.float32)
