"""The learnable aggregation tasks (``frequent_word``, ``count_marked``), checked by parsing
the instance's bytes, independently of the builders."""

import collections
import re

import numpy as np
import pytest

from benchmarks.reference import aggregation, tasks


@pytest.fixture(scope="module")
def corpus():
  return tasks.load_corpus()


@pytest.mark.parametrize("length", [256, 4096, 16384])
def test_frequent_word_leads_by_its_zipf_share(length, corpus):
  for seed in range(3):
    inst = tasks.make("frequent_word", seed, length, held_out=True, corpus=corpus)
    text = inst.tokens.tobytes()
    body, question = text.strip(b" ").rsplit(b"\n?frequent:", 1)
    words = body.split(b" ")
    assert all(re.fullmatch(rb"[a-z]{4}", w) for w in words)
    counts = collections.Counter(words)
    ranked = counts.most_common()
    assert len(counts) == 16 and inst.answers() == [ranked[0][0]]
    assert question == ranked[0][0] + b"\n"
    # Zipf with 16 words: the first 1 / H_16 = 29.6% of the slots, the second half of that.
    share = ranked[0][1] / len(words)
    assert abs(share - 1 / sum(1 / np.arange(1, 17))) < 0.03 + 2 / len(words)
    assert ranked[0][1] >= 1.7 * ranked[1][1]
    # The whole list is the context: the padding before it is a few spaces at most.
    assert len(text) - len(text.lstrip(b" ")) < 6


@pytest.mark.parametrize("length", [256, 16384])
def test_count_marked_counts_every_marker(length, corpus):
  seen = set()
  for seed in range(20):
    inst = tasks.make("count_marked", seed, length, corpus=corpus)
    text = inst.tokens.tobytes()
    (start, stop), = inst.spans
    key = re.search(rb"\?count\[([a-z]{5})\]=$", text[:start]).group(1)
    answer = int(text[start:stop])
    body = text[:text.rindex(b"\n", 0, start)]  # everything before the question's line
    assert text[stop:] == b"\n" and body.count(b"[" + key + b"]") == answer
    others = set(re.findall(rb"\[([a-z]{5})\]", body)) - {key}
    assert len(others) >= 2  # the two distractor keys (the text may add more)
    seen.add(answer)
  assert seen >= {1, 9} and len(seen) >= 6  # uniform on 1..9: 20 draws miss >3 w.p. ~0.1%


def test_zipf_counts_sum_and_order():
  for slots in (48, 49, 100, 3273):
    counts = aggregation.zipf_counts(slots, 16)
    assert counts.sum() == slots and counts.min() >= 1
    assert (np.diff(counts) <= 0).all() and counts[0] > counts[1]
  with pytest.raises(ValueError, match="slots"):
    aggregation.zipf_counts(47, 16)
  with pytest.raises(ValueError, match="length"):
    tasks.make("frequent_word", 0, 128)
