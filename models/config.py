"""The decoder's static configuration, parsed from a Hugging Face ``config.json``.

Both spellings found on the hub are read: the older top-level ``rope_theta`` +
``rope_scaling`` (with ``rope_type`` or the legacy ``type``), and the newer
``rope_parameters`` dict that holds ``rope_theta`` too. Every validation error is a
``ValueError`` that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

# Architecture -> (q/k/v bias, o bias, q/k RMSNorm); None reads ``attention_bias``.
ARCHITECTURES = {
    "LlamaForCausalLM": (None, None, False),
    "MistralForCausalLM": (False, False, False),
    "Qwen2ForCausalLM": (True, False, False),
    "Qwen3ForCausalLM": (None, None, True),
}
ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (``rope_type`` "linear" or "llama3"; see ``models.rope``)."""

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static (hashable) configuration of a Llama-family decoder.

  Attributes:
    architecture: the HF class name, one of ``ARCHITECTURES``.
    vocab_size, hidden_size, intermediate_size, num_layers: model sizes.
    num_heads, num_kv_heads, head_dim: attention shape (``num_heads % num_kv_heads == 0``;
      ``head_dim`` may differ from ``hidden_size // num_heads``, as in Qwen3).
    rms_norm_eps: epsilon of every RMSNorm.
    rope_theta: RoPE base.
    rope_scaling: ``RopeScaling`` or None.
    qkv_bias, o_bias, mlp_bias: which projections carry a bias.
    qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3).
    tie_word_embeddings: the LM head is the transposed input embedding.
    max_position_embeddings: informative only.
    sliding_window: informative only; attention is global here (it matches HF for
      contexts up to the window).
  """

  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  sliding_window: int | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config field {name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"config field num_attention_heads ({self.num_heads}) must be a multiple of "
          f"num_key_value_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"config field head_dim must be even for RoPE, got {self.head_dim}")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"config field rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
    if not self.rope_theta > 0:
      raise ValueError(f"config field rope_theta must be > 0, got {self.rope_theta!r}")

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
    """Parses a Hugging Face ``config.json`` dict."""
    if not isinstance(hf, dict):
      raise ValueError(f"config must be a dict (a parsed config.json), got {type(hf).__name__}")
    architectures = hf.get("architectures")
    if not architectures or not isinstance(architectures, list):
      raise ValueError(
          f"config field 'architectures' is missing or empty; expected one of "
          f"{sorted(ARCHITECTURES)}")
    architecture = architectures[0]
    if architecture not in ARCHITECTURES:
      raise ValueError(
          f"config field 'architectures' names {architecture!r}, which is not supported; "
          f"supported: {sorted(ARCHITECTURES)}")
    missing = [name for name in REQUIRED if hf.get(name) is None]
    if missing:
      raise ValueError(f"config is missing required field(s) {missing} ({architecture})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"config field 'hidden_act' must be 'silu' (SwiGLU), got {act!r}")
    qkv_bias, o_bias, qk_norm = ARCHITECTURES[architecture]
    attention_bias = bool(hf.get("attention_bias", False))
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or _exact_div(hf["hidden_size"], num_heads)
    rope_theta, rope_scaling = parse_rope(hf)
    return cls(
        architecture=architecture,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias if o_bias is None else o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=qk_norm,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None)

  @classmethod
  def from_json(cls, path: str | pathlib.Path) -> LlamaConfig:
    """Reads ``path`` (a ``config.json`` file or a folder holding one)."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "config.json"
    if not path.is_file():
      raise ValueError(f"no config.json at {str(path)!r}")
    return cls.from_hf(json.loads(path.read_text()))


def _exact_div(hidden: int, heads: int) -> int:
  if not isinstance(heads, int) or heads < 1 or hidden % heads:
    raise ValueError(
        f"config field 'head_dim' is missing and hidden_size ({hidden}) is not a multiple of "
        f"num_attention_heads ({heads})")
  return hidden // heads


def parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """``(rope_theta, rope_scaling)`` from either spelling of the RoPE fields."""
  params = hf.get("rope_parameters")
  if params is not None:
    if not isinstance(params, dict):
      raise ValueError(f"config field 'rope_parameters' must be a dict, got {params!r}")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
      raise ValueError("config field 'rope_parameters' lacks 'rope_theta' (and there is no "
                       "top-level 'rope_theta')")
    scaling, field = params, "rope_parameters"
  else:
    theta = hf.get("rope_theta", 10000.0)
    scaling, field = hf.get("rope_scaling"), "rope_scaling"
  if scaling is None:
    return float(theta), None
  if not isinstance(scaling, dict):
    raise ValueError(f"config field {field!r} must be a dict or null, got {scaling!r}")
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(
        f"config field '{field}.rope_type' is {rope_type!r}; supported: {list(ROPE_TYPES)}")
  if rope_type == "default":
    return float(theta), None
  if scaling.get("factor") is None:
    raise ValueError(f"config field '{field}.factor' is required for rope_type {rope_type!r}")
  if rope_type == "linear":
    return float(theta), RopeScaling("linear", float(scaling["factor"]))
  needed = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [name for name in needed if scaling.get(name) is None]
  if missing:
    raise ValueError(f"config field '{field}' lacks {missing} for rope_type 'llama3'")
  return float(theta), RopeScaling(
      "llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
      float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
