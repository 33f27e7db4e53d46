"""``python -m benchmarks verify``, small: vAttention's (epsilon, delta) coverage per head."""

import math

import numpy as np

import sparse_attn as sa
from benchmarks import verify


def test_coverage_small_version_of_the_verify_experiment():
  # The `python -m benchmarks verify` experiment at n = 2048 with 100 keys per head: on every
  # unclipped head, failure rate <= delta + 3 sd. If the true rate were exactly delta, each of
  # the 40 (head, case) checks would false-alarm with probability ~0.2%; the keys are fixed.
  cfg = verify.Config(length=2048, trials=100, magicpig_tables=(75, 150))  # CI time
  report = verify.run(cfg, log=lambda *a, **k: None)
  for r in report["results"]:
    assert np.all(r["passed"]), (r["guarantee"], r["epsilon"], r["failure_rate"], r["bound"])
    assert np.all(np.abs(r["mean_ratio"] - 1) <= 0.01), r["mean_ratio"]
  # Peaked heads need little: the guarantee is not bought by reading everything. The most
  # peaked head reads only the fixed parts: window (4 + 64), top 2% and the base sample's
  # floor of 128 (11.6% of 2048 tokens; the share falls as n grows).
  fixed = (4 + 64 + math.ceil(0.02 * 2048) + 128) / 2048
  assert report["results"][0]["density"][-1] <= fixed + 1e-3
  text = verify.format_report(report)
  assert "guarantee=output epsilon=0.1" in text and "magicpig" in text


def test_importance_needs_fewer_tokens_on_peaked_heads_and_keeps_its_promise():
  # The coverage experiment, small: 4 heads from flat to peaked, 100 keys per head, output
  # guarantee eps = 0.1. On each unclipped head, failures <= delta + 3 sd (false alarm
  # about 0.2% per head if the true rate were delta). Peaked heads read far fewer tokens
  # than the uniform residual (whose top-k 2% and base floor it always pays).
  cfg = verify.Config(length=2048, heads=4, trials=100, cases=(("output", 0.1),),
                      proposal="simhash")
  scales, q, cache = verify.problem(cfg)
  exact = sa.dense_attention(q, cache)
  est = sa.vattention_importance(0.1, cfg.delta, guarantee="output")
  cov = verify.coverage(cfg, est, q, cache, exact, "output", 0.1)
  assert np.all(cov["passed"]), cov
  base = verify.coverage(cfg, sa.vattention(0.1, cfg.delta, guarantee="output"), q, cache,
                         exact, "output", 0.1)
  assert cov["density"][-1] < 0.5 * base["density"][-1], (cov["density"], base["density"])
