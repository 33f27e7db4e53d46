"""The equal-density experiment (``python -m benchmarks equal-density``), on a tiny config."""

import numpy as np

from benchmarks import density_eval as de

TINY = de.Config(densities=(0.05,), seeds=1, magicpig_tables=(10, 80), layers=(3,),
                 tasks=("needle_single",),
                 instances=1, queries=1, hash_steps=3, synthetic_length=2048,
                 synthetic_scales=(0.5,))


def test_tiny_run_table_and_claim():
  report = de.run(TINY, progress=False)
  cells = report["cells"]
  assert len(cells) == 1 + 1  # one layer, one synthetic scale, one density
  for c in cells:
    for name in de.BASELINES + de.PROPOSALS:
      m = c["methods"][name]
      assert np.isfinite(m["error"]) and m["error"] >= 0
    # Equal density: every method that sets its size lands near 5% (window of 8 included).
    for name in ("topk (oracle)", "vattention uniform", "vattention simhash"):
      assert abs(c["methods"][name]["density"] - 0.05) <= 0.01, (name, c["methods"][name])
  for name, w in report["wins"].items():
    best = [min(c["methods"][b]["error"] for b in de.BASELINES) for c in cells]
    errors = [c["methods"][name]["error"] for c in cells]
    strict = sum(e <= b for e, b in zip(errors, best))
    floored = sum(e <= b or e <= de.RESOLUTION for e, b in zip(errors, best))
    assert (w["no_worse_strict"], w["no_worse"], w["cells"]) == (strict, floored, len(cells))
  text = de.format_report(report)
  assert de.no_worse(7e-4, 1e-7) and not de.no_worse(7e-4, 1e-7, floor=0.0)
  assert not de.no_worse(2e-3, 1e-3) and de.no_worse(1e-3, 2e-3)
  assert "layer 3" in text and "query scale 0.5" in text and "the claim asks 80%" in text
