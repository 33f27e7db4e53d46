"""The reference models' training recipes, their architectures, and their cost in FLOPs.

A ``Recipe`` is a length curriculum (``Phase``s), the optimizer's settings, the model (field
overrides of ``model_config``), the tokens per step, and the evaluation suites run during
and after training. ``train_flops`` counts a step's floating-point operations, so that the
accelerator time of a recipe can be planned before it runs (``plan``) and its throughput
read off its log (every log record carries the FLOPs done so far).

* ``cpu75``: the committed 1K model (``runs/ref-4x128``), about an hour on 2 CPU cores.
* ``gpu16k``: the long-context model, 6 layers, width 256, GQA 8 / 2 heads of dim 64,
  about 5M parameters, a curriculum 128 -> 16384 bytes, evaluated at 16K and 32K; runs on an
  accelerator in ``--minutes 9 --resume`` chunks (``python -m benchmarks.reference.recipes``
  prints the plan).
* ``cpu-smoke16k``: the same recipe shrunk (4 layers, width 128, heads of 32, curriculum to
  2048, 260 steps of 2048 tokens) for a few minutes on a CPU: every code path of ``gpu16k``
  (curriculum switches, attention rematerialisation, resume, evaluation past the training
  length); it learns nothing.
* ``tiny``: tests.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from models.config import LlamaConfig
from benchmarks.reference import evaluation, tasks


@dataclasses.dataclass(frozen=True)
class Phase:
  """``steps`` optimizer steps on sequences of ``length`` bytes, tasks drawn by weight;
  retrieval keys of ``key_letters`` letters."""

  length: int
  steps: int
  mixture: tuple[tuple[str, float], ...]
  key_letters: int = tasks.KEY_LETTERS


Suite = tuple[tuple[str, int, int], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
  """The curriculum, the optimizer (AdamW, warm-up then cosine to ``final_lr``), the model
  (``model``: overrides of ``model_config``'s fields), the tokens per optimizer step on a
  CPU and on an accelerator, the evaluation suites (``(task, length, instances)``), and
  ``remat``: recompute each attention block in the backward pass instead of storing its
  probabilities (needed at 16K: they would take ``T^2 / 2`` floats per head and layer)."""

  phases: tuple[Phase, ...]
  peak_lr: float = 2e-3
  final_lr: float = 1e-4
  warmup: int = 100
  weight_decay: float = 0.1
  b2: float = 0.95
  clip: float = 1.0
  block: int = 256
  eval_every: int = 200
  log_every: int = 25
  model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  cpu_tokens_per_step: int = 2048
  accelerator_tokens_per_step: int = 16384
  eval_suite: Suite = evaluation.TRAINING_SUITE
  final_suite: Suite = evaluation.FINAL_SUITE
  remat: bool = False

  @property
  def total_steps(self) -> int:
    return sum(p.steps for p in self.phases)

  def phase(self, step: int) -> Phase:
    for phase in self.phases:
      if step < phase.steps:
        return phase
      step -= phase.steps
    return self.phases[-1]

  def phase_ends(self) -> set[int]:
    return set(np.cumsum([p.steps for p in self.phases]).tolist())

  def tokens_per_step(self, platform: str) -> int:
    return self.cpu_tokens_per_step if platform == "cpu" else self.accelerator_tokens_per_step


def model_config(**overrides) -> LlamaConfig:
  """The reference architecture: 4 layers, width 128, GQA 8 query / 2 KV heads of 32 (so
  ``q_proj`` maps 128 -> 256), SwiGLU 384, byte vocabulary, RoPE base 10000 (about 1.0M
  parameters, 4 MB in float32)."""
  fields = dict(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=128,
                intermediate_size=384, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)
  fields.update(overrides)
  return LlamaConfig(**fields)


_WARMUP = (("copy", 0.3), ("mqar", 0.4), ("text", 0.3))
_MIXED = (("mqar", 0.3), ("needle_multiquery", 0.2), ("needle_single", 0.1),
          ("variable_tracking", 0.1), ("common_words", 0.05), ("copy", 0.05), ("text", 0.2))
_LONG = (("mqar", 0.2), ("needle_multiquery", 0.2), ("needle_single", 0.15),
         ("needle_multikey", 0.05), ("variable_tracking", 0.1), ("common_words", 0.05),
         ("copy", 0.05), ("text", 0.2))
# The long-context mixtures add the learnable aggregation tasks (tasks.AGGREGATION) from the
# 512-byte phase on, so that dense aggregation is learned before the haystacks grow.
_MIXED_AGG = (("mqar", 0.25), ("needle_multiquery", 0.15), ("needle_single", 0.1),
              ("variable_tracking", 0.1), ("frequent_word", 0.1), ("count_marked", 0.1),
              ("common_words", 0.02), ("copy", 0.03), ("text", 0.15))
_LONG_AGG = (("mqar", 0.15), ("needle_multiquery", 0.15), ("needle_single", 0.15),
             ("needle_multikey", 0.05), ("variable_tracking", 0.1), ("frequent_word", 0.12),
             ("count_marked", 0.12), ("common_words", 0.03), ("copy", 0.03), ("text", 0.1))

LONG_MODEL = dict(hidden_size=256, intermediate_size=640, num_layers=6, num_heads=8,
                  num_kv_heads=2, head_dim=64, rope_theta=500000.0,
                  max_position_embeddings=32768)
SMOKE_MODEL = dict(LONG_MODEL, hidden_size=128, intermediate_size=320, num_layers=4,
                   head_dim=32)
_LONG_TASKS = ("needle_single", "needle_multikey", "mqar", "variable_tracking",
               "frequent_word", "count_marked", "common_words", "text")


def long_suite(lengths: Sequence[int], instances: int, text: int = 2) -> Suite:
  """Every long-context task at each length (``text``: fewer instances, bits per byte)."""
  return tuple((task, length, text if task == "text" else instances)
               for length in lengths for task in _LONG_TASKS)


RECIPES = {
    # About 75 minutes on one CPU core at 2048 tokens per step. The 128-byte warm-up (copy +
    # multi-query recall + text) is where the induction circuit forms: a 2-layer width-128
    # probe left chance level after about 950 steps and reached 90% MQAR by 1350.
    "cpu75": Recipe(phases=(Phase(128, 2500, _WARMUP), Phase(256, 2000, _MIXED),
                            Phase(512, 1500, _LONG), Phase(1024, 1500, _LONG)),
                    eval_every=250),
    # The long-context model: 10300 steps of 32768 tokens (338M tokens), 40.6 PFLOP
    # (``plan``). The 128-byte warm-up is the 1K model's; each doubling of the length after
    # 1024 keeps the tasks and moves the records deeper.
    "gpu16k": Recipe(
        phases=(Phase(128, 2000, _WARMUP), Phase(512, 2000, _MIXED_AGG),
                Phase(1024, 2000, _LONG_AGG), Phase(2048, 1500, _LONG_AGG),
                Phase(4096, 1000, _LONG_AGG), Phase(8192, 800, _LONG_AGG),
                Phase(16384, 1000, _LONG_AGG)),
        peak_lr=1.5e-3, warmup=300, block=512, eval_every=500, log_every=50,
        model=LONG_MODEL, cpu_tokens_per_step=16384, accelerator_tokens_per_step=32768,
        eval_suite=(("mqar", 512, 8), ("frequent_word", 1024, 8), ("count_marked", 1024, 8),
                    ("needle_single", 4096, 8), ("needle_single", 16384, 8),
                    ("needle_multikey", 16384, 8), ("frequent_word", 16384, 8),
                    ("count_marked", 16384, 8), ("text", 16384, 1)),
        final_suite=long_suite((16384,), 50) + long_suite((32768,), 20, text=1),
        remat=True),
    # gpu16k shrunk to a few minutes on 2 CPU cores: every code path, nothing learned.
    "cpu-smoke16k": Recipe(
        phases=(Phase(128, 150, _WARMUP), Phase(512, 60, _MIXED_AGG),
                Phase(1024, 30, _LONG_AGG), Phase(2048, 20, _LONG_AGG)),
        warmup=20, block=512, eval_every=100, log_every=10, model=SMOKE_MODEL,
        cpu_tokens_per_step=2048, accelerator_tokens_per_step=2048,
        eval_suite=(("count_marked", 1024, 4), ("needle_single", 2048, 4),
                    ("frequent_word", 4096, 4)),
        final_suite=long_suite((2048, 4096), 4, text=1), remat=True),
    # For tests and smoke runs.
    "tiny": Recipe(phases=(Phase(128, 4, _WARMUP), Phase(256, 2, _LONG)), warmup=2,
                   block=64, eval_every=3, log_every=1),
}


def recipe_config(recipe: Recipe) -> LlamaConfig:
  return model_config(**recipe.model)


def parameters(config: LlamaConfig) -> int:
  """Every parameter of a ``models.Llama`` without biases (embedding and head untied)."""
  c = config
  attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  layer = attn + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
  return 2 * c.vocab_size * c.hidden_size + c.num_layers * layer + c.hidden_size


def train_flops(config: LlamaConfig, length: int, rows: int, block: int, remat: bool) -> float:
  """Floating-point operations of one training step on ``rows`` sequences of ``length``:
  ``3 x`` the forward (forward, then two matmuls per forward matmul in the backward pass),
  plus one more forward of the attention when it is rematerialised. The forward: 2 per
  weight per token (the embedding lookup is free) and, per layer and query head, ``4 D`` per
  scored (query, key) pair; blockwise attention scores ``block^2 n (n + 1) / 2`` pairs for
  ``n = length / block`` blocks (all of them when ``length <= block``)."""
  c = config
  weights = parameters(c) - c.vocab_size * c.hidden_size  # the embedding is a lookup
  b = min(block, length)
  n = -(-length // b)
  pairs = b * b * n * (n + 1) / 2
  attention = 4 * c.head_dim * c.num_heads * c.num_layers * pairs
  forward_matmuls = 2 * weights * length
  return rows * (3 * forward_matmuls + (4 if remat else 3) * attention)


def plan(recipe: Recipe, tokens_per_step: int, flops_per_second: float,
         chunk_seconds: float = 540.0) -> dict:
  """Per phase: steps, tokens, PFLOP and seconds at ``flops_per_second``; in all: seconds and
  the number of ``chunk_seconds`` runs (each less one minute for compiling and evaluation).

  Raises:
    ValueError: a non-positive ``flops_per_second`` or ``chunk_seconds`` of a minute or less.
  """
  if flops_per_second <= 0:
    raise ValueError(f"flops_per_second must be > 0, got {flops_per_second}")
  if chunk_seconds <= 60:
    raise ValueError(f"chunk_seconds must be > 60, got {chunk_seconds}")
  config = recipe_config(recipe)
  phases, total = [], 0.0
  for p in recipe.phases:
    rows = max(1, tokens_per_step // p.length)
    flops = p.steps * train_flops(config, p.length, rows, recipe.block, recipe.remat)
    phases.append(dict(length=p.length, steps=p.steps, tokens=p.steps * rows * p.length,
                       pflop=flops / 1e15, seconds=flops / flops_per_second))
    total += flops
  seconds = total / flops_per_second
  return dict(parameters=parameters(config), phases=phases, pflop=total / 1e15,
              seconds=seconds, chunks=int(np.ceil(seconds / (chunk_seconds - 60))))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="A recipe's FLOPs and accelerator time.")
  parser.add_argument("--recipe", default="gpu16k", choices=sorted(RECIPES))
  parser.add_argument("--tflops", type=float, default=20.0,
                      help="sustained TFLOP/s assumed (default 20: about 30%% of an H100's "
                           "67 TFLOP/s float32 without tensor cores)")
  parser.add_argument("--tokens-per-step", type=int, default=None)
  parser.add_argument("--chunk-minutes", type=float, default=9.0)
  args = parser.parse_args(argv)
  recipe = RECIPES[args.recipe]
  tokens = args.tokens_per_step or recipe.accelerator_tokens_per_step
  p = plan(recipe, tokens, args.tflops * 1e12, 60 * args.chunk_minutes)
  print(f"{args.recipe}: {p['parameters'] / 1e6:.2f}M parameters, {tokens} tokens per step, "
        f"{args.tflops:g} TFLOP/s assumed")
  for ph in p["phases"]:
    print(f"  length {ph['length']:6d}: {ph['steps']:5d} steps, {ph['tokens'] / 1e6:6.1f}M "
          f"tokens, {ph['pflop']:6.2f} PFLOP, {ph['seconds']:7.0f} s")
  print(f"  total {p['pflop']:.1f} PFLOP, {p['seconds'] / 60:.1f} min: {p['chunks']} runs of "
        f"--minutes {args.chunk_minutes:g} (a minute each for compiling and evaluating)")


if __name__ == "__main__":
  main()
