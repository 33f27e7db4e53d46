"""vAttention's (0.05, 0.05) output guarantee on the reference model's real attention, per
layer, for the uniform residual and both hash-code proposals (Spotlight also with a certain
slice of 512 tokens): the default evaluation's
configuration restricted to those rows (``python -m benchmarks eval`` runs the uniform one;
``--full`` all three, with more instances). About 5 minutes on 2 CPU cores.

  python -m benchmarks.eval_vattention_guarantee [report.json]
"""

import argparse
import sys

from benchmarks import estimator_eval as ee
from benchmarks import harness

METHODS = ("dense", "vattention e=d=0.05", "vattention simhash e=d=0.05",
           "vattention spotlight e=d=0.05", "vattention spotlight e=d=0.05 slice=512")


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("json", nargs="?", help="also write the summary as JSON")
  args = parser.parse_args(argv)
  summary = ee.summarize(ee.run(ee.Config(methods=METHODS), progress=False))
  for name, row in summary.items():
    print(name, "density", round(row["density"], 4), "err",
          [round(e, 3) for e in row["err_layer"]], "acc", row["accuracy"], flush=True)
    for layer, f in enumerate(row.get("vattention_failure", [])):
      print("   layer", layer, {k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in f.items()})
  if args.json:
    harness.save_json(summary, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
