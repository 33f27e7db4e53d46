"""The evaluation at length: the blockwise prefill, instance scaling, the error-vs-density
curves and the claims they check."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import density_eval as de
from benchmarks import estimator_eval as ee
from benchmarks import estimator_report as er
from benchmarks.reference import tasks
from benchmarks.task_codec import Codec
from models import checkpoint, decoding


def test_blockwise_prefill_matches_capture():
  """Three rows, two per forward (the last chunk padded): decoding.capture's values."""
  model, model_cfg = checkpoint.load_hf(ee.REFERENCE)
  cfg = ee.Config(length=512, forward_tokens=1024, block=128)
  group = ee.instances(cfg, "needle_single", 3, True, tasks.load_corpus())
  enc = Codec(ee.REFERENCE, model_cfg.vocab_size).encode(group)
  lengths = enc.lengths - np.array([0, 5, 9], np.int32)  # padding is zeroed, as in capture
  got = ee.dense_qkv(model, enc.tokens, lengths, cfg, keep_queries=2)
  want = decoding.capture(model, jnp.asarray(enc.tokens), jnp.asarray(lengths))
  assert len(got) == model_cfg.num_layers
  for (q, k, v), (wq, wk, wv) in zip(got, want):
    assert q.shape[0] == 2 and k.shape[0] == 3
    np.testing.assert_allclose(q, wq[:2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(k, wk, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v, wv, rtol=1e-4, atol=1e-4)


def test_config_at_length_scales_instances():
  assert ee.Config.at_length(1024) == ee.Config()
  long = ee.Config.at_length(16384)
  assert (long.length, long.instances, long.attention_instances) == (16384, 4, 2)
  assert (long.queries, long.curve_queries, long.hash_instances, long.hash_tokens) == (
      2, 1, 1, 4096)
  full = ee.Config.at_length(16384, full=True, tasks=("mqar",))
  assert (full.instances, full.attention_instances, full.tasks) == (16, 4, ("mqar",))
  assert ee.evaluation_defaults(ee.REFERENCE) == (1024, ())


def test_layer_groups():
  assert de.layer_groups([1, 2, 3]) == [[1], [2], [3]]
  assert de.layer_groups([1, 2, 3, 4, 5]) == [[1, 2], [3, 4], [5]]
  assert de.layer_groups([1, 2], groups=3) == [[1], [2]]


def test_curves_sweep_each_knob():
  """Top-k's density follows its fraction (window of 8 + ceil(f n)), MagicPIG's grows with
  its tables, one finite point per value and layer group (every sweep: the slow CLI test)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  n = 512
  q = jax.random.normal(keys[0], (1, 4, 32))
  cache = ee.sa.KVCache(jax.random.normal(keys[1], (1, 2, n, 32)),
                        jax.random.normal(keys[2], (1, 2, n, 32)), jnp.array([n], jnp.int32))
  exact = ee.sa.dense_attention(q, cache).out
  problems = {0: [(q, cache, exact)], 1: [(q, cache, exact)]}
  sweeps = [de.Sweep("topk 2% (oracle)", "fraction", (0.02, 0.1)),
            de.Sweep("magicpig K=10 L=150", "L", (50, 150))]
  lines = de.curves(problems, {}, dict(sinks=4, local=4), 0.05, 0.05, 1, [[0], [1]], sweeps)
  assert [(l["method"], l["layers"]) for l in lines] == [
      (s.method, g) for s in sweeps for g in ([0], [1])]
  for line, sweep in zip(lines, [s for s in sweeps for _ in range(2)]):
    assert [p["value"] for p in line["points"]] == list(sweep.values)
    assert all(np.isfinite(p["error"]) and 0 < p["density"] <= 1 for p in line["points"])
  topk = lines[0]
  for p in topk["points"]:
    k = int(np.ceil(p["value"] * n))  # sa.topk(fraction=f): ceil(f n) beyond the window
    assert abs(p["density"] - (8 + k) / n) <= 2 / n, p
  assert topk["points"][1]["error"] < topk["points"][0]["error"]
  pig = lines[2]
  assert pig["points"][0]["density"] < pig["points"][1]["density"]  # 50 < 150 tables
  assert de.interpolated_error(topk, 1e-6) is None
  low = topk["points"][0]
  assert de.interpolated_error(topk, low["density"]) == pytest.approx(low["error"])


def test_accuracy_and_magicpig_claims():
  rows = {"dense": {"accuracy": {"needle_single": 1.0, "frequent_word": 0.9}},
          "topk 2% (oracle)": {"accuracy": {"needle_single": 1.0, "frequent_word": 0.5}},
          "magicpig K=10 L=150": {"accuracy": {"needle_single": 1.0, "frequent_word": 0.8}}}
  claim = er.accuracy_claim(rows, ["frequent_word"], ["needle_single"],
                            ["magicpig K=10 L=150"])
  assert claim["confirmed"] is True
  assert claim["numbers"]["topk 2% (oracle)"]["drop_aggregation"] == pytest.approx(0.4)
  rows["dense"]["accuracy"]["frequent_word"] = 0.5
  claim = er.accuracy_claim(rows, ["frequent_word"], ["needle_single"],
                            ["magicpig K=10 L=150"])
  assert claim["confirmed"] is None and "below 60%" in claim["reason"]
  assert er.verdict(None) == "NOT TESTABLE"

  def line(method, points):
    return {"method": method, "knob": "x", "layers": [1],
            "points": [{"value": v, "density": d, "error": e} for v, d, e in points]}

  topk = line("topk 2% (oracle)", [(0.01, 0.01, 0.4), (0.1, 0.1, 0.1)])
  for pig_err, want in ((0.15, True), (0.3, False)):
    pig = line("magicpig K=10 L=150", [(150, 0.05, pig_err), (300, 0.5, 0.01)])
    claim = er.magicpig_claim([topk, pig])
    assert claim["confirmed"] is want
    # top-k at 5%: log-log between (1%, 0.4) and (10%, 0.1)
    assert claim["numbers"][0]["topk"] == pytest.approx(0.4 * (0.1 / 0.4) ** (np.log(5) /
                                                                             np.log(10)))
    assert claim["numbers"][1]["topk"] is None  # outside top-k's range: not compared


@pytest.mark.slow
def test_eval_past_the_training_length(tmp_path):
  """The 1K reference model at 2048 bytes (past its training length) through the CLI: the
  report, the curves in the JSON and the PNG."""
  from benchmarks.__main__ import main
  assert main(["eval", "--length", "2048", "--tasks", "needle_single,frequent_word",
               "--instances", "2", "--no-progress", "--out", str(tmp_path)]) == 0
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["config"]["length"] == 2048 and saved["config"]["attention_instances"] == 2
  assert {c["method"] for c in saved["curves"]} == {s.method for s in de.SWEEPS}
  assert any(c["claim"].startswith("MagicPIG") for c in saved["claims"])
  assert (tmp_path / "error_vs_density.png").read_bytes()[:4] == b"\x89PNG"
