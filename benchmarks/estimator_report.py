"""The evaluation's report: the table, the papers' claims checked, JSON, and the plot."""

from __future__ import annotations

import os

import numpy as np

from benchmarks import density_eval, harness, methods
from benchmarks.estimator_eval import summarize
from benchmarks.reference.tasks import AGGREGATION

SAMPLERS = ("magicpig K=10 L=150", "vattention e=d=0.05")
TOPK = "topk 2% (oracle)"
MAGICPIG = "magicpig K=10 L=150"
LEARNED = 0.6  # dense accuracy from which a task's accuracy can test a claim


def claims(report: dict, rows: dict) -> list[dict]:
  """The papers' claims, each with its numbers and a verdict: True (confirmed), False
  (refuted) or None (not testable on this model, with the reason)."""
  out = []
  tasks = report["config"]["tasks"]
  aggregation = [t for t in tasks if t in AGGREGATION]
  retrieval = [t for t in tasks if t not in AGGREGATION]
  if TOPK in rows and aggregation and retrieval:
    def mean_err(name, group):
      return float(np.mean([rows[name]["err_task"][t] for t in group]))

    def ratio(name):  # error on aggregation over the mean error on retrieval
      return mean_err(name, aggregation) / max(mean_err(name, retrieval), 1e-12)

    samplers = [s for s in SAMPLERS if s in rows]
    numbers = {name: {"err_aggregation": mean_err(name, aggregation),
                      "err_retrieval": mean_err(name, retrieval),
                      "density": rows[name]["density"], "ratio": ratio(name)}
               for name in [TOPK] + samplers}
    holds = bool(samplers) and all(
        numbers[TOPK]["ratio"] > numbers[s]["ratio"] and
        numbers[TOPK]["err_aggregation"] > numbers[s]["err_aggregation"] for s in samplers)
    out.append({"claim": f"top-k degrades on aggregation ({', '.join(aggregation)}) while "
                         "sampling holds (attention error)",
                "numbers": numbers, "confirmed": holds})
    if "dense" in rows and all("accuracy" in rows[n] for n in [TOPK] + samplers):
      out.append(accuracy_claim(rows, aggregation, retrieval, samplers))
  spotlights = {methods.EVAL[m].hash_heads: m for m in reversed(rows)
                if methods.EVAL[m].family == "spotlight"}  # the first of each
  trained, linear = spotlights.get("trained"), spotlights.get("untrained")
  if trained and linear:
    sparse = [l for l in range(report["model"]["layers"])
              if l not in report["config"]["dense_layers"]]
    t_iou, l_iou = rows[trained]["iou_layer"], rows[linear]["iou_layer"]
    numbers = {"trained": t_iou, "linear": l_iou}
    if "accuracy" in rows[trained] and "accuracy" in rows[linear]:
      numbers["accuracy_trained"] = rows[trained]["accuracy"]
      numbers["accuracy_linear"] = rows[linear]["accuracy"]
    out.append({"claim": "trained Spotlight codes beat a linear hash of the same bits on "
                         "top-2% IoU", "numbers": numbers,
                "confirmed": all(t_iou[l] > l_iou[l] for l in sparse)})
  for vatt in (m for m in rows if methods.EVAL[m].samples):
    per_layer = rows[vatt]["vattention_failure"]
    out.append({"claim": f"{sampler(methods.EVAL[vatt])} meets its (epsilon, delta) on real "
                         "attention",
                "numbers": per_layer, "confirmed": all(r["ok"] for r in per_layer)})
  if report.get("curves"):
    claim = magicpig_claim(report["curves"])
    if claim:
      out.append(claim)
  return out


def accuracy_claim(rows: dict, aggregation: list, retrieval: list, samplers: list) -> dict:
  """MagicPIG's claim in accuracy: on the aggregation tasks the model solves densely (at
  least ``LEARNED``), top-k loses more accuracy than each sampler and than it loses on
  retrieval. Not testable when no aggregation task is solved densely."""
  dense = rows["dense"]["accuracy"]
  learned = [t for t in aggregation if dense[t] >= LEARNED]
  claim = "top-k loses accuracy on aggregation while sampling holds (tasks the model solves)"
  drop = lambda name, group: float(np.mean([dense[t] - rows[name]["accuracy"][t]  # noqa: E731
                                            for t in group]))
  numbers = {"dense_accuracy": {t: dense[t] for t in aggregation + retrieval}}
  if not learned:
    return {"claim": claim, "numbers": numbers, "confirmed": None,
            "reason": f"dense accuracy below {LEARNED:.0%} on every aggregation task"}
  for name in [TOPK] + samplers:
    numbers[name] = {"drop_aggregation": drop(name, learned),
                     "drop_retrieval": drop(name, retrieval)}
  top = numbers[TOPK]
  holds = bool(samplers) and top["drop_aggregation"] > top["drop_retrieval"] and all(
      top["drop_aggregation"] > numbers[s]["drop_aggregation"] for s in samplers)
  return {"claim": claim, "numbers": numbers, "confirmed": holds}


def magicpig_claim(curves: list[dict]) -> dict | None:
  """MagicPIG against the oracle top-k at equal density: per layer group and table count
  ``L``, MagicPIG's error against the top-k curve's (log-log interpolated) at MagicPIG's
  density; confirmed when MagicPIG's is no larger at the default ``L = 150`` in every
  group. Points outside the top-k curve's density range are not compared."""
  topk = {tuple(c["layers"]): c for c in curves if c["method"] == TOPK}
  pig = [c for c in curves if c["method"] == MAGICPIG]
  if not topk or not pig:
    return None
  numbers, default = [], []
  for line in pig:
    for p in line["points"]:
      ref = density_eval.interpolated_error(topk[tuple(line["layers"])], p["density"])
      numbers.append({"layers": line["layers"], "L": p["value"], "density": p["density"],
                      "magicpig": p["error"], "topk": ref})
      if p["value"] == 150 and ref is not None:
        default.append(p["error"] <= ref)
  return {"claim": "MagicPIG's error is no larger than the oracle top-k's at equal density",
          "numbers": numbers, "confirmed": all(default) if default else None,
          **({} if default else {"reason": "top-k's curve does not reach MagicPIG's density"})}


def sampler(method: methods.Method) -> str:
  """``vattention`` (the uniform residual) or ``vattention <proposal>``."""
  proposal = method.settings.get("proposal", "uniform")
  return "vattention" if proposal == "uniform" else f"vattention {proposal}"


def verdict(flag) -> str:
  return {True: "CONFIRMED", False: "REFUTED", None: "NOT TESTABLE"}[flag]


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
    lines.append(f"- {c['claim']}: {verdict(c['confirmed'])}"
                 + (f" ({c['reason']})" if c.get("reason") else ""))
    if c["claim"].startswith("top-k loses"):
      for name, n in c["numbers"].items():
        if name == "dense_accuracy":
          lines.append("    dense accuracy: " + ", ".join(
              f"{t} {100 * a:.0f}%" for t, a in n.items()))
        else:
          lines.append(f"    {name}: accuracy drop {100 * n['drop_aggregation']:.0f} points "
                       f"on aggregation, {100 * n['drop_retrieval']:.0f} on retrieval")
    elif c["claim"].startswith("MagicPIG"):
      for n in c["numbers"]:
        ref = "-" if n["topk"] is None else f"{n['topk']:.4f}"
        lines.append(f"    layers {n['layers']}, L={n['L']}: density {n['density']:.4f}, "
                     f"error {n['magicpig']:.4f} against top-k {ref}")
    elif c["claim"].startswith("top-k"):
      for name, n in c["numbers"].items():
        lines.append(f"    {name}: error {n['err_aggregation']:.4f} on aggregation, "
                     f"{n['err_retrieval']:.4f} on retrieval (x{n['ratio']:.1f}), "
                     f"density {n['density']:.4f}")
    elif c["claim"].startswith("trained"):
      lines.append("    IoU per layer, trained: " + " ".join(
          f"{x:.3f}" for x in c["numbers"]["trained"]) + "; linear: " + " ".join(
          f"{x:.3f}" for x in c["numbers"]["linear"]))
      if "accuracy_trained" in c["numbers"]:
        lines.append("    accuracy, trained: " + ", ".join(
            f"{t} {100 * a:.0f}%" for t, a in c["numbers"]["accuracy_trained"].items())
            + "; linear: " + ", ".join(
            f"{t} {100 * a:.0f}%" for t, a in c["numbers"]["accuracy_linear"].items()))
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
          "phase_seconds": report.get("phase_seconds"), "curves": report.get("curves", []),
          "methods": rows, "claims": claims(report, rows)}


def save_json(report: dict, path: str) -> None:
  harness.save_json(to_json(report), path)


def plot(report: dict, path: str) -> None:
  """Error against density, log-log, one panel per layer group: each method's sweep over
  its knob as a line (``report["curves"]``), the table's methods as points (mean density
  and median error over the group's layers)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = summarize(report)
  cfg = report["config"]
  sparse = [l for l in range(report["model"]["layers"]) if l not in cfg["dense_layers"]]
  curves = report.get("curves") or []
  groups = ([c["layers"] for c in curves if c["method"] == curves[0]["method"]] if curves
            else [[l] for l in sparse])
  fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups) + 1.5, 4.2),
                           squeeze=False, sharey=True)
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  names = sorted({c["method"] for c in curves} | set(report["measured"]) - {"dense"})
  color = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
  for ax, group in zip(axes[0], groups):
    for c in (c for c in curves if c["layers"] == group):
      ax.plot([p["density"] for p in c["points"]], [p["error"] for p in c["points"]], "-",
              color=color[c["method"]], alpha=0.8, label=f"{c['method']}: {c['knob']}")
      for p in c["points"]:
        ax.annotate(f"{p['value']:g}", (p["density"], p["error"]), fontsize=6,
                    xytext=(2, 2), textcoords="offset points", color=color[c["method"]])
    for name, per_task in report["measured"].items():
      if name == "dense":
        continue
      dens = np.mean(np.concatenate([per_task[t][l]["density"] for t in per_task
                                     for l in group]))
      err = np.median([rows[name]["err_layer"][l] for l in group])
      ax.plot([dens], [err], "o", color=color[name], label=name, alpha=0.9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density (fraction of tokens that entered)")
    ax.set_title(f"layers {group[0]}-{group[-1]}" if len(group) > 1 else f"layer {group[0]}")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("median relative output error")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=6, loc="center right")
  fig.suptitle(f"{short_path(report['model']['path'])}, {cfg['length']} bytes: error vs "
               "density", fontsize=9)
  fig.tight_layout(rect=(0, 0, 0.8, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)
