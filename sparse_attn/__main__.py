"""``python -m sparse_attn``: the comparison table on built-in synthetic LLM-shaped attention.

Usage::

  python -m sparse_attn                       # default sizes (about a minute on 2 cores)
  python -m sparse_attn --length 65536 --json report.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from sparse_attn import compare


def main(argv: list[str] | None = None) -> int:
  defaults = compare.Config()
  parser = argparse.ArgumentParser(prog="python -m sparse_attn", description=__doc__.split("\n")[0])
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
  for name in ("length", "batch", "kv_heads", "group", "head_dim", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  cfg = dataclasses.replace(
      defaults, length=args.length, batch=args.batch, num_kv_heads=args.kv_heads,
      group=args.group, head_dim=args.head_dim, dtype=args.dtype, repeats=args.repeats,
      seed=args.seed)
  result = compare.run(cfg, log=print)
  print(compare.format_report(result))
  if args.json:
    compare.save_json(result, args.json)
    print(f"\nwrote {args.json}")
  compare.check_finite(result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
