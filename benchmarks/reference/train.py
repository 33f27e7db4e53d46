"""Trains the reference model: a small byte-level Llama (GQA 8/2) on text + RULER-style tasks.

::

  python -m benchmarks.reference.train --out benchmarks/reference/runs/NAME [--minutes N] [--resume]

Recipe (``RECIPES["cpu75"]``, sized for about 75 minutes on one CPU core): a length curriculum
128 -> 256 -> 512 -> 1024. The 128-byte phase is dense supervision: ``copy`` (every repeated
byte supervised) grows an induction head and multi-query associative recall (about 4 queries
per 128 bytes, loss on the answers only) turns it into key lookup; natural text keeps
language modelling (and previous-token heads) going. Later phases hide the records in longer
haystacks and add the needle, variable-tracking and common-word tasks; the last phase trains
at the evaluation length 1024. AdamW with warm-up and cosine decay. Attention is blockwise
(``benchmarks.reference.attention``): masked blocks cost nothing.

Everything is seeded: the model from ``seed``, the batch of step ``s`` from
``numpy.random.default_rng([seed, 1, s])`` (so the data RNG state is the step), the evaluation
instances from ``[seed, 2, ...]`` on held-out text. A checkpoint (params, optimizer state,
step) is written every ``--checkpoint-minutes`` and at exit; ``--resume`` continues exactly
(bit-identical on the same device). At the end of the recipe, or when ``--minutes`` of this
invocation are spent, the model is written as a Hugging Face folder ``OUT/hf`` (loadable with
``models.load_hf``) and evaluated on ``evaluation.FINAL_SUITE``. Every evaluation is appended
to ``OUT/train_log.jsonl``. The same script runs on a GPU: only the default tokens per step
depends on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from models.config import LlamaConfig
from models.llama import Llama
from benchmarks.reference import evaluation, export, tasks
from benchmarks.reference.attention import forward_logits


@dataclasses.dataclass(frozen=True)
class Phase:
  """``steps`` optimizer steps on sequences of ``length`` bytes, tasks drawn by weight;
  retrieval keys of ``key_letters`` letters."""

  length: int
  steps: int
  mixture: tuple[tuple[str, float], ...]
  key_letters: int = tasks.KEY_LETTERS


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The curriculum and the optimizer (AdamW, warm-up then cosine to ``final_lr``)."""

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


_WARMUP = (("copy", 0.3), ("mqar", 0.4), ("text", 0.3))
_MIXED = (("mqar", 0.3), ("needle_multiquery", 0.2), ("needle_single", 0.1),
          ("variable_tracking", 0.1), ("common_words", 0.05), ("copy", 0.05), ("text", 0.2))
_LONG = (("mqar", 0.2), ("needle_multiquery", 0.2), ("needle_single", 0.15),
         ("needle_multikey", 0.05), ("variable_tracking", 0.1), ("common_words", 0.05),
         ("copy", 0.05), ("text", 0.2))
RECIPES = {
    # About 75 minutes on one CPU core at 2048 tokens per step. The 128-byte warm-up (copy +
    # multi-query recall + text) is where the induction circuit forms: a 2-layer width-128
    # probe left chance level after about 950 steps and reached 90% MQAR by 1350.
    "cpu75": Recipe(phases=(Phase(128, 2500, _WARMUP), Phase(256, 2000, _MIXED),
                            Phase(512, 1500, _LONG), Phase(1024, 1500, _LONG)),
                    eval_every=250),
    # For tests and smoke runs.
    "tiny": Recipe(phases=(Phase(128, 4, _WARMUP), Phase(256, 2, _LONG)), warmup=2,
                   block=64, eval_every=3, log_every=1),
}


def model_config(**overrides) -> LlamaConfig:
  """The reference architecture: 4 layers, width 128, GQA 8 query / 2 KV heads of 32 (so
  ``q_proj`` maps 128 -> 256), SwiGLU 384, byte vocabulary, RoPE base 10000 (about 1.0M
  parameters, 4 MB in float32)."""
  fields = dict(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=128,
                intermediate_size=384, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)
  fields.update(overrides)
  return LlamaConfig(**fields)


def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, recipe.peak_lr, recipe.warmup, max(recipe.total_steps, recipe.warmup + 1),
      end_value=recipe.final_lr)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(recipe.clip),
      optax.adamw(schedule, b1=0.9, b2=recipe.b2, weight_decay=recipe.weight_decay,
                  mask=decay_mask))


def masked_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over rows of each row's mean next-byte NLL on its masked bytes."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  weights = mask[:, 1:]
  per_row = (nll * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
  return per_row.mean()


def make_train_step(graphdef, tx: optax.GradientTransformation, block: int):
  """A jitted ``(params, opt_state, tokens, mask) -> (params, opt_state, loss)``."""

  def loss_fn(params, tokens, mask):
    return masked_loss(forward_logits(nnx.merge(graphdef, params), tokens, block), tokens, mask)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and float decays
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def step_batch(seed: int, step: int, phase: Phase, tokens_per_step: int,
               corpus: tasks.Corpus) -> tuple[np.ndarray, np.ndarray]:
  """The batch of ``step``: a pure function of ``(seed, step)``."""
  rng = np.random.default_rng([seed, 1, step])
  names = [name for name, _ in phase.mixture]
  weights = np.array([w for _, w in phase.mixture], np.float64)
  rows = max(1, tokens_per_step // phase.length)
  picks = rng.choice(len(names), size=rows, p=weights / weights.sum())
  return tasks.batch([tasks.make(names[i], rng, phase.length, corpus=corpus,
                                 key_letters=phase.key_letters) for i in picks])


def device_description() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind} (x{jax.device_count()}, jax {jax.__version__})"


def save_checkpoint(folder: pathlib.Path, params, opt_state, meta: dict[str, Any]) -> None:
  """Writes ``state.npz`` (every leaf of ``(params, opt_state)``) and ``meta.json`` atomically."""
  folder.mkdir(parents=True, exist_ok=True)
  leaves = [np.asarray(x) for x in jax.tree.leaves((params, opt_state))]
  with open(folder / "state.tmp.npz", "wb") as f:
    np.savez(f, *leaves)
  (folder / "meta.tmp.json").write_text(json.dumps(meta, indent=2))
  os.replace(folder / "state.tmp.npz", folder / "state.npz")
  os.replace(folder / "meta.tmp.json", folder / "meta.json")


def load_checkpoint(folder: pathlib.Path, params, opt_state):
  """``(params, opt_state, meta)`` from ``folder``, shaped like the given templates."""
  meta = json.loads((folder / "meta.json").read_text())
  treedef = jax.tree.structure((params, opt_state))
  with np.load(folder / "state.npz") as data:
    leaves = [jnp.asarray(data[f"arr_{i}"]) for i in range(len(data.files))]
  params, opt_state = jax.tree.unflatten(treedef, leaves)
  return params, opt_state, meta


class Log:
  """``train_log.jsonl``: one JSON record per line; on resume, records past the checkpoint's
  step are dropped so that a resumed run's log equals an uninterrupted one's."""

  def __init__(self, path: pathlib.Path, resume_step: int | None):
    self.path = path
    if resume_step is not None and path.exists():
      keep = [line for line in path.read_text().splitlines()
              if line and json.loads(line).get("step", 0) <= resume_step]
      path.write_text("".join(line + "\n" for line in keep))
    elif resume_step is None:
      path.write_text("")

  def write(self, record: dict[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def train(out: str | pathlib.Path, *, recipe: str = "cpu75", seed: int = 0,
          minutes: float | None = None, resume: bool = False,
          tokens_per_step: int | None = None, checkpoint_minutes: float = 10.0,
          config: LlamaConfig | None = None, max_steps: int | None = None,
          eval_suite: Sequence[tuple[str, int, int]] = evaluation.TRAINING_SUITE,
          final_suite: Sequence[tuple[str, int, int]] | None = evaluation.FINAL_SUITE,
          progress: bool = True):
  """Runs (or resumes) a recipe; returns ``(model, final results or None)``.

  Args:
    out: run folder (``ckpt/``, ``hf/``, ``train_log.jsonl``).
    recipe: a key of ``RECIPES``.
    seed: model, data and evaluation seed.
    minutes: wall-clock budget of this invocation; when spent, checkpoint, export, stop.
    resume: continue from ``out/ckpt`` (same recipe, seed, tokens per step and config).
    tokens_per_step: default 2048 on CPU, 16384 on accelerators.
    checkpoint_minutes: checkpoint period.
    config: the model (default ``model_config()``).
    max_steps: stop after this many steps in all (for tests); the schedule is the recipe's.
    eval_suite, final_suite: ``(task, length, n)`` groups (``final_suite`` None: skip).
    progress: show a tqdm bar.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rec = RECIPES[recipe]
  config = config or model_config()
  if tokens_per_step is None:
    tokens_per_step = 2048 if jax.devices()[0].platform == "cpu" else 16384
  corpus = tasks.load_corpus()
  graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(seed)))
  tx = make_optimizer(rec)
  with jax.numpy_dtype_promotion("standard"):
    opt_state = tx.init(params)
  run = dict(recipe=recipe, seed=seed, tokens_per_step=tokens_per_step,
             config=dataclasses.asdict(config))
  step, train_seconds = 0, 0.0
  if resume:
    params, opt_state, meta = load_checkpoint(out / "ckpt", params, opt_state)
    if meta["run"] != json.loads(json.dumps(run)):
      raise ValueError(f"--resume: the checkpoint's run {meta['run']} differs from {run}")
    step, train_seconds = meta["step"], meta["train_seconds"]
  losses: list[float] = list(meta.get("recent_losses", [])) if resume else []
  log = Log(out / "train_log.jsonl", step if resume else None)
  device = device_description()
  log.write(dict(kind="start", step=step, device=device, python=platform.python_version(),
                 corpus_files=corpus.files, corpus_sha256=corpus.sha256, **run,
                 recipe_spec=dataclasses.asdict(rec)))
  eval_instances = evaluation.suite_instances(eval_suite, seed, corpus)
  train_step = make_train_step(graphdef, tx, rec.block)
  total = min(rec.total_steps, max_steps or rec.total_steps)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, rec.peak_lr, rec.warmup, max(rec.total_steps, rec.warmup + 1), rec.final_lr)

  def schedule_lr(s):
    with jax.numpy_dtype_promotion("standard"):
      return float(schedule(s))

  def meta():
    return dict(run=run, step=step, train_seconds=train_seconds, device=device,
                tokens=step * tokens_per_step,
                recent_losses=losses[-max(rec.eval_every, rec.log_every):])

  def run_eval(kind, instances, loss):
    results = evaluation.evaluate(graphdef, params, instances, block=rec.block)
    log.write(dict(kind=kind, step=step, tokens=step * tokens_per_step,
                   train_seconds=round(train_seconds, 1), length=rec.phase(step - 1).length,
                   lr=schedule_lr(step), loss=loss, results=results))
    return results

  start = last_ckpt = time.time()
  bar = tqdm(total=total, initial=step, disable=not progress, mininterval=10, smoothing=0.1)
  while step < total:
    if minutes is not None and time.time() - start > 60 * minutes:
      break
    phase = rec.phase(step)
    tokens, mask = step_batch(seed, step, phase, tokens_per_step, corpus)
    t0 = time.time()
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(tokens),
                                         jnp.asarray(mask))
    losses.append(float(loss))
    train_seconds += time.time() - t0
    step += 1
    bar.update(1)
    bar.set_postfix(T=phase.length, loss=f"{losses[-1]:.3f}", refresh=False)
    if step % rec.log_every == 0:
      log.write(dict(kind="train", step=step, tokens=step * tokens_per_step,
                     train_seconds=round(train_seconds, 1), length=phase.length,
                     loss=float(np.mean(losses[-rec.log_every:]))))
    if step % rec.eval_every == 0 or step in rec.phase_ends():
      results = run_eval("eval", eval_instances, float(np.mean(losses[-rec.eval_every:])))
      bar.write(f"step {step} T={phase.length}: {evaluation.summary(results)}")
    if time.time() - last_ckpt > 60 * checkpoint_minutes:
      save_checkpoint(out / "ckpt", params, opt_state, meta())
      last_ckpt = time.time()
  bar.close()
  save_checkpoint(out / "ckpt", params, opt_state, meta())
  model = nnx.merge(graphdef, params)
  info = {k: v for k, v in meta().items() if k != "recent_losses"}
  export.save_hf(model, out / "hf", extra={"sparse_attn_reference": dict(
      info, finished=step >= rec.total_steps, python=platform.python_version(),
      corpus_sha256=corpus.sha256)})
  final = None
  if final_suite:
    final = run_eval("final", evaluation.suite_instances(final_suite, seed + 1, corpus),
                     float(np.mean(losses[-rec.eval_every:])) if losses else None)
    print(f"final (step {step}): {evaluation.summary(final)}", flush=True)
  return model, final


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="run folder")
  parser.add_argument("--recipe", default="cpu75", choices=sorted(RECIPES))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--minutes", type=float, default=None,
                      help="wall-clock budget of this invocation")
  parser.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
  parser.add_argument("--tokens-per-step", type=int, default=None,
                      help="default: 2048 on CPU, 16384 on accelerators")
  parser.add_argument("--checkpoint-minutes", type=float, default=10.0)
  parser.add_argument("--no-final-eval", action="store_true")
  args = parser.parse_args(argv)
  train(args.out, recipe=args.recipe, seed=args.seed, minutes=args.minutes,
        resume=args.resume, tokens_per_step=args.tokens_per_step,
        checkpoint_minutes=args.checkpoint_minutes,
        final_suite=None if args.no_final_eval else evaluation.FINAL_SUITE)


if __name__ == "__main__":
  main()
