"""Where a decode step's time goes on a GPU, predicted from its lowered module on a CPU.

Each method's step (``append`` of one token, then ``attend``) is lowered for ``cuda`` with
``jax.export`` inside ``backend.target("gpu")`` with the kernels on (``SPARSE_ATTN_PALLAS=1``)
at the device's shapes (``ShapeDtypeStruct``s: nothing of 128K tokens is allocated), and its
StableHLO is counted:

* ``large_ops``: ops with an operand or a result of at least ``B x Hkv x S / 8`` elements
  (a full-S array, or the split policy's candidates x base tokens), by op name. Elementwise
  ones fuse; the others are each a pass of their own (``passes``): reductions, sorts and
  ``top_k``, scatters, gathers from a large operand (bytes: the gathered entries only),
  ``reduce_window``, custom calls (Pallas kernels; the cache operands of the kernels that
  read rows by index not counted) and loops that carry large arrays.
* ``sorts``, ``top_k``, ``custom_calls`` (the Pallas kernels, by name), ``while`` loops.
* ``pass_bytes``: the bytes the passes move: the large operands and results of each pass
  op (elementwise producers fused into their consumer, as XLA:GPU does; a counted loop's
  body times its trips, a loop that tests its data once, per trip). At 4 TB/s, 134 MB (one
  float32 ``[8, 8, 4, 128K]``) is about 35 us.

Ops of functions called more than once count once per call. Of each ``lax.cond`` one branch
counts: the cheaper one (in these steps every cond guards a fallback, which costs more: a
bucket overflow's scan, a list of every token); ``pass_us_at_4tbps_dearer_branches`` takes
the dearer ones instead. The counts are a proxy, not a
timing: XLA's fusion (sibling reductions merged, producers duplicated) moves them both
ways, and launch latency (about 5 us per kernel) is in ``passes``.

  python -m benchmarks.step_anatomy --json benchmarks/results/step_anatomy.json
  python -m benchmarks.step_anatomy --small                    # CPU smoke test
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
from jax import export

import sparse_attn as sa
from pallas_kernels import backend

KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128  # Llama-3.1-8B layer shapes
TRITON_CALL = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
PASS_OPS = ("reduce", "sort", "top_k", "scatter", "gather", "reduce_window", "custom_call",
            "while", "cumsum", "dynamic_update_slice")
_BYTES = {"f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2, "i16": 2, "ui16": 2, "i8": 1,
          "ui8": 1, "i1": 1, "f64": 8, "i64": 8, "ui64": 8}
_TENSOR = re.compile(r"tensor<([0-9x]*)([a-z]+[0-9]+)>")
_OP = re.compile(r"(?:stablehlo|chlo)\.([a-z_]+)|\"?(chlo\.top_k)")


def methods() -> dict:
  """name -> a function making the estimator (the GPU benchmark's configurations)."""
  return {
      "dense": sa.dense,
      "spotlight": lambda: sa.spotlight(sa.hash_heads.init_params(
          jax.random.PRNGKey(0), KV_HEADS, HEAD_DIM), fraction=0.02),
      "topk_simhash": lambda: sa.topk(fraction=0.02, predictor=sa.predictors.simhash()),
      "magicpig": sa.magicpig,
      "vattention_simhash": lambda: sa.vattention_importance(0.05, 0.05, guarantee="output"),
  }


def lowered_step(est: sa.Estimator, batch: int, length: int) -> str:
  """The StableHLO text of ``append`` + ``attend`` lowered for ``cuda`` with the kernels."""
  sds = jax.ShapeDtypeStruct
  kv = sds((batch, KV_HEADS, length, HEAD_DIM), jnp.bfloat16)
  cache = sa.KVCache(kv, kv, sds((batch,), jnp.int32))
  q = sds((batch, KV_HEADS * GROUP, HEAD_DIM), jnp.bfloat16)

  def step(q, cache, index, key):
    return est.attend(q, cache, est.append(index, cache), key).out

  before = os.environ.get("SPARSE_ATTN_PALLAS")
  os.environ["SPARSE_ATTN_PALLAS"] = "1"
  try:
    with backend.target("gpu"):
      index = jax.eval_shape(est.init, cache, jax.random.PRNGKey(1))
      exported = export.export(jax.jit(step), platforms=["cuda"],
                               disabled_checks=[TRITON_CALL])(q, cache, index,
                                                              jax.random.PRNGKey(2))
  finally:
    if before is None:
      os.environ.pop("SPARSE_ATTN_PALLAS")
    else:
      os.environ["SPARSE_ATTN_PALLAS"] = before
  return exported.mlir_module()


def _tensors(line: str) -> list[tuple[int, int]]:
  """``(elements, bytes)`` of every tensor type on an op's line."""
  out = []
  for dims, dtype in _TENSOR.findall(line):
    n = math.prod(int(d) for d in dims.split("x") if d) if dims else 1
    out.append((n, n * _BYTES.get(dtype, 4)))
  return out


def _i32_constants(lines: list[str]) -> dict[str, int]:
  """``{name: value}`` of the scalar int32 constants defined on ``lines``."""
  found = (re.search(r"(%c[\w]*) = stablehlo.constant dense<(\d+)> : tensor<i32>", x)
           for x in lines)
  return {m.group(1): int(m.group(2)) for m in found if m}


def _loop_multipliers(lines: list[str]) -> list[int]:
  """Per line of a function body, the product of the trip counts of the loops around it: a
  ``while`` whose condition compares its counter with a constant (``fori_loop``, or a
  static bound such as the selection's bisection) runs at most that many times."""
  consts = _i32_constants(lines)
  out, stack, depth, pending = [], [], 0, None
  for i, line in enumerate(lines):
    mult = math.prod(t for _, t in stack)
    out.append(mult)
    if "stablehlo.while" in line:
      cond = []
      for c in lines[i + 1:i + 40]:
        if "} do {" in c:
          break
        cond.append(c)
      m = re.search(r"compare\s+LT, %iterArg\w*, (%c\w*)", "\n".join(cond))
      local = {**consts, **_i32_constants(cond)}  # a name may be reused in the region
      # Only a plain counted loop: one compare and constants, nothing else (a loop that also
      # tests its data, like the selection's bisection, is counted once: per trip).
      ops = [c for c in cond if "stablehlo." in c and not re.search(
          r"stablehlo\.(constant|return)", c)]
      counted = m and m.group(1) in local and len(ops) == 1
      pending = local[m.group(1)] if counted else 1
    opened, closed = line.count("{"), line.count("}")
    if "} do {" in line.strip() and pending is not None:
      depth -= 1
      stack.append((depth, pending))
      depth += 1
      pending = None
      continue
    depth += opened - closed
    while stack and depth <= stack[-1][0]:
      stack.pop()
  return out


def _line_cost(line: str, full: int, skip_cache_operands) -> collections.Counter:
  """One op's counts (the module docstring's), for one execution."""
  cost = collections.Counter()
  op = _OP.search(line)
  if not op or "=" not in line[:op.start()]:
    return cost
  kind = op.group(1) or "top_k"
  if kind == "composite":
    kind = "top_k" if "top_k" in line else "composite"
  sizes = _tensors(line)
  if kind == "custom_call":
    called = re.search(r'name = "(\w+)"', line)
    kernel = called.group(1) if called else "?"
    cost[("kernel", kernel)] += 1
    if kernel in skip_cache_operands:  # the cache is an operand, read by index
      sizes = [(n, b) for n, b in sizes if n < full * HEAD_DIM]
  if kind in ("sort", "top_k", "while", "custom_call"):
    cost[("total", kind)] += 1
  large = max(1, full // 8)
  if not sizes or max(n for n, _ in sizes) < large:
    return cost
  cost[("ops", kind)] += 1
  if kind in PASS_OPS:
    cost[("passes", kind)] += 1
    if kind == "gather":  # reads the gathered entries only
      moved = sum(b for n, b in sizes if n < large)
    elif kind == "while":  # its body's ops are counted themselves
      moved = 0
    else:
      moved = sum(b for n, b in sizes if n >= large)
    cost["pass_bytes"] += moved
  return cost


def _times(cost: collections.Counter, k: int) -> collections.Counter:
  return collections.Counter({key: v * k for key, v in cost.items()})


def _function_cost(lines: list[str], mults: list[int], callee_cost, line_cost, pick):
  """One call's counts: each line's times its loops' trips, a call's its callee's, and of
  each ``stablehlo.case`` (``lax.cond``, ``lax.switch``) one branch, the one ``pick``
  (``min`` or ``max``) chooses by bytes moved: one branch runs, not all."""
  root = collections.Counter()
  cases = []  # open cases, innermost last: (depth outside, [branch counts])
  depth = 0
  for line, m in zip(lines, mults):
    before = depth
    depth += line.count("{") - line.count("}")
    stripped = line.strip()
    if cases and before == cases[-1][0] + 1 and stripped.startswith("}, {"):
      cases[-1][1].append(collections.Counter())
      continue
    if cases and depth == cases[-1][0] and stripped.startswith("})"):
      _, branches = cases.pop()
      (cases[-1][1][-1] if cases else root).update(
          pick(branches, key=lambda c: c["pass_bytes"]))
      continue
    here = cases[-1][1][-1] if cases else root
    cost = line_cost(line)
    for callee in re.findall(r"call @([\w.$-]+)", line):
      cost.update(callee_cost(callee))
    here.update(_times(cost, m))
    if '"stablehlo.case"' in line and line.rstrip().endswith("({"):
      cases.append((before, [collections.Counter()]))
  return root


def anatomy(module: str, full: int, skip_cache_operands=("sparse_decode_attention",)) -> dict:
  """The counts of the module docstring; ``full``: the elements of one full-S array. The
  kernels in ``skip_cache_operands`` read only listed rows of their cache operands."""
  bodies, name = collections.defaultdict(list), None
  for line in module.splitlines():
    header = re.match(r"\s*func\.func (?:public|private) @([\w.$-]+)", line)
    if header:
      name = header.group(1)
    elif name:
      bodies[name].append(line)
  costs = {}

  def cost(fn, pick):  # memoized; a jitted module has no recursion
    if (fn, pick) not in costs:
      costs[fn, pick] = collections.Counter() if fn.endswith(".impl") or fn not in bodies else (
          _function_cost(bodies[fn], _loop_multipliers(bodies[fn]),
                         lambda callee: cost(callee, pick),
                         lambda line: _line_cost(line, full, skip_cache_operands), pick))
    return costs[fn, pick]

  total, worst = cost("main", min), cost("main", max)
  part = lambda tag: collections.Counter(  # noqa: E731
      {k[1]: v for k, v in total.items() if isinstance(k, tuple) and k[0] == tag and v})
  ops, passes = part("ops"), part("passes")
  return {"large_ops": sum(ops.values()), "large_ops_by_kind": dict(ops.most_common()),
          "passes": sum(passes.values()), "passes_by_kind": dict(passes.most_common()),
          "pass_bytes": total["pass_bytes"],
          "pass_us_at_4tbps": round(total["pass_bytes"] / 4e12 * 1e6, 1),
          "pass_us_at_4tbps_dearer_branches": round(worst["pass_bytes"] / 4e12 * 1e6, 1),
          "sorts": total[("total", "sort")], "top_k": total[("total", "top_k")],
          "while_loops": total[("total", "while")], "custom_calls": dict(part("kernel"))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", metavar="PATH")
  parser.add_argument("--small", action="store_true", help="CPU smoke test at small sizes")
  parser.add_argument("--methods", default=",".join(methods()))
  parser.add_argument("--configs", default="131072x1,131072x8", help="LENGTHxBATCH,...")
  parser.add_argument("--label", default="", help="a name for this tree (before/after)")
  args = parser.parse_args(argv)
  if args.small:
    args.configs = "4096x2"
  configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
  report = {"jax": jax.__version__, "label": args.label, "rows": []}
  for length, batch in configs:
    for name in args.methods.split(","):
      try:
        row = anatomy(lowered_step(methods()[name](), batch, length),
                      batch * KV_HEADS * length)
      except Exception as err:  # noqa: BLE001 - one method failing must not end the run
        row = {"failed": f"{type(err).__name__}: {str(err)[:300]}"}
      row = {"method": name, "length": length, "batch": batch, **row}
      report["rows"].append(row)
      print(json.dumps(row), flush=True)
      if args.json:
        with open(args.json, "w") as f:
          json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
