"""Flax NNX Llama-family decoders that use ``sparse_attn`` estimators for decoding.

::

  import models, sparse_attn as sa
  model, config = models.load_hf("path/to/checkpoint")   # config.json + *.safetensors
  logits = model(input_ids)                              # full causal forward, [B, T, V]
  out = models.generate(model, prompt_ids, 32, attention=sa.magicpig(K=10, L=150),
                        dense_layers=(0, 16), key=jax.random.key(0),
                        prompt_lengths=lengths)          # out.tokens, out.density
  qkv = models.capture(model, input_ids, lengths)        # per-layer post-RoPE q, k, v

Imports flow ``models -> sparse_attn -> pallas_kernels``.
"""

from models.checkpoint import load_hf
from models.config import LlamaConfig, RopeScaling
from models.decoding import DecodeState, GenerateOutput, LoopOutput, capture, decode_loop
from models.decoding import decode_step, generate
from models.decoding import layer_estimators, prefill, start_decode
from models.llama import Llama

__all__ = [
    "DecodeState", "GenerateOutput", "Llama", "LlamaConfig", "LoopOutput", "RopeScaling",
    "capture", "decode_loop", "decode_step", "generate", "layer_estimators", "load_hf", "prefill",
    "start_decode",
]
