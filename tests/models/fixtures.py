"""The committed tiny HF checkpoints (tests/fixtures/make_hf_fixtures.py) and their goldens."""

from __future__ import annotations

import functools
import pathlib

import numpy as np
from safetensors.numpy import load_file

import models

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ("llama3", "qwen2", "qwen3", "mistral")


def folder(name: str) -> pathlib.Path:
  return ROOT / name


@functools.lru_cache(maxsize=None)
def golden(name: str) -> dict[str, np.ndarray]:
  return load_file(ROOT / "golden" / f"{name}.safetensors")


@functools.lru_cache(maxsize=None)
def model(name: str, dtype: str = "float32"):
  return models.load_hf(folder(name), dtype=dtype)[0]


def ragged_prompts(name: str) -> tuple[np.ndarray, np.ndarray]:
  """The two golden prompts, right-padded with zeros: ``(ids [2, T], lengths [2])``."""
  g = golden(name)
  prompts = [g["prompt_0"], g["prompt_1"]]
  lengths = np.array([len(p) for p in prompts], np.int32)
  ids = np.zeros((2, lengths.max()), np.int32)
  for row, p in enumerate(prompts):
    ids[row, :len(p)] = p
  return ids, lengths


def rel_err(x, ref) -> float:
  """``max |x - ref| / max |ref|``."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(x - ref).max() / np.abs(ref).max())
