"""python -m benchmarks compare runs end to end at a small size."""

import json

import pytest

from benchmarks import __main__ as cli


def test_main_job_prints_the_table_and_writes_json(tmp_path, capsys):
  path = tmp_path / "report.json"
  assert cli.main(["compare", "--length", "1024", "--batch", "1", "--head-dim", "32",
                   "--repeats", "1", "--json", str(path)]) == 0
  out = capsys.readouterr().out
  for name in ("dense", "streaming", "magicpig K=10 L=150", "magicpig K=8 L=75",
               "uniform (same density)", "topk (same density)", "topk simhash", "topp",
               "vattention denominator", "vattention output", "spotlight (trained)",
               "linear hash (same bits, untrained)", "temperature sweep"):
    assert name in out
  report = json.loads(path.read_text())
  assert report["methods"]["dense"]["err_median"] < 1e-6
  assert set(report["hash_top2_iou"]) == {"trained", "untrained"}
  assert len(report["sweep"]) == 10
  for entry in report["sweep"]:  # matched densities really are matched
    d = entry["magicpig"]["density"]
    assert abs(entry["uniform"]["density"] - d) < 0.3 * d + 0.01
    assert abs(entry["topk"]["density"] - d) < 0.02


def test_verify_subcommand_prints_per_head_tables_and_json(tmp_path, capsys):
  path = tmp_path / "verify.json"
  code = cli.main(["verify", "--length", "1024", "--trials", "30", "--magicpig-tables",
                   "75,150", "--json", str(path)])  # a short grid of L: compiles in CI time
  out = capsys.readouterr().out
  assert code in (0, 1) and "verified:" in out
  assert out.count("guarantee=") == 5 and "fail rate" in out
  report = json.loads(path.read_text())
  assert [r["guarantee"] for r in report["results"]] == [
      "denominator", "numerator", "numerator", "output", "output"]
  assert len(report["results"][0]["failure_rate"]) == 8
  assert {row["magicpig_L"] for row in report["comparison"]} <= {75, 150}
  with pytest.raises(SystemExit):
    cli.main(["verify", "--magicpig-tables", "75,x"])
  assert "--magicpig-tables must be positive ints" in capsys.readouterr().err


def test_bench_subcommand_times_every_method_against_dense(tmp_path, capsys):
  path = tmp_path / "bench.json"
  assert cli.main(["bench", "--lengths", "512", "--batches", "1", "--dtypes", "float32",
                   "--repeats", "1", "--json", str(path)]) == 0
  out = capsys.readouterr().out
  assert "dense (XLA)" in out and "magicpig" in out and "spotlight" in out
  report = json.loads(path.read_text())
  row = report["rows"][0]
  assert max(row["speedup_vs_dense"]["dense (XLA)"], row["speedup_vs_dense"]["dense_attention"]) \
      == 1.0
  assert set(row["step_ms"]) == {"dense (XLA)", "dense_attention", "magicpig", "spotlight",
                                 "topk_simhash", "vattention", "vattention_simhash",
                                 "vattention_spotlight", "streaming"}
