"""Cheap per-task evaluation of the reference model on fixed held-out instances.

Exact match is teacher-forced: an answer span is right when every one of its bytes is the
argmax of the logits at the position before it. For a single span this is the same as greedy
decoding of the span from the same prefix (greedy emits the argmax bytes, so it reproduces the
span exactly when, and only when, every teacher-forced argmax is right). Multi-span tasks
(``mqar``: one span per query) are scored per span. ``text`` is scored in bits per byte.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.reference import tasks
from benchmarks.reference.attention import forward_logits

# (task, length, instances) of the evaluation run during training (held-out text).
TRAINING_SUITE = (
    ("copy", 128, 16), ("mqar", 128, 16), ("mqar", 256, 16), ("needle_single", 256, 16),
    ("needle_single", 1024, 32), ("needle_multikey", 1024, 16), ("mqar", 1024, 8),
    ("variable_tracking", 1024, 16), ("common_words", 1024, 16), ("text", 1024, 4),
)
# The suite of the final report: the evaluation length 1024 and twice that.
FINAL_SUITE = tuple((task, length, n) for length in (1024, 2048) for task, n in (
    ("needle_single", 200 if length == 1024 else 100), ("needle_multikey", 50),
    ("mqar", 20), ("variable_tracking", 50), ("common_words", 50), ("text", 8)))


def suite_instances(suite: Sequence[tuple[str, int, int]], seed: int,
                    corpus: tasks.Corpus | None = None) -> list[tuple[str, int, list]]:
  """The fixed held-out instances of ``suite``, a pure function of ``seed``."""
  out = []
  for index, (task, length, n) in enumerate(suite):
    out.append((task, length, [tasks.make(task, (seed, 2, index, i), length, held_out=True,
                                          corpus=corpus) for i in range(n)]))
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "block"))
def _predict(graphdef, params, tokens, block):
  """``(argmax int32 [B, T], nll float32 [B, T])`` of the next byte at each position."""
  logits = forward_logits(nnx.merge(graphdef, params), tokens, block)[:, :-1]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), nll


def score(task: str, instances: list[tasks.Instance], argmax: np.ndarray,
          nll: np.ndarray) -> dict[str, float]:
  """Exact match and byte accuracy over answer spans (or bits per byte for ``text``)."""
  if task == "text":
    masks = np.stack([i.mask[1:] for i in instances])
    return {"bits_per_byte": float((nll * masks).sum() / masks.sum() / math.log(2)),
            "n": len(instances)}
  exact, right, total = [], 0, 0
  for row, inst in enumerate(instances):
    for start, stop in inst.spans:
      hit = argmax[row, start - 1:stop - 1] == inst.tokens[start:stop]
      exact.append(bool(hit.all()))
      right += int(hit.sum())
      total += stop - start
  return {"exact": float(np.mean(exact)), "byte_acc": right / total, "n": len(exact)}


def evaluate(graphdef, params, instances: list[tuple[str, int, list]], batch_size: int = 8,
             block: int = 256) -> dict[str, dict[str, float]]:
  """Scores every ``(task, length, instances)`` group; keys ``"{task}@{length}"``."""
  results = {}
  for task, length, group in instances:
    argmaxes, nlls = [], []
    for start in range(0, len(group), batch_size):
      chunk = group[start:start + batch_size]
      tokens, _ = tasks.batch(chunk + [chunk[-1]] * (batch_size - len(chunk)))
      argmax, nll = _predict(graphdef, params, jnp.asarray(tokens), block)
      argmaxes.append(np.asarray(argmax)[:len(chunk)])
      nlls.append(np.asarray(nll)[:len(chunk)])
    results[f"{task}@{length}"] = score(task, group, np.concatenate(argmaxes),
                                        np.concatenate(nlls))
  return results


def summary(results: dict[str, dict[str, float]]) -> str:
  """A one-line summary: exact match in percent, bits per byte for text."""
  parts = []
  for name, r in results.items():
    parts.append(f"{name} {r['bits_per_byte']:.2f}bpb" if "bits_per_byte" in r else
                 f"{name} {100 * r['exact']:.0f}%")
  return ", ".join(parts)
