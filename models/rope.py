r"""Rotary position embeddings (RoPE), with the "linear" and "llama3" frequency scalings.

Frequencies :math:`f_i = \theta^{-2i/D}`, :math:`i < D/2`. The rotation uses Hugging Face's
"rotate half" layout: the pair of dimension ``i`` is ``(x_i, x_{i + D/2})``, so
``x' = x cos + rotate_half(x) sin`` with ``rotate_half(x) = [-x_2, x_1]``.

Llama 3 scaling (``rope_type = "llama3"``): with wavelength :math:`\lambda_i = 2\pi / f_i`
and ``old = original_max_position_embeddings``, frequencies of long wavelengths
(:math:`\lambda > old / low\_freq\_factor`) are divided by ``factor``, short ones
(:math:`\lambda < old / high\_freq\_factor`) are kept, and the ones between are blended,
:math:`(1 - s) f / factor + s f` with
:math:`s = (old / \lambda - low\_freq\_factor) / (high\_freq\_factor - low\_freq\_factor)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """``float32 [D/2]`` rotation frequencies, scaled as the config says."""
  dim = config.head_dim
  freqs = 1.0 / config.rope_theta**(np.arange(0, dim, 2, dtype=np.float64) / dim)
  scaling = config.rope_scaling
  if scaling is None:
    pass
  elif scaling.rope_type == "linear":
    freqs = freqs / scaling.factor
  elif scaling.rope_type == "llama3":
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2.0 * math.pi / freqs
    scaled = np.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1.0 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    freqs = np.where(medium, blended, scaled)
  else:  # LlamaConfig.from_hf refuses other types
    raise ValueError(f"rope_scaling.rope_type {scaling.rope_type!r} is not supported")
  return freqs.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, freqs: np.ndarray) -> jax.Array:
  """Rotates ``x [B, H, T, D]`` by the angles ``positions [B, T] * freqs [D/2]``.

  Computed in float32; returns ``x.dtype``.
  """
  angles = positions.astype(jnp.float32)[:, None, :, None] * jnp.asarray(freqs)[None, None, None]
  cos, sin = jnp.cos(angles), jnp.sin(angles)  # [B, 1, T, D/2]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
