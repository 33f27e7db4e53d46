"""``python -m benchmarks eval``: every estimator on a trained model's real attention.

On held-out instances of the reference model's tasks (``benchmarks.reference.tasks``), for each
method:

* **task accuracy**: the prompt up to the last answer is prefilled densely except its final
  byte, which is fed as the first decode step; the answer is then decoded greedily with the
  method in every layer but ``dense_layers`` (layer 0 by default, as MagicPIG's evaluation
  keeps the first layer dense), so every answer byte is predicted through the method.
  Exact match of the whole answer.
* **attention error per layer**: the model's own post-RoPE queries, keys and values
  (``models.capture``, teacher-forced) at the ``queries`` positions that predict the answer
  bytes; the cache holds every earlier token. ``||o_hat - o|| / ||o||`` per query head
  against exact attention, and the density (fraction of the valid tokens that entered).
* **IoU with the oracle top-2%**: the tokens that entered the estimate against the
  ``ceil(0.02 n)`` tokens of highest exact score, per query head. The tokens that entered are
  read off by a probe: the values are replaced by one-hot position codes (``D`` positions at
  a time), so a token entered exactly when its code shows in the output. Methods whose
  selection depends on the values (vAttention's output guarantee sizes its sample from them)
  get no IoU.
* **vAttention's (epsilon, delta)**: over ``seeds`` draws per query head, the fraction with a
  relative output error above epsilon, on the heads whose budget was not clipped, per layer,
  against ``delta + 3`` standard errors.
* **error-vs-density curves**: each method swept over its own knob (top-k's and Spotlight's
  fraction, MagicPIG's table count ``L``, vAttention's epsilon, the importance proposal's
  density; ``density_eval.SWEEPS``) on ``curve_queries`` answer positions per instance, one
  line per method and layer group.

The dense forward (``eval_prefill``) runs once per task with blockwise attention, so the
evaluation runs at 16K tokens and more; every method decodes from its caches.

Spotlight's hash heads are trained per layer (``sa.train.fit_hash_heads``) on the model's
queries and keys over *training-split* instances of the same tasks; the untrained,
identity-initialised heads (the sign of each coordinate, a linear hash with the same number
of bits) are the baseline.

This module is an experiment: it lives in ``benchmarks`` (not installed), above ``models``
and ``sparse_attn``, which never import it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import sparse_attn as sa
from benchmarks import harness, methods
from benchmarks.reference import tasks
from benchmarks.eval_prefill import Prefill, accuracy, dense_qkv
from benchmarks.task_codec import Codec
from benchmarks.token_sets import entered, iou, oracle_top, recall  # noqa: F401 (re-exported)
from models import checkpoint

REFERENCE = str(pathlib.Path(__file__).resolve().parent / "reference" / "runs" / "ref-4x128"
                / "hf")
QUICK_TASKS = ("needle_single", "needle_multikey", "variable_tracking", "common_words")
FULL_TASKS = QUICK_TASKS + ("mqar",)
LEARNABLE_AGGREGATION = ("frequent_word", "count_marked")  # trained by the long recipes
ALL_TASKS = FULL_TASKS + LEARNABLE_AGGREGATION
# Names in methods.EVAL, in the table's order.
QUICK_METHODS = ("dense", "streaming", "topk 2% (oracle)", "magicpig K=10 L=150",
                 "vattention e=d=0.05", "spotlight 2% (trained)", "linear hash 2% (untrained)")
FULL_METHODS = QUICK_METHODS[:3] + ("topp 0.9 (oracle)",) + QUICK_METHODS[3:4] + (
    "magicpig K=8 L=75",) + QUICK_METHODS[4:5] + (
        "vattention simhash e=d=0.05", "vattention spotlight e=d=0.05") + QUICK_METHODS[5:]
ORACLE_FRACTION = methods.ORACLE_FRACTION


@dataclasses.dataclass(frozen=True)
class Config:
  """What ``eval`` runs. The defaults take about 2 minutes on 2 CPU cores; ``full()`` every
  method and task with more instances (about 10 minutes)."""

  model: str = REFERENCE
  tasks: tuple[str, ...] = QUICK_TASKS
  methods: tuple[str, ...] = QUICK_METHODS
  length: int = 1024
  instances: int = 16  # per task, for accuracy
  attention_instances: int = 4  # per task, for the attention-level metrics
  queries: int = 4  # answer-predicting positions per instance
  dense_layers: tuple[int, ...] = (0,)
  sinks: int = 4
  local: int = 16
  epsilon: float = 0.05
  delta: float = 0.05
  seeds: int = 4  # vAttention draws per query head
  hash_steps: int = 60
  hash_instances: int = 2  # per task, training split
  hash_tokens: int | None = None  # train the hash heads on this prefix (None: whole rows)
  batch: int = 16
  seed: int = 0
  curve_queries: int = 2  # answer positions per instance in the error-vs-density curves
  forward_tokens: int = 32768  # tokens per dense forward (rows = this // length)
  block: int = 512  # query block of the dense forward's blockwise attention

  @classmethod
  def full(cls, **overrides) -> "Config":
    return cls(**{**dict(tasks=FULL_TASKS, methods=FULL_METHODS, instances=50,
                         attention_instances=8, seeds=8, hash_steps=300), **overrides})

  @classmethod
  def at_length(cls, length: int, full: bool = False, **overrides) -> "Config":
    """``Config()`` (or ``full()``) at ``length`` bytes, with instances scaled down as
    ``1024 / length`` (each costs ``length^2``): at 16K the quick run takes 4 instances per
    task for accuracy and 2 for the attention metrics, ``full`` 16 and 4; past 4096 bytes the
    quick run also measures 2 answer positions (not 4; 1 in the curves, not 2) and trains
    Spotlight's heads on one instance per task (not 2), on its first 4096 tokens (each
    training step scores every sampled query against every key)."""
    base = cls.full() if full else cls()
    scale = min(1.0, 1024 / length)
    sized = dict(length=length,
                 instances=max(16 if full else 4, round(base.instances * scale)),
                 attention_instances=max(4 if full else 2,
                                         round(base.attention_instances * scale)))
    if length > 4096 and not full:
      sized.update(queries=2, curve_queries=1, hash_instances=1, hash_tokens=4096)
    return (cls.full if full else cls)(**{**sized, **overrides})


def evaluation_defaults(folder: str) -> tuple[int, tuple[str, ...]]:
  """``(length, extra tasks)`` of a reference model, from its recipe (``config.json``'s
  ``sparse_attn_reference``): the last training length, and the learnable aggregation tasks
  it was trained on; ``(1024, ())`` for any other model."""
  from benchmarks.reference.recipes import RECIPES
  path = pathlib.Path(folder) / "config.json"
  meta = json.loads(path.read_text()).get("sparse_attn_reference", {}) if path.is_file() else {}
  recipe = RECIPES.get(meta.get("run", {}).get("recipe"))
  if recipe is None:
    return 1024, ()
  trained = {task for phase in recipe.phases for task, _ in phase.mixture}
  return recipe.phases[-1].length, tuple(t for t in LEARNABLE_AGGREGATION if t in trained)


def make_method(method: methods.Method, cfg: Config, hash_params: dict | None) -> sa.Estimator:
  """``method`` with the evaluation's exact window, epsilon and delta."""
  return method.make(methods.Context(sinks=cfg.sinks, local=cfg.local, epsilon=cfg.epsilon,
                                     delta=cfg.delta, hash_params=hash_params))


def instances(cfg: Config, task: str, n: int, held_out: bool, corpus) -> list:
  split = 3 if held_out else 4  # seeds apart from the training run's (split 2)
  return [tasks.make(task, (cfg.seed, split, i), cfg.length, held_out=held_out,
                     corpus=corpus) for i in range(n)]


def layer_params(cfg: Config, model_cfg, trained: list | None, layer: int) -> dict:
  if trained is not None:
    return trained[layer]
  return sa.hash_heads.init_params(jax.random.PRNGKey(cfg.seed + 2), model_cfg.num_kv_heads,
                                   model_cfg.head_dim)


def layer_methods(cfg: Config, model_cfg, method: methods.Method,
                  trained: list | None) -> list[sa.Estimator]:
  """One estimator per layer: the same object for every layer (so that each compiled
  function is reused), except those with Spotlight's heads, which differ per layer."""
  if method.hash_heads is None:
    return [make_method(method, cfg, None)] * model_cfg.num_layers
  heads = trained if method.hash_heads == "trained" else None
  return [make_method(method, cfg, layer_params(cfg, model_cfg, heads, layer))
          for layer in range(model_cfg.num_layers)]


def train_spotlight(model, model_cfg, cfg: Config, corpus, codec: Codec,
                    tick) -> tuple[list, list]:
  """Hash heads per layer trained on the model's queries and keys (training split)."""
  group = [inst for task in cfg.tasks
           for inst in instances(cfg, task, cfg.hash_instances, False, corpus)]
  enc = codec.encode(group)
  shortest = min(int(enc.lengths.min()), cfg.hash_tokens or enc.tokens.shape[1])  # no padding
  qkv = dense_qkv(model, enc.tokens[:, :shortest], np.full(len(group), shortest), cfg,
                  len(group))
  trained, history = [], []
  for layer, (q, k, _) in enumerate(qkv):
    start = layer_params(cfg, model_cfg, None, layer)
    params, hist = sa.train.fit_hash_heads(
        start, [(q, k)], steps=cfg.hash_steps, key=jax.random.PRNGKey(cfg.seed + 10 + layer),
        progress=False, learning_rate=1e-2,
        loss_kwargs=dict(max_queries=64, max_top=64, max_other=128))
    trained.append(params)
    history.append({"loss_first": hist["loss"][0], "loss_last": hist["loss"][-1]})
    tick(f"hash heads, layer {layer}")
  return trained, history


class Problem(NamedTuple):
  """The queries at one answer position, the cache of every earlier token, and what every
  method is compared with: the exact output and the oracle's top 2%."""

  q: jax.Array
  cache: sa.KVCache
  exact: jax.Array
  top: np.ndarray


class Attention:
  """One task's captured attention: per layer, one ``Problem`` per answer position (built
  once, shared by every method)."""

  def __init__(self, prefill: Prefill, n: int, cfg: Config):
    enc = prefill.enc
    self.qkv = [(q[:n], k[:n], v[:n]) for q, k, v in prefill.qkv]
    self.positions = [np.minimum(enc.starts[:n] - 1 + j, enc.lengths[:n] - 1)
                      for j in range(cfg.queries)]
    self.batch = n
    self._problems = {}

  def problems(self, layer: int) -> list[Problem]:
    if layer not in self._problems:
      q, k, v = self.qkv[layer]
      rows = jnp.arange(self.batch)
      self._problems[layer] = []
      for p in self.positions:
        cache = sa.KVCache(k, v, jnp.asarray(p + 1, jnp.int32))
        qp = q[rows, :, jnp.asarray(p)]
        self._problems[layer].append(Problem(qp, cache, sa.dense_attention(qp, cache).out,
                                             np.asarray(oracle_top(qp, cache))))
    return self._problems[layer]


@functools.partial(jax.jit, static_argnums=0)
def _attend(est: sa.Estimator, q, cache, index, key) -> sa.AttentionResult:
  return est.attend(q, cache, index, key)


@functools.partial(jax.jit, static_argnums=0)
def _init(est: sa.Estimator, cache, key):
  return est.init(cache, key)


def measure(est: sa.Estimator, method: methods.Method, att: Attention, layer: int,
            cfg: Config, key) -> dict:
  """Errors, densities and IoUs of ``est`` on one layer of one task (all positions)."""
  attend = functools.partial(_attend, est)
  init = functools.partial(_init, est)
  errors, density, ious, recalls, fails, clipped = [], [], [], [], [], []
  for i, (q, cache, exact, top) in enumerate(att.problems(layer)):
    index = init(cache, jax.random.fold_in(key, i))
    draws = cfg.seeds if method.samples else 1
    for s in range(draws):
      k_attend = jax.random.fold_in(key, 1000 * i + s)
      res = attend(q, cache, index, k_attend)
      err = harness.relative_error(res.out, exact)
      errors.append(err)
      density.append(np.asarray(res.density))
      if method.samples:
        fails.append(err > cfg.epsilon)
        clipped.append(np.asarray(res.stats["budget_clipped"], bool))
    if not method.samples:  # a value probe reads the tokens off
      got = np.asarray(entered(est, q, cache, index, k_attend))
      ious.append(iou(got, top))
      recalls.append(recall(got, top))
  out = {"errors": np.concatenate([e.ravel() for e in errors]),
         "density": np.concatenate([d.ravel() for d in density])}
  if ious:
    out["iou"] = np.concatenate([x.ravel() for x in ious])
    out["recall"] = np.concatenate([x.ravel() for x in recalls])
  if fails:
    out["fail"] = np.concatenate([f.ravel() for f in fails])
    out["clipped"] = np.concatenate([c.ravel() for c in clipped])
  return out


def run(cfg: Config = Config(), progress: bool = True) -> dict:
  """The whole evaluation; returns the report (``benchmarks.estimator_report`` formats it)."""
  begin = time.perf_counter()
  model, model_cfg = checkpoint.load_hf(cfg.model)
  codec = Codec(cfg.model, model_cfg.vocab_size)
  for layer in cfg.dense_layers:
    if not 0 <= layer < model_cfg.num_layers:
      raise ValueError(f"dense_layers must lie in [0, {model_cfg.num_layers}), got {layer}")
  corpus = tasks.load_corpus()
  chosen = {name: methods.lookup(methods.EVAL, name) for name in cfg.methods}
  spotlight = any(m.hash_heads == "trained" for m in chosen.values())
  from benchmarks import density_eval  # it imports this module
  sweeps = [s for s in density_eval.SWEEPS if spotlight or
            density_eval.sweep_method(s, s.values[0]).hash_heads != "trained"]
  total = (model_cfg.num_layers * spotlight + len(cfg.methods) * len(cfg.tasks)
           * (1 + model_cfg.num_layers) + sum(len(s.values) for s in sweeps) * (
               cfg.curve_queries > 0))
  from tqdm.auto import tqdm
  bar = tqdm(total=total, desc="eval", unit="step", disable=not progress)

  def tick(what):
    bar.set_postfix_str(what)
    bar.update(1)

  phase = {"hash heads": 0.0, "prefill": 0.0, "accuracy": 0.0, "attention": 0.0}
  clock = time.perf_counter()
  trained, hash_history = (train_spotlight(model, model_cfg, cfg, corpus, codec, tick) if spotlight
                           else (None, []))
  phase["hash heads"] += time.perf_counter() - clock
  key = jax.random.PRNGKey(cfg.seed + 1)
  ests_of = {name: layer_methods(cfg, model_cfg, m, trained) for name, m in chosen.items()}
  acc = {m: {} for m in cfg.methods}
  curve_problems = {layer: [] for layer in range(model_cfg.num_layers)}
  layers = {m: {t: [] for t in cfg.tasks} for m in cfg.methods}
  for task in cfg.tasks:
    clock = time.perf_counter()
    held_out = instances(cfg, task, max(cfg.instances, cfg.attention_instances), True, corpus)
    prefill = Prefill(model, held_out, codec, cfg, cfg.attention_instances)
    att = Attention(prefill, cfg.attention_instances, cfg)
    phase["prefill"] += time.perf_counter() - clock
    for layer in curve_problems:
      curve_problems[layer] += [(p.q, p.cache, p.exact)
                                for p in att.problems(layer)[:cfg.curve_queries]]
    for name, ests in ests_of.items():
      clock = time.perf_counter()
      acc[name][task] = accuracy(model, prefill, cfg.instances,
                                 None if chosen[name].family == "dense" else ests, codec, cfg, key)
      phase["accuracy"] += time.perf_counter() - clock
      tick(f"{task}: {name} accuracy")
      clock = time.perf_counter()
      for layer in range(model_cfg.num_layers):
        layers[name][task].append(measure(ests[layer], chosen[name], att, layer, cfg, key))
        tick(f"{task}: {name} layer {layer}")
      phase["attention"] += time.perf_counter() - clock
  clock = time.perf_counter()
  curves = error_density_curves(cfg, model_cfg, curve_problems, trained, tick)
  phase["curves"] = time.perf_counter() - clock
  bar.close()
  return {"config": dataclasses.asdict(cfg), "curves": curves, "model": {
      "path": cfg.model, "layers": model_cfg.num_layers, "heads": model_cfg.num_heads,
      "kv_heads": model_cfg.num_kv_heads, "head_dim": model_cfg.head_dim},
      "accuracy": acc, "measured": layers, "hash_training": hash_history,
      "seconds": time.perf_counter() - begin, "phase_seconds": phase}


def error_density_curves(cfg: Config, model_cfg, problems: dict, trained: list | None,
                         tick) -> list[dict]:
  """``density_eval.curves`` on the sparse layers' captured attention (``curve_queries``
  positions per instance; the Spotlight sweep only where its heads were trained)."""
  from benchmarks import density_eval
  sparse = [l for l in range(model_cfg.num_layers) if l not in cfg.dense_layers]
  if cfg.curve_queries < 1 or not sparse:
    return []
  sweeps = [s for s in density_eval.SWEEPS if trained is not None or
            density_eval.sweep_method(s, s.values[0]).hash_heads != "trained"]
  heads = {"trained": trained, "untrained": [layer_params(cfg, model_cfg, None, l)
                                             for l in range(model_cfg.num_layers)]}
  return density_eval.curves(problems, heads, dict(sinks=cfg.sinks, local=cfg.local),
                             cfg.epsilon, cfg.delta, cfg.seeds,
                             density_eval.layer_groups(sparse), sweeps, tick)


def summarize(report: dict) -> dict:
  """Per method: density, accuracy per task, median error per layer (all tasks), median
  error per task (all layers but the dense ones), mean IoU and recall of the oracle top-2%
  per layer, vAttention's failure rate per layer."""
  cfg = report["config"]
  num_layers = report["model"]["layers"]
  sparse_layers = [l for l in range(num_layers) if l not in cfg["dense_layers"]]
  out = {}
  for name, per_task in report["measured"].items():
    def cat(field, layers, tasks_=None):
      parts = [per_task[t][l][field] for t in (tasks_ or per_task) for l in layers
               if field in per_task[t][l]]
      return np.concatenate(parts) if parts else None

    row = {"accuracy": report["accuracy"][name],
           "density": float(np.mean(cat("density", sparse_layers))),
           "err_layer": [float(np.median(cat("errors", [l]))) for l in range(num_layers)],
           "err_task": {t: float(np.median(cat("errors", sparse_layers, [t])))
                        for t in per_task}}
    if cat("iou", [0]) is not None:
      row["iou_layer"] = [float(np.mean(cat("iou", [l]))) for l in range(num_layers)]
      row["recall_layer"] = [float(np.mean(cat("recall", [l]))) for l in range(num_layers)]
    if cat("fail", [0]) is not None:
      rates = []
      for l in range(num_layers):
        fail, clip = cat("fail", [l]), cat("clipped", [l])
        kept = fail[~clip]
        rate = float(kept.mean()) if kept.size else float("nan")
        se = math.sqrt(cfg["delta"] * (1 - cfg["delta"]) / max(kept.size, 1))
        rates.append({"rate": rate, "trials": int(kept.size), "clipped": float(clip.mean()),
                      "bound": cfg["delta"] + 3 * se,
                      "ok": bool(kept.size == 0 or rate <= cfg["delta"] + 3 * se)})
      row["vattention_failure"] = rates
    out[name] = row
  return out
