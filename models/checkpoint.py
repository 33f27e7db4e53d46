"""``load_hf``: a Hugging Face checkpoint (local folder or hub id) -> ``(Llama, LlamaConfig)``.

A local folder needs ``config.json`` and ``*.safetensors`` (sharded checkpoints with their
``model.safetensors.index.json`` too). A hub id is downloaded with
``huggingface_hub.snapshot_download`` only when ``huggingface_hub`` is installed (the optional
``hub`` extra) and the hub is reachable.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig
from models.llama import Llama
from models.params import load_params

HOW_TO = ("pass a local folder that holds config.json and *.safetensors, e.g. one made by "
          "`huggingface-cli download REPO_ID --local-dir DIR` on a machine with network")


def resolve_folder(path_or_repo_id: str | pathlib.Path) -> pathlib.Path:
  """A local checkpoint folder for ``path_or_repo_id`` (downloading a hub id if possible)."""
  path = pathlib.Path(path_or_repo_id).expanduser()
  if path.is_dir():
    return path
  name = str(path_or_repo_id)
  looks_like_repo = (name.count("/") == 1 and not name.startswith((".", "/", "~"))
                     and not path.exists())
  if not looks_like_repo:
    raise ValueError(f"checkpoint folder {name!r} does not exist; {HOW_TO}")
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(
        f"{name!r} is not a local folder, and huggingface_hub is not installed to download it "
        f"from the hub (pip install huggingface_hub); or {HOW_TO}") from None
  try:
    folder = huggingface_hub.snapshot_download(
        name, allow_patterns=["*.json", "*.safetensors"])
  except Exception as err:  # offline, unknown repo, gated model, ...
    raise ValueError(f"could not download {name!r} from the hub ({type(err).__name__}: {err}); "
                     f"{HOW_TO}") from err
  return pathlib.Path(folder)


def load_hf(path_or_repo_id: str | pathlib.Path, dtype=jnp.float32) -> tuple[Llama, LlamaConfig]:
  """Builds a decoder from a Hugging Face checkpoint.

  Args:
    path_or_repo_id: a local folder with ``config.json`` and ``*.safetensors``, or a hub id
      such as ``"meta-llama/Llama-3.1-8B"`` (needs ``huggingface_hub`` and network).
    dtype: parameter and activation dtype (float32 or bfloat16); the checkpoint's tensors
      are cast to it.

  Returns:
    ``(model, config)``.

  Raises:
    ValueError: a missing folder or download, an invalid or unsupported ``config.json``
      (naming the field), or a checkpoint that does not fit the config.
  """
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
  folder = resolve_folder(path_or_repo_id)
  config = LlamaConfig.from_json(folder)
  model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
  load_params(model, folder)
  return model, config
