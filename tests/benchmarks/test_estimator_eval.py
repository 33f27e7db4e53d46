"""``python -m benchmarks eval``: its probes against numpy, and a tiny end-to-end run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from benchmarks import estimator_eval as ee
from benchmarks import estimator_report as er
from benchmarks import task_codec
from benchmarks.reference import evaluation, tasks
from benchmarks.__main__ import main
from tests.models import fixtures


def small_problem(lengths=(100, 61), dim=16):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (2, 4, dim))
  k = jax.random.normal(keys[1], (2, 2, 100, dim))
  v = jax.random.normal(keys[2], (2, 2, 100, dim))
  return q, sa.KVCache(k, v, jnp.asarray(lengths, jnp.int32))


def test_entered_reads_off_streaming_and_dense_token_sets():
  q, cache = small_problem()
  key = jax.random.PRNGKey(1)
  positions = np.arange(100)
  for est, want in ((sa.streaming(sinks=4, local=8),
                     lambda n: (positions < 4) | ((positions >= n - 8) & (positions < n))),
                    (sa.dense(), lambda n: positions < n)):
    got = np.asarray(ee.entered(est, q, cache, est.init(cache, key), key))
    for b, n in enumerate((100, 61)):
      for h in range(4):
        np.testing.assert_array_equal(got[b, h], want(n))


def test_entered_topk_holds_window_plus_k():
  q, cache = small_problem()
  est = sa.topk(k=5, sinks=4, local=8)
  key = jax.random.PRNGKey(1)
  got = np.asarray(ee.entered(est, q, cache, est.init(cache, key), key))
  assert got.sum(-1).tolist() == [[17] * 4] * 2
  assert got[:, :, :4].all() and got[0, :, 92:].all() and got[1, :, 53:61].all()
  assert not got[1, :, 61:].any()


def test_oracle_top_matches_numpy_float64():
  q, cache = small_problem()
  got = np.asarray(ee.oracle_top(q, cache))
  qn, kn = np.asarray(q, np.float64), np.asarray(cache.keys, np.float64)
  for b, n in enumerate((100, 61)):
    for h in range(4):
      scores = kn[b, h // 2, :n] @ qn[b, h]
      want = np.zeros(100, bool)
      want[np.argsort(-scores)[:math.ceil(0.02 * n)]] = True
      np.testing.assert_array_equal(got[b, h], want)


def test_iou():
  a = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
  b = np.array([[0, 1, 1, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_allclose(ee.iou(a, b), [1 / 3, 0.0])
  np.testing.assert_allclose(ee.recall(a, b), [1 / 2, 0.0])


TINY = ee.Config(tasks=("needle_single",), methods=(
    "dense", "streaming", "topk 2% (oracle)", "vattention e=d=0.05",
    "vattention simhash e=d=0.05", "linear hash 2% (untrained)"), instances=3,
    attention_instances=1, queries=2, seeds=2, batch=3,
    curve_queries=0)  # the curves: test_eval_at_length


@pytest.fixture(scope="module")
def tiny_report():
  return ee.run(TINY, progress=False)


def test_dense_accuracy_equals_teacher_forced_evaluation(tiny_report):
  # Greedy decoding through the cache reproduces a span exactly when every teacher-forced
  # argmax of the blockwise training forward is right: two code paths, one number.
  from models import checkpoint
  model, _ = checkpoint.load_hf(TINY.model)
  from flax import nnx
  graphdef, params = nnx.split(model)
  group = ee.instances(TINY, "needle_single", TINY.instances, True, tasks.load_corpus())
  want = evaluation.evaluate(graphdef, params, [("needle_single", TINY.length, group)],
                             batch_size=TINY.instances)
  assert tiny_report["accuracy"]["dense"]["needle_single"] == pytest.approx(
      want[f"needle_single@{TINY.length}"]["exact"])


def test_tiny_run_summary_and_outputs(tiny_report, tmp_path):
  rows = ee.summarize(tiny_report)
  dense = rows["dense"]
  assert max(dense["err_layer"]) < 1e-5 and dense["density"] == pytest.approx(1.0)
  assert rows["streaming"]["density"] < 0.05 and rows["streaming"]["accuracy"]["needle_single"] \
      <= dense["accuracy"]["needle_single"]
  topk = rows["topk 2% (oracle)"]
  assert all(0.0 < x <= 1.0 for x in topk["iou_layer"])
  # The oracle top-k holds the oracle's top 2% (up to GQA: its list is shared by the group).
  assert all(r >= i for r, i in zip(topk["recall_layer"], topk["iou_layer"]))
  assert "iou_layer" not in rows["vattention e=d=0.05"]  # value-dependent: no probe
  draws = TINY.attention_instances * TINY.queries * TINY.seeds * 8  # 8 query heads
  for name in ("vattention e=d=0.05", "vattention simhash e=d=0.05"):
    failure = rows[name]["vattention_failure"]
    assert [r["trials"] for r in failure] == [round((1 - r["clipped"]) * draws)
                                              for r in failure]
  for row in rows.values():
    assert all(np.isfinite(row["err_layer"]))
  text = er.format_report(tiny_report)
  assert "vattention meets its (epsilon, delta)" in text and "needle" in text
  assert "vattention simhash meets its (epsilon, delta)" in text
  er.save_json(tiny_report, tmp_path / "r.json")
  saved = json.loads((tmp_path / "r.json").read_text())
  assert set(saved["methods"]) == set(TINY.methods)
  er.plot(tiny_report, tmp_path / "p.png")
  assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_claims_verdicts_follow_the_numbers():
  report = {"config": {"tasks": ["needle_single", "common_words"], "dense_layers": [0]},
            "model": {"layers": 2}}

  def row(agg, ret, iou=None):
    r = {"err_task": {"common_words": agg, "needle_single": ret}, "density": 0.05}
    if iou is not None:
      r["iou_layer"] = iou
    return r

  rows = {"topk 2% (oracle)": row(0.9, 0.1), "magicpig K=10 L=150": row(0.2, 0.2),
          "spotlight 2% (trained)": row(1, 1, [0.0, 0.5]),
          "linear hash 2% (untrained)": row(1, 1, [0.9, 0.4])}
  verdicts = {c["claim"][:7]: c["confirmed"] for c in er.claims(report, rows)}
  assert verdicts == {"top-k d": True, "trained": True}  # layer 0 is dense: not compared
  rows["topk 2% (oracle)"] = row(0.1, 0.1)
  rows["linear hash 2% (untrained)"]["iou_layer"] = [0.0, 0.6]
  verdicts = {c["claim"][:7]: c["confirmed"] for c in er.claims(report, rows)}
  assert verdicts == {"top-k d": False, "trained": False}


def test_cli_rejects_bad_arguments(capsys):
  with pytest.raises(SystemExit):
    main(["eval", "--tasks", "needle_single,bogus"])
  assert "unknown --tasks" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main(["eval", "--instances", "0"])


def test_non_byte_vocabulary_without_tokenizer_is_refused():
  with pytest.raises(ValueError, match="byte-level vocabulary.*tokenizer.json"):
    ee.run(ee.Config(model=str(fixtures.folder("llama3"))), progress=False)


def char_tokenizer(path):
  """A character-level tokenizer.json whose ids are not the bytes (' ' is 0, '\n' 95)."""
  import tokenizers
  chars = [chr(c) for c in range(32, 127)] + ["\n"]
  vocab = {c: i for i, c in enumerate(chars)}
  vocab["[UNK]"] = len(vocab)
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(".|\n"), "isolated")
  tok.decoder = tokenizers.decoders.Fuse()
  tok.save(str(path))


def test_checkpoint_with_a_tokenizer(tmp_path):
  # A real checkpoint's path: its own tokenizer.json encodes the tasks, answers compare as
  # text. The llama3 fixture (random weights, 128 ids) with a character-level tokenizer.
  import shutil
  folder = tmp_path / "ckpt"
  shutil.copytree(fixtures.folder("llama3"), folder)
  char_tokenizer(folder / "tokenizer.json")
  codec = task_codec.Codec(str(folder), 128)
  group = ee.instances(TINY, "needle_single", 2, True, tasks.load_corpus())
  enc = codec.encode(group)
  for row, inst in enumerate(group):
    start, stop = inst.spans[-1]
    ids = enc.tokens[row, enc.starts[row]:enc.starts[row] + enc.answer_tokens[row]]
    assert codec.decode(ids) == inst.tokens[start:stop].tobytes().decode() == enc.answers[row]
    assert enc.tokens[row, 0] != inst.tokens[0] or inst.tokens[0] == 0  # not the bytes
  cfg = ee.Config(model=str(folder), tasks=("needle_single",), methods=("dense", "streaming"),
                  length=512, instances=2, attention_instances=2, queries=2, batch=2,
                  dense_layers=(), curve_queries=0)
  rows = ee.summarize(ee.run(cfg, progress=False))
  assert max(rows["dense"]["err_layer"]) < 1e-5
  assert 0.0 <= rows["streaming"]["accuracy"]["needle_single"] <= 1.0
  assert all(np.isfinite(rows["streaming"]["err_layer"]))
