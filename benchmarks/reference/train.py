"""Trains the reference model: a small byte-level Llama (GQA 8/2) on text + RULER-style tasks.

::

  python -m benchmarks.reference.train --out benchmarks/reference/runs/NAME [--minutes N] [--resume]

Recipes (``benchmarks.reference.recipes``): ``cpu75`` (the committed 1K model, about 75
minutes on one CPU core) is a length curriculum 128 -> 256 -> 512 -> 1024. The 128-byte phase
is dense supervision: ``copy`` (every repeated byte supervised) grows an induction head and
multi-query associative recall (about 4 queries per 128 bytes, loss on the answers only)
turns it into key lookup; natural text keeps language modelling (and previous-token heads)
going. Later phases hide the records in longer haystacks and add the needle,
variable-tracking and common-word tasks; the last phase trains at the evaluation length 1024.
``gpu16k`` (the long-context model, on an accelerator) continues the curriculum to 16384 with
the learnable aggregation tasks; ``cpu-smoke16k`` is it shrunk for a CPU. AdamW with warm-up
and cosine decay. Attention is blockwise (``benchmarks.reference.attention``): masked blocks
cost nothing.

Everything is seeded: the model from ``seed``, the batch of step ``s`` from
``numpy.random.default_rng([seed, 1, s])`` (so the data RNG state is the step), the evaluation
instances from ``[seed, 2, ...]`` on held-out text. A checkpoint (params, optimizer state,
step) is written every ``--checkpoint-minutes`` and at exit; ``--resume`` continues exactly
(bit-identical on the same device). At the end of the recipe, or when ``--minutes`` of this
invocation are spent, the model is written as a Hugging Face folder ``OUT/hf`` (loadable with
``models.load_hf``); at the end of the recipe it is also evaluated on the recipe's final
suite. Every evaluation is appended
to ``OUT/train_log.jsonl``, and every record carries the PFLOP done so far
(``recipes.train_flops``). The same script runs on a GPU: only the default tokens per step
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
from benchmarks.reference.recipes import (RECIPES, Phase, Recipe, model_config,  # noqa: F401
                                          recipe_config, train_flops)


FROM_RECIPE = "recipe"  # train()'s final_suite default: the recipe's


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


def make_train_step(graphdef, tx: optax.GradientTransformation, block: int,
                    remat: bool = False):
  """A jitted ``(params, opt_state, tokens, mask) -> (params, opt_state, loss)``; ``remat``
  recomputes each attention block in the backward pass."""

  def loss_fn(params, tokens, mask):
    logits = forward_logits(nnx.merge(graphdef, params), tokens, block, remat=remat)
    return masked_loss(logits, tokens, mask)

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
          eval_suite: Sequence[tuple[str, int, int]] | None = None,
          final_suite: Sequence[tuple[str, int, int]] | None | str = FROM_RECIPE,
          progress: bool = True):
  """Runs (or resumes) a recipe; returns ``(model, final results or None)``.

  Args:
    out: run folder (``ckpt/``, ``hf/``, ``train_log.jsonl``).
    recipe: a key of ``RECIPES``.
    seed: model, data and evaluation seed.
    minutes: wall-clock budget of this invocation; when spent, checkpoint, export, stop
      (the final suite runs only once the recipe's last step is done).
    resume: continue from ``out/ckpt`` (same recipe, seed, tokens per step and config).
    tokens_per_step: default the recipe's for this device (``Recipe.tokens_per_step``).
    checkpoint_minutes: checkpoint period.
    config: the model (default the recipe's, ``recipe_config``).
    max_steps: stop after this many steps in all (for tests); the schedule is the recipe's.
    eval_suite, final_suite: ``(task, length, n)`` groups; None for ``eval_suite`` and
      ``FROM_RECIPE`` for ``final_suite``: the recipe's; ``final_suite`` None: skip.
    progress: show a tqdm bar.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  if recipe not in RECIPES:
    raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
  rec = RECIPES[recipe]
  config = config or recipe_config(rec)
  if tokens_per_step is None:
    tokens_per_step = rec.tokens_per_step(jax.devices()[0].platform)
  eval_suite = rec.eval_suite if eval_suite is None else eval_suite
  final_suite = rec.final_suite if final_suite == FROM_RECIPE else final_suite
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
  train_step = make_train_step(graphdef, tx, rec.block, rec.remat)

  def step_flops(s):  # of step s, for the log's cumulative PFLOP (throughput = / seconds)
    phase = rec.phase(s)
    rows = max(1, tokens_per_step // phase.length)
    return train_flops(config, phase.length, rows, rec.block, rec.remat)

  flops = sum(step_flops(s) for s in range(step))
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
                   pflop=round(flops / 1e15, 6), train_seconds=round(train_seconds, 1),
                   length=rec.phase(step - 1).length,
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
    flops += step_flops(step)
    step += 1
    bar.update(1)
    bar.set_postfix(T=phase.length, loss=f"{losses[-1]:.3f}", refresh=False)
    if step % rec.log_every == 0:
      log.write(dict(kind="train", step=step, tokens=step * tokens_per_step,
                     pflop=round(flops / 1e15, 6), train_seconds=round(train_seconds, 1),
                     length=phase.length,
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
  if final_suite and step >= total:  # a chunk that stops early leaves it to the last one
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
                      help="default: the recipe's for this device (cpu75: 2048 on CPU, "
                           "16384 on accelerators; gpu16k: 32768 on accelerators)")
  parser.add_argument("--checkpoint-minutes", type=float, default=10.0)
  parser.add_argument("--no-final-eval", action="store_true")
  args = parser.parse_args(argv)
  train(args.out, recipe=args.recipe, seed=args.seed, minutes=args.minutes,
        resume=args.resume, tokens_per_step=args.tokens_per_step,
        checkpoint_minutes=args.checkpoint_minutes,
        final_suite=None if args.no_final_eval else FROM_RECIPE)


if __name__ == "__main__":
  main()
