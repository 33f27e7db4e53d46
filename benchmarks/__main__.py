"""``python -m benchmarks``: evaluate the estimators on a trained model's attention;
``compare`` them on synthetic attention; ``verify`` vAttention's guarantee; ``bench`` speed.

Usage::

  python -m benchmarks [eval]                # reference model, every estimator (2-3 minutes)
  python -m benchmarks eval --full           # every method and task (about 10 minutes)
  python -m benchmarks eval --model PATH     # a checkpoint folder (bytes or tokenizer.json)
  python -m benchmarks compare               # synthetic comparison table (about 30 s)
  python -m benchmarks compare --length 65536 --json report.json
  python -m benchmarks verify                # coverage experiment (about 1 minute)
  python -m benchmarks verify --predictor simhash --trials 400
  python -m benchmarks verify --proposal simhash  # importance-sampled residual (+ uniform's)
  python -m benchmarks equal-density          # every method at 2% and 5% density (minutes)
  python -m benchmarks bench --lengths 131072 --batches 1 --dtypes float32 --json b.json
  python -m benchmarks bench --devices 8      # sequence-sharded step against one device
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys

from benchmarks import bench, compare, harness, verify


def _positive(parser, args, names):
  for name in names:
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")


def compare_main(argv: list[str]) -> int:
  defaults = compare.Config()
  parser = argparse.ArgumentParser(prog="python -m benchmarks [compare]",
                                   description="The estimators' comparison table.")
  parser.add_argument("--length", type=int, default=defaults.length, help="tokens in the cache")
  parser.add_argument("--batch", type=int, default=defaults.batch)
  parser.add_argument("--kv-heads", type=int, default=defaults.num_kv_heads)
  parser.add_argument("--group", type=int, default=defaults.group, help="query heads per KV head")
  parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
  parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"])
  parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs per method")
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = parser.parse_args(argv)
  _positive(parser, args, ("length", "batch", "kv_heads", "group", "head_dim", "repeats"))
  cfg = dataclasses.replace(
      defaults, length=args.length, batch=args.batch, num_kv_heads=args.kv_heads,
      group=args.group, head_dim=args.head_dim, dtype=args.dtype, repeats=args.repeats,
      seed=args.seed)
  result = compare.run(cfg, log=print)
  print(compare.format_report(result))
  if args.json:
    harness.save_json(result, args.json)
    print(f"\nwrote {args.json}")
  compare.check_finite(result)
  return 0


def eval_main(argv: list[str]) -> int:
  # Imported here: the evaluation loads models (Flax), which the other commands do not need.
  from benchmarks import estimator_eval, estimator_report

  parser = argparse.ArgumentParser(
      prog="python -m benchmarks [eval]",
      description="Every estimator on a trained model's real attention: task accuracy, "
                  "error per layer, IoU with the oracle top-2%%, density; claims checked.")
  parser.add_argument("--full", action="store_true", help="every method and task, more "
                      "instances (about 10 minutes on 2 cores)")
  parser.add_argument("--model", default=estimator_eval.REFERENCE,
                      help="checkpoint folder (config.json + *.safetensors), byte vocabulary")
  parser.add_argument("--instances", type=int, help="held-out instances per task (accuracy)")
  parser.add_argument("--length", type=int, default=None,
                      help="bytes per task instance (default: the model's last training "
                           "length, 1024 for the 1K reference model; longer lengths take "
                           "fewer instances, Config.at_length)")
  parser.add_argument("--tasks", help=f"comma-separated, from {list(estimator_eval.ALL_TASKS)}")
  parser.add_argument("--out", default="eval_results", metavar="DIR",
                      help="folder for report.json and error_vs_density.png")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  default_length, extra_tasks = estimator_eval.evaluation_defaults(args.model)
  length = args.length or default_length
  overrides = {"model": args.model}
  if extra_tasks:  # a long-context reference model: its aggregation tasks too
    base = estimator_eval.FULL_TASKS if args.full else estimator_eval.QUICK_TASKS
    overrides["tasks"] = base + extra_tasks
  if length < 256:
    parser.error("--length must be >= 256 bytes (the tasks' records and questions)")
  if args.instances is not None:
    _positive(parser, args, ("instances",))
    overrides["instances"] = args.instances
  if args.tasks:
    chosen = tuple(t for t in args.tasks.split(",") if t)
    unknown = set(chosen) - set(estimator_eval.ALL_TASKS)
    if unknown or not chosen:
      parser.error(f"unknown --tasks {sorted(unknown)}; choose from "
                   f"{list(estimator_eval.ALL_TASKS)}")
    overrides["tasks"] = chosen
  cfg = estimator_eval.Config.at_length(length, args.full, **overrides)
  report = estimator_eval.run(cfg, progress=not args.no_progress)
  print(estimator_report.format_report(report))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "report.json")
  estimator_report.save_json(report, path)
  print(f"\nwrote {path}")
  if importlib.util.find_spec("matplotlib") is None:
    print("matplotlib is not installed (pip install matplotlib): no plot")
  else:
    path = os.path.join(args.out, "error_vs_density.png")
    estimator_report.plot(report, path)
    print(f"wrote {path}")
  return 0


def verify_main(argv: list[str]) -> int:
  defaults = verify.Config()
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks verify",
      description="vAttention's (epsilon, delta) coverage, per head, from flat to peaked.")
  parser.add_argument("--length", type=int, default=defaults.length)
  parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
  parser.add_argument("--trials", type=int, default=defaults.trials, help="keys per head")
  parser.add_argument("--delta", type=float, default=defaults.delta)
  parser.add_argument("--predictor", default=defaults.predictor, choices=["oracle", "simhash"],
                      help="top-k ranking of the uniform residual")
  parser.add_argument("--proposal", default=defaults.proposal, choices=["uniform", "simhash",
                      "spotlight"], help="residual sampler; not uniform: importance sampling "
                      "from its own codes, with the uniform residual's densities alongside")
  parser.add_argument("--magicpig-tables", default=",".join(map(str, defaults.magicpig_tables)),
                      help="MagicPIG's grid of L (K=10), comma-separated; each head's "
                      "comparison takes the L whose density is nearest vAttention's")
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = parser.parse_args(argv)
  _positive(parser, args, ("length", "head_dim", "trials"))
  try:
    tables = tuple(int(x) for x in args.magicpig_tables.split(","))
  except ValueError:
    tables = ()
  if not tables or min(tables) < 1:
    parser.error(f"--magicpig-tables must be positive ints, comma-separated, got "
                 f"{args.magicpig_tables!r}")
  cfg = dataclasses.replace(defaults, length=args.length, head_dim=args.head_dim,
                            trials=args.trials, delta=args.delta, predictor=args.predictor,
                            proposal=args.proposal, magicpig_tables=tables, seed=args.seed)
  report = verify.run(cfg, log=print)
  print(verify.format_report(report))
  if args.json:
    harness.save_json(report, args.json)
    print(f"\nwrote {args.json}")
  ok = verify.check(report)
  print(f"\nverified: {ok}")
  return 0 if ok else 1


def bench_main(argv: list[str]) -> int:
  defaults = bench.Config()
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks bench",
      description="Decode-step time of each estimator against dense XLA attention.")
  ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
  words = lambda text: tuple(x for x in text.split(",") if x)  # noqa: E731
  parser.add_argument("--lengths", type=ints, help="e.g. 16384,131072 (default: "
                      f"{defaults.lengths}; 131072 with --devices)")
  parser.add_argument("--batches", type=ints, default=defaults.batches, help="e.g. 1,8")
  parser.add_argument("--dtypes", type=words, help="float32,bfloat16 (default: both; the "
                      "first only with --devices, float32 if not given)")
  parser.add_argument("--methods", type=words, default=defaults.methods,
                      help=",".join(bench.Config().methods))
  parser.add_argument("--repeats", type=int, default=defaults.repeats)
  parser.add_argument("--devices", type=int, default=1,
                      help="N > 1: the sequence-sharded step over N devices against one "
                           "(simulated on a CPU), and memory per device")
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = parser.parse_args(argv)
  _positive(parser, args, ("repeats", "devices"))
  if args.devices > 1:
    return bench_sharded_main(args)
  args.lengths = args.lengths or defaults.lengths
  args.dtypes = args.dtypes or defaults.dtypes
  unknown = set(args.methods) - set(defaults.methods)
  if unknown:
    parser.error(f"unknown --methods {sorted(unknown)}; choose from {list(defaults.methods)}")
  bad = set(args.dtypes) - {"float32", "bfloat16", "float16"}
  if bad or min(args.lengths) < 1 or min(args.batches) < 1:
    parser.error("--dtypes must be float32/bfloat16/float16; --lengths and --batches >= 1")
  cfg = dataclasses.replace(defaults, lengths=args.lengths, batches=args.batches,
                            dtypes=args.dtypes, methods=args.methods, repeats=args.repeats)
  report = bench.run(cfg, log=print)
  return _print_and_save(bench.format_report(report), report, args.json)


def bench_sharded_main(args) -> int:
  # N simulated CPU devices where there is no accelerator. Nothing has touched a device
  # yet, so XLA still reads the flag when its backend starts (as for use_cpu_xla_flag).
  if not harness.has_accelerator():
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  from benchmarks import bench_sharded

  cfg = bench_sharded.Config(devices=args.devices, lengths=args.lengths or (131072,),
                             batch=args.batches[0], dtype=(args.dtypes or ("float32",))[0],
                             repeats=args.repeats)
  report = bench_sharded.run(cfg, log=print)
  return _print_and_save(bench_sharded.format_report(report), report, args.json)


def _print_and_save(text: str, report: dict, path: str | None) -> int:
  print(text)
  if path:
    harness.save_json(report, path)
    print(f"\nwrote {path}")
  return 0


def equal_density_main(argv: list[str]) -> int:
  from benchmarks import density_eval

  defaults = density_eval.Config()
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks equal-density",
      description="Relative output error of every method at equal density (2%% and 5%%), "
                  "on the reference model's layers and on LLM-shaped synthetic attention.")
  parser.add_argument("--model", default=defaults.model, help="checkpoint folder")
  parser.add_argument("--seeds", type=int, default=defaults.seeds,
                      help="sampling keys per position for the vAttention variants")
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  _positive(parser, args, ("seeds",))
  report = density_eval.run(dataclasses.replace(defaults, model=args.model, seeds=args.seeds),
                            progress=not args.no_progress)
  return _print_and_save(density_eval.format_report(report), report, args.json)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == "verify":
    return verify_main(argv[1:])
  if argv and argv[0] == "bench":
    return bench_main(argv[1:])
  if argv and argv[0] == "compare":
    return compare_main(argv[1:])
  if argv and argv[0] == "equal-density":
    return equal_density_main(argv[1:])
  if argv and argv[0] == "eval":
    argv = argv[1:]
  return eval_main(argv)


if __name__ == "__main__":
  # Only at process start: once a backend runs, XLA_FLAGS no longer changes it, but it does
  # change the persistent compilation cache's keys (a caller such as the tests would then
  # load executables compiled under other flags).
  harness.use_cpu_xla_flag()
  sys.exit(main())
