"""Saves a ``models.Llama`` as a Hugging Face folder that ``models.load_hf`` (and
``transformers``' ``LlamaForCausalLM``) can load: ``config.json`` + ``model.safetensors``.

Tensor names are the inverse of ``models.params.NAME_TABLE``: a module path such as
``layers.0.self_attn.q_proj.kernel`` becomes ``model.layers.0.self_attn.q_proj.weight``,
transposed to torch's ``[out, in]``.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from models.config import LlamaConfig

# (module path pattern, HF name, transpose)
PATH_TABLE = (
    (r"embed_tokens\.embedding", "model.embed_tokens.weight", False),
    (r"norm\.weight", "model.norm.weight", False),
    (r"lm_head\.kernel", "lm_head.weight", True),
    (r"layers\.(\d+)\.(.+)\.kernel", r"model.layers.\1.\2.weight", True),
    (r"layers\.(\d+)\.(.+)\.(weight|bias)", r"model.layers.\1.\2.\3", False),
)


def hf_name(path: str) -> tuple[str, bool]:
  """``(HF tensor name, transpose)`` of a dotted parameter path of ``models.Llama``."""
  for pattern, name, transpose in PATH_TABLE:
    if re.fullmatch(pattern, path):
      return re.sub(pattern, name, path), transpose
  raise ValueError(f"parameter {path!r} has no Hugging Face name")


def hf_config(config: LlamaConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``config.json`` dict of a ``LlamaForCausalLM`` (no RoPE scaling, no biases)."""
  if config.architecture != "LlamaForCausalLM" or config.rope_scaling is not None:
    raise ValueError("export supports LlamaForCausalLM without rope_scaling")
  if config.qkv_bias != config.o_bias or config.qk_norm:
    raise ValueError("LlamaForCausalLM needs the same bias on q/k/v and o and no q/k norm")
  hf = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
      "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta, "rope_scaling": None,
      "attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias,
      "tie_word_embeddings": config.tie_word_embeddings,
      "max_position_embeddings": config.max_position_embeddings,
      "torch_dtype": "float32",
  }
  hf.update(extra or {})
  return hf


def save_hf(model: nnx.Module, folder: str | pathlib.Path,
            extra: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes ``config.json`` and ``model.safetensors`` (float32) of ``model`` to ``folder``.

  ``extra`` adds fields to ``config.json`` (e.g. how the model was trained); loaders ignore
  unknown fields.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transpose = hf_name(".".join(str(p) for p in path))
    array = np.asarray(var.get_value(), np.float32)
    tensors[name] = np.ascontiguousarray(array.T if transpose else array)
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  config = hf_config(model.config, extra)
  (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  return folder
