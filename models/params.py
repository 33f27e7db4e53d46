"""Checkpoint loading: ``*.safetensors`` (single or sharded) into a ``models.Llama``.

Tensors are read with ``safetensors.safe_open(..., framework="numpy")``. NumPy has no
bfloat16, and safetensors' numpy reader refuses BF16 tensors in some versions; those are read
from the file's raw bytes (the header gives their offsets) as ``ml_dtypes.bfloat16``, which
ships with JAX. HF names map to module paths through the short table ``NAME_TABLE``.
"""

from __future__ import annotations

import json
import pathlib
import re
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

# (HF tensor name, path in models.Llama, transpose): torch Linear weights are [out, in].
NAME_TABLE = (
    (r"model\.embed_tokens\.weight", "embed_tokens.embedding", False),
    (r"model\.norm\.weight", "norm.weight", False),
    (r"lm_head\.weight", "lm_head.kernel", True),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
     r"layers.\1.\2.weight", False),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.weight", r"layers.\1.self_attn.\2.kernel",
     True),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.bias", r"layers.\1.self_attn.\2.bias",
     False),
    (r"model\.layers\.(\d+)\.self_attn\.([qk]_norm)\.weight", r"layers.\1.self_attn.\2.weight",
     False),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
     r"layers.\1.mlp.\2.kernel", True),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias", r"layers.\1.mlp.\2.bias",
     False),
)
# Buffers some checkpoints carry that are recomputed here.
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The ``*.safetensors`` files of a checkpoint (those of the index file when there is one)."""
  index = folder / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index} has no 'weight_map'")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
      raise ValueError(f"{index} names shard(s) that are missing: {missing}")
    return files
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise ValueError(f"no *.safetensors files in {str(folder)!r}")
  return files


def _raw_tensor(path: pathlib.Path, name: str) -> np.ndarray:
  """Reads one BF16 tensor from the raw bytes: 8-byte header size, JSON header, data."""
  with open(path, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    entry = json.loads(f.read(header_size))[name]
    start, end = entry["data_offsets"]
    f.seek(8 + header_size + start)
    data = f.read(end - start)
  return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(entry["shape"])


def read_tensors(path: pathlib.Path):
  """Yields ``(name, numpy array)`` for every tensor of one safetensors file."""
  with safe_open(str(path), framework="numpy") as f:
    for name in f.keys():
      if f.get_slice(name).get_dtype() == "BF16":
        yield name, _raw_tensor(path, name)
      else:
        yield name, f.get_tensor(name)


def module_path(name: str) -> tuple[str, bool] | None:
  """``(dotted module path, transpose)`` for a HF tensor name; None for ignored buffers."""
  for pattern, target, transpose in NAME_TABLE:
    if re.fullmatch(pattern, name):
      return re.sub(pattern, target, name), transpose
  if any(re.fullmatch(pattern, name) for pattern in IGNORED):
    return None
  raise ValueError(f"checkpoint tensor {name!r} has no place in the model (NAME_TABLE)")


def _variable(model: nnx.Module, path: str) -> nnx.Variable:
  node = model
  for part in path.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part, None)
    if node is None:
      raise ValueError(f"the model has no parameter {path!r} (config and checkpoint disagree)")
  return node


def load_params(model: nnx.Module, folder: pathlib.Path) -> None:
  """Sets every parameter of ``model`` (built with ``nnx.eval_shape`` or randomly) from the
  checkpoint in ``folder``, cast to each parameter's dtype. Raises ``ValueError`` on a
  missing tensor, an unknown one, or a shape mismatch."""
  loaded = set()
  for file in checkpoint_files(folder):
    for name, array in read_tensors(file):
      target = module_path(name)
      if target is None:
        continue
      path, transpose = target
      if path.startswith("lm_head") and model.lm_head is None:
        continue  # tied checkpoints may still store the head
      var = _variable(model, path)
      expected = var.get_value().shape
      array = array.T if transpose else array
      if tuple(array.shape) != tuple(expected):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(array.shape)}; the model "
                         f"expects {tuple(expected)} (transposed: {transpose})")
      var.set_value(jnp.asarray(array, dtype=var.get_value().dtype))
      loaded.add(path)
  expected = {".".join(str(p) for p in path)
              for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  missing = sorted(expected - loaded)
  if missing:
    raise ValueError(f"checkpoint in {str(folder)!r} lacks tensors for {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}")
