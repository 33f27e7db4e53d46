"""Training Spotlight hash heads with optax, and their evaluation and storage.

``fit_hash_heads`` minimises ``hash_heads.bradley_terry_loss`` with AdamW (lr 1e-3,
betas (0.9, 0.98), weight decay 0.1, gradient clipping at 1.0, 1% linear warmup then cosine
decay), shows a tqdm bar with tokens/s, and returns the parameters with a history of the
loss and the misordered-pair fraction. ``topk_iou`` measures what the paper reports: the
overlap of the hash's top tokens with the exact top tokens.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_attn import hash_heads
from sparse_attn.attention import HIGHEST


def optimizer(steps: int, learning_rate: float = 1e-3, warmup_fraction: float = 0.01,
              weight_decay: float = 0.1, clip: float = 1.0) -> optax.GradientTransformation:
  """AdamW with clipping and a warmup-cosine schedule, as the Spotlight recipe."""
  warmup = max(1, math.ceil(warmup_fraction * steps))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=warmup, decay_steps=max(steps, warmup + 1))
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay))


def fit_hash_heads(params: dict, batches: Iterable[tuple[jax.Array, jax.Array]], *, steps: int,
                   key: jax.Array, learning_rate: float = 1e-3, progress: bool = True,
                   loss_kwargs: dict | None = None, **optimizer_kwargs) -> tuple[dict, dict]:
  """Trains hash heads on ``(q, k)`` batches of one layer.

  Args:
    params: initial parameters (``hash_heads.init_params``).
    batches: iterable of ``(q [B, Hq, T, D], k [B, Hkv, T, D])``, cycled if shorter than
      ``steps`` (e.g. a list of captured prefills).
    steps: optimisation steps.
    key: PRNG key for the loss's subsampling.
    learning_rate: peak learning rate of the schedule: the Spotlight recipe's 1e-3 by
      default; short runs on small problems (the tutorials, ``fit_on_keys``) use 1e-2, as
      1e-3 needs about ten times the steps.
    progress: show a tqdm progress bar (tokens/s and loss), redrawn once per step.
    loss_kwargs: extra arguments of ``sa.hash_heads.bradley_terry_loss`` (e.g.
      ``causal=False``).
    **optimizer_kwargs: other overrides of ``optimizer``'s defaults (``warmup_fraction``,
      ``weight_decay``, ``clip``).

  Returns:
    ``(params, history)``; ``history`` has per-step ``loss``, ``misordered`` (fraction of
    (top, other) pairs ranked wrongly by the relaxed scores) and ``tokens_per_s``.
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  hash_heads.check_params(params)
  loss_kwargs = dict(loss_kwargs or {})
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
  tx = optimizer(steps, learning_rate=learning_rate, **optimizer_kwargs)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, q, k, key):
    def loss_fn(p):
      return hash_heads.bradley_terry_loss(p, q, k, key, return_misordered=True, **loss_kwargs)

    (loss, misordered), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    with jax.numpy_dtype_promotion("standard"):  # optax's schedules mix ints and floats
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, misordered

  history = {"loss": [], "misordered": [], "tokens_per_s": []}
  source = itertools.cycle(batches) if isinstance(batches, (list, tuple)) else iter(batches)
  bar = range(steps)
  if progress:
    from tqdm.auto import tqdm  # a run-time dependency only for the progress bar
    bar = tqdm(bar, desc="hash heads", unit="step")
  for i in bar:
    try:
      q, k = next(source)
    except StopIteration:
      raise ValueError(f"batches ran out after {i} of {steps} steps; pass a list (cycled) or "
                       "a longer iterable") from None
    start = time.perf_counter()
    params, opt_state, loss, misordered = step(params, opt_state, q, k, jax.random.fold_in(key, i))
    loss = float(loss)  # waits for the step
    tokens = q.shape[0] * q.shape[2]
    history["loss"].append(loss)
    history["misordered"].append(float(misordered))
    history["tokens_per_s"].append(tokens / (time.perf_counter() - start))
    if progress:
      # refresh=False: the bar's own update at the next step draws it (once per step).
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{history['tokens_per_s'][-1]:.0f}",
                      refresh=False)
  return params, history


def fit_on_keys(params: dict, q: jax.Array, keys: jax.Array, *, steps: int, key: jax.Array,
                max_queries: int = 32, max_other: int = 256) -> tuple[dict, dict]:
  """Hash heads fitted to decode queries ``q [B, Hq, Tq, D]`` against one cache's keys
  ``[B, Hkv, S, D]`` (non-causal: every query sees every key), at learning rate 1e-2 (the
  recipe's 1e-3 needs about ten times the steps), quietly. ``(params, history)`` as
  ``fit_hash_heads``."""
  return fit_hash_heads(params, [(q, keys)], steps=steps, key=key, progress=False,
                        learning_rate=1e-2, loss_kwargs=dict(
                            causal=False, max_queries=max_queries, max_top=64,
                            max_other=max_other))


def topk_iou(params: dict, q: jax.Array, k: jax.Array, fraction: float = 0.02) -> jax.Array:
  """Mean IoU between the exact top tokens and the hash's top tokens, per query.

  Args:
    params: hash-head parameters.
    q: ``[B, Hq, Tq, D]`` queries (each scored against all ``T`` keys).
    k: ``[B, Hkv, T, D]`` keys.
    fraction: the top fraction (``max(1, ceil(fraction T))`` tokens).

  Returns:
    Scalar mean IoU; ties in Hamming similarity are broken by the lower index.
  """
  batch, num_q, q_len, head_dim = q.shape
  num_kv, length = k.shape[1], k.shape[2]
  group = num_q // num_kv
  n = max(1, math.ceil(fraction * length))
  true = jnp.einsum("bhqd,bhtd->bhqt", q.astype(jnp.float32),
                    jnp.repeat(k.astype(jnp.float32), group, axis=1), precision=HIGHEST)
  q_codes = hash_heads.hash(params, q.reshape(batch, num_kv, group * q_len, head_dim))
  k_codes = hash_heads.hash(params, k)
  sim = hash_heads.hamming_similarity(q_codes, k_codes, head_dim)
  sim = sim.reshape(batch, num_q, q_len, length).astype(jnp.float32)
  _, true_top = jax.lax.top_k(true, n)
  _, hash_top = jax.lax.top_k(sim, n)
  hit = jnp.zeros(true.shape, jnp.int32)
  hit = jnp.put_along_axis(hit, true_top, 1, axis=-1, inplace=False)
  inter = jnp.sum(jnp.take_along_axis(hit, hash_top, axis=-1), -1).astype(jnp.float32)
  return jnp.mean(inter / (2 * n - inter))


def save_params(path: str, params: dict) -> None:
  """Writes hash-head parameters to a ``.safetensors`` file."""
  from safetensors.numpy import save_file
  hash_heads.check_params(params)
  save_file({name: np.asarray(value, np.float32) for name, value in params.items()}, path)


def load_params(path: str) -> dict:
  """Reads parameters written by ``save_params``."""
  from safetensors.numpy import load_file
  params = {name: jnp.asarray(value) for name, value in load_file(path).items()}
  hash_heads.check_params(params)
  return params
