"""The reference model's tasks, blockwise attention, training, resume and HF export."""

from __future__ import annotations

import collections
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.llama import causal_attention
from benchmarks.reference import attention, evaluation, tasks, train

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, head_dim=8)
MIX = (("mqar", 0.4), ("needle_single", 0.2), ("variable_tracking", 0.2), ("text", 0.2))


@pytest.fixture(scope="module")
def corpus():
  return tasks.load_corpus()


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_tasks_are_deterministic_per_seed(task, corpus):
  a = tasks.make(task, (7, 1), 256, corpus=corpus)
  b = tasks.make(task, (7, 1), 256, corpus=corpus)
  c = tasks.make(task, (7, 2), 256, corpus=corpus)
  assert a.tokens.shape == (256,) and a.tokens.dtype == np.uint8
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.mask, b.mask)
  assert a.spans == b.spans
  assert not np.array_equal(a.tokens, c.tokens)


def test_corpus_split_is_disjoint_and_fingerprinted(corpus):
  assert corpus.train.size > 5 * corpus.held_out.size > 0
  assert re.fullmatch(r"[0-9a-f]{64}", corpus.sha256)
  held = tasks.make("text", 3, 512, held_out=True, corpus=corpus).tokens.tobytes()
  assert held in corpus.held_out.tobytes()


@pytest.mark.parametrize("length", [256, 1024])
@pytest.mark.parametrize("seed", range(3))
def test_answers_are_where_the_mask_says(length, seed, corpus):
  for task in sorted(tasks.TASKS):
    inst = tasks.make(task, seed, length, corpus=corpus)
    text = inst.tokens.tobytes()
    if task == "text":
      assert inst.spans == () and inst.mask.sum() == length - 1
      continue
    expected = np.zeros(length, np.float32)
    for start, stop in inst.spans:
      expected[start:stop] = 1.0
    np.testing.assert_array_equal(inst.mask, expected)
    for (start, stop), answer in zip(inst.spans, inst.answers()):
      if task == "copy":
        assert text[:start - 1].endswith(answer) and text[start - 1:start] == b"\n"
        continue
      line_start = text.rindex(b"\n", 0, start) + 1
      prefix = text[line_start:start]  # "?key" or "?common:"
      assert prefix.startswith(b"?") and text[stop:stop + 1] == b"\n", task
      if task == "common_words":
        words = text[:line_start].split()
        counts = {w: words.count(w) for w in set(words)}
        top = answer.split()
        ranked = sorted(counts.values(), reverse=True)
        assert [counts[w] for w in top] == ranked[:3] and ranked[2] > ranked[3]
      elif task == "frequent_word":  # the answer out-counts every other word
        counts = collections.Counter(text[:line_start].split())
        (first, c1), (_, c2) = counts.most_common(2)
        assert answer == first and c1 > c2
      elif task == "count_marked":  # the digit is the number of "[key]" before the question
        key = prefix[len(b"?count["):-len(b"]=")]
        assert 1 <= int(answer) <= 9 and text[:line_start].count(b"[" + key + b"]") == int(
            answer)
      elif task == "variable_tracking":
        chain = [prefix[1:]] + [answer[i:i + tasks.KEY_LETTERS]
                                for i in range(0, len(answer), tasks.KEY_LETTERS)]
        for a, b in zip(chain[:-1], chain[1:]):
          assert text.count(b"<" + a + b + b">") == 1
      else:
        assert text.count(b"<" + prefix[1:] + answer + b">") == 1


def test_blockwise_attention_matches_dense():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 8, 200, 16))
  k = jax.random.normal(keys[1], (2, 2, 200, 16))
  v = jax.random.normal(keys[2], (2, 2, 200, 16))
  dense = causal_attention(q, k, v)
  for block in (64, 200, 256):
    np.testing.assert_allclose(attention.blockwise_causal_attention(q, k, v, block), dense,
                               rtol=1e-5, atol=1e-5)


def test_a_few_steps_decrease_the_loss(corpus):
  config = train.model_config(**TINY)
  graphdef, params = nnx.split(models.Llama(config, rngs=nnx.Rngs(0)))
  recipe = train.Recipe(phases=(train.Phase(128, 12, MIX),), peak_lr=1e-2, warmup=1, block=64)
  tx = train.make_optimizer(recipe)
  with jax.numpy_dtype_promotion("standard"):
    opt_state = tx.init(params)
  step = train.make_train_step(graphdef, tx, recipe.block)
  tokens, mask = train.step_batch(0, 0, recipe.phases[0], 1024, corpus)
  losses = []
  for _ in range(12):
    params, opt_state, loss = step(params, opt_state, jnp.asarray(tokens), jnp.asarray(mask))
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses


def _run(out, **kwargs):
  model, _ = train.train(out, recipe="test", config=train.model_config(**TINY),
                         tokens_per_step=512, eval_suite=(("needle_single", 128, 2),),
                         final_suite=None, progress=False, **kwargs)
  return model


def _records(path):
  drop = ("train_seconds",)
  return [{k: v for k, v in json.loads(line).items() if k not in drop}
          for line in path.read_text().splitlines() if json.loads(line)["kind"] != "start"]


def test_resume_continues_bit_identically(tmp_path, monkeypatch):
  recipe = train.Recipe(phases=(train.Phase(128, 6, MIX),), warmup=2, block=64, eval_every=2,
                        log_every=1)
  monkeypatch.setitem(train.RECIPES, "test", recipe)
  straight = _run(tmp_path / "a")
  _run(tmp_path / "b", max_steps=3)
  resumed = _run(tmp_path / "b", resume=True)
  for x, y in zip(jax.tree.leaves(nnx.state(straight)), jax.tree.leaves(nnx.state(resumed))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _records(tmp_path / "a" / "train_log.jsonl") == _records(
      tmp_path / "b" / "train_log.jsonl")
  meta = json.loads((tmp_path / "b" / "ckpt" / "meta.json").read_text())
  assert meta["step"] == 6 and meta["device"].startswith(jax.devices()[0].platform)
  with pytest.raises(ValueError, match="differs"):
    train.train(tmp_path / "b", recipe="test", config=train.model_config(**TINY),
                tokens_per_step=1024, resume=True, progress=False, final_suite=None)

  # The HF folder written at the end loads through models.load_hf with identical logits.
  folder = tmp_path / "b" / "hf"
  hf = json.loads((folder / "config.json").read_text())
  assert hf["architectures"] == ["LlamaForCausalLM"]
  assert hf["sparse_attn_reference"]["step"] == 6
  loaded, config = models.load_hf(folder)
  assert config == resumed.config
  ids = jnp.asarray(tasks.make("needle_single", 0, 128).tokens[None].astype(np.int32))
  np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(resumed(ids)))
  np.testing.assert_allclose(attention.forward_logits(loaded, ids, 64), resumed(ids),
                             rtol=1e-4, atol=1e-4)


def test_score_counts_a_span_right_only_when_every_byte_is():
  inst = tasks.make("needle_multiquery", 0, 256)
  argmax = np.concatenate([inst.tokens[1:], [0]]).astype(np.int32)[None]
  nll = np.zeros((1, 255), np.float32)
  assert evaluation.score("needle_multiquery", [inst], argmax, nll)["exact"] == 1.0
  start, _ = inst.spans[0]
  argmax[0, start] = (argmax[0, start] + 1) % 256  # second byte of the first answer wrong
  result = evaluation.score("needle_multiquery", [inst], argmax, nll)
  assert result["exact"] == 0.75 and result["byte_acc"] == 27 / 28
