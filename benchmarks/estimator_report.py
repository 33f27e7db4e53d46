"""The evaluation's report: the table, the papers' claims checked, JSON, and the plot."""

from __future__ import annotations

import os

import numpy as np

from benchmarks import harness, methods
from benchmarks.estimator_eval import summarize

SAMPLERS = ("magicpig K=10 L=150", "vattention e=d=0.05")
TOPK = "topk 2% (oracle)"
AGGREGATION = "common_words"


def claims(report: dict, rows: dict) -> list[dict]:
  """The three claims of the issue, each with its numbers and a verdict (None: not run)."""
  out = []
  tasks = report["config"]["tasks"]
  retrieval = [t for t in tasks if t != AGGREGATION]
  if TOPK in rows and AGGREGATION in tasks and retrieval:
    def ratio(name):  # error on aggregation over the mean error on retrieval
      err = rows[name]["err_task"]
      return err[AGGREGATION] / max(np.mean([err[t] for t in retrieval]), 1e-12)

    samplers = [s for s in SAMPLERS if s in rows]
    numbers = {name: {"err_aggregation": rows[name]["err_task"][AGGREGATION],
                      "err_retrieval": float(np.mean([rows[name]["err_task"][t]
                                                      for t in retrieval])),
                      "density": rows[name]["density"], "ratio": ratio(name)}
               for name in [TOPK] + samplers}
    holds = bool(samplers) and all(
        numbers[TOPK]["ratio"] > numbers[s]["ratio"] and
        numbers[TOPK]["err_aggregation"] > numbers[s]["err_aggregation"] for s in samplers)
    out.append({"claim": "top-k degrades on aggregation (common words) while sampling holds",
                "numbers": numbers, "confirmed": holds})
  spotlights = {methods.EVAL[m].hash_heads: m for m in reversed(rows)
                if methods.EVAL[m].family == "spotlight"}  # the first of each
  trained, linear = spotlights.get("trained"), spotlights.get("untrained")
  if trained and linear:
    sparse = [l for l in range(report["model"]["layers"])
              if l not in report["config"]["dense_layers"]]
    t_iou, l_iou = rows[trained]["iou_layer"], rows[linear]["iou_layer"]
    out.append({"claim": "trained Spotlight codes beat a linear hash of the same bits on "
                         "top-2% IoU", "numbers": {"trained": t_iou, "linear": l_iou},
                "confirmed": all(t_iou[l] > l_iou[l] for l in sparse)})
  for vatt in (m for m in rows if methods.EVAL[m].samples):
    per_layer = rows[vatt]["vattention_failure"]
    out.append({"claim": f"{sampler(methods.EVAL[vatt])} meets its (epsilon, delta) on real "
                         "attention",
                "numbers": per_layer, "confirmed": all(r["ok"] for r in per_layer)})
  return out


def sampler(method: methods.Method) -> str:
  """``vattention`` (the uniform residual) or ``vattention <proposal>``."""
  proposal = method.settings.get("proposal", "uniform")
  return "vattention" if proposal == "uniform" else f"vattention {proposal}"


def verdict(flag) -> str:
  return {True: "CONFIRMED", False: "REFUTED", None: "not run"}[flag]


def short_path(path: str) -> str:
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def format_report(report: dict) -> str:
  rows = summarize(report)
  cfg, model = report["config"], report["model"]
  tasks = cfg["tasks"]
  num_layers = model["layers"]
  lines = [
      f"sparse-attn evaluation on {short_path(model['path'])} ({num_layers} layers, "
      f"{model['heads']} query / {model['kv_heads']} KV heads, D = {model['head_dim']}), "
      f"held-out instances of {cfg['length']} bytes; layers {list(cfg['dense_layers'])} "
      f"dense; exact window sinks={cfg['sinks']} local={cfg['local']}; "
      f"{report['seconds']:.0f} s",
      f"accuracy: exact match of the last answer over {cfg['instances']} instances per task, "
      "every byte decoded through the method; err: median ||o_hat - o|| / ||o|| per layer "
      f"over {cfg['attention_instances']} instances x {cfg['queries']} answer positions x "
      "query heads; density: mean over the sparse layers; IoU and recall: of the oracle "
      "top-2% (ceil(0.02 n) tokens of highest exact score), mean over the sparse layers", ""]
  short = {"needle_single": "needle", "needle_multikey": "multikey",
           "variable_tracking": "vt", "common_words": "common", "mqar": "mqar"}
  head = f"{'method':28s} {'density':>7s} " + " ".join(
      f"{short.get(t, t)[:8]:>8s}" for t in tasks) + " " + " ".join(
      f"{'err L' + str(l):>8s}" for l in range(num_layers)) + f" {'IoU':>6s} {'recall':>6s}"
  lines.append(head)
  sparse = [l for l in range(num_layers) if l not in cfg["dense_layers"]]
  for name, row in rows.items():
    iou = (f"{np.mean([row['iou_layer'][l] for l in sparse]):6.3f} "
           f"{np.mean([row['recall_layer'][l] for l in sparse]):6.3f}" if "iou_layer" in row
           else f"{'-':>6s} {'-':>6s}")
    lines.append(f"{name:28s} {row['density']:7.4f} " + " ".join(
        f"{100 * row['accuracy'][t]:7.0f}%" for t in tasks) + " " + " ".join(
        f"{e:8.4f}" for e in row["err_layer"]) + f" {iou}")
  lines += ["", "median error per task (sparse layers):",
            f"{'method':28s} " + " ".join(f"{short.get(t, t)[:8]:>8s}" for t in tasks)]
  for name, row in rows.items():
    lines.append(f"{name:28s} " + " ".join(f"{row['err_task'][t]:8.4f}" for t in tasks))
  lines += ["", "claims:"]
  for c in claims(report, rows):
    lines.append(f"- {c['claim']}: {verdict(c['confirmed'])}")
    if c["claim"].startswith("top-k"):
      for name, n in c["numbers"].items():
        lines.append(f"    {name}: error {n['err_aggregation']:.4f} on common words, "
                     f"{n['err_retrieval']:.4f} on retrieval (x{n['ratio']:.1f}), "
                     f"density {n['density']:.4f}")
    elif c["claim"].startswith("trained"):
      lines.append("    IoU per layer, trained: " + " ".join(
          f"{x:.3f}" for x in c["numbers"]["trained"]) + "; linear: " + " ".join(
          f"{x:.3f}" for x in c["numbers"]["linear"]))
    else:
      for layer, r in enumerate(c["numbers"]):
        lines.append(f"    layer {layer}: failure rate {r['rate']:.4f} over {r['trials']} "
                     f"unclipped draws (bound {r['bound']:.4f}), {100 * r['clipped']:.1f}% "
                     f"clipped: {'ok' if r['ok'] else 'EXCEEDED'}")
  return "\n".join(lines)


def to_json(report: dict) -> dict:
  """The report without per-draw arrays, plus the summary and the claims."""
  rows = summarize(report)
  return {"config": report["config"], "model": report["model"],
          "seconds": report["seconds"], "hash_training": report["hash_training"],
          "methods": rows, "claims": claims(report, rows)}


def save_json(report: dict, path: str) -> None:
  harness.save_json(to_json(report), path)


def plot(report: dict, path: str) -> None:
  """Error against density, one point per (method, sparse layer), log-log."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = summarize(report)
  cfg = report["config"]
  sparse = [l for l in range(report["model"]["layers"]) if l not in cfg["dense_layers"]]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, per_task in report["measured"].items():
    if name == "dense":
      continue
    dens = [np.mean(np.concatenate([per_task[t][l]["density"] for t in per_task]))
            for l in sparse]
    errs = [rows[name]["err_layer"][l] for l in sparse]
    ax.plot(dens, errs, "o-", label=name, alpha=0.8)
    for l, d, e in zip(sparse, dens, errs):
      ax.annotate(f"L{l}", (d, e), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("density (fraction of tokens that entered)")
  ax.set_ylabel("median relative output error")
  ax.set_title(f"{short_path(report['model']['path'])}, {cfg['length']} bytes: error vs density")
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
