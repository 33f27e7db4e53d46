"""The aggregation tasks' contents: answers that depend on many positions of the context.

RULER's common-words extraction (``tasks.common_words``) separates its top words from the
rest by two occurrences in thousands, and the 1K reference model never learned it (0% even
dense). These two are built to be learnable by attention while still needing the whole
context:

* ``frequent_word``: a list of 4-letter words from a vocabulary of ``vocabulary`` words with
  Zipf shares (word ``i`` about ``1 / (i + 1)`` of the slots, normalised), shuffled; the
  answer is the most frequent word, which occurs about twice as often as the next (30% of
  the slots for 16 words). Averaging attention over the list, a head sees the answer's
  letters with the largest weight; top-k keeps only the highest-scoring occurrences.
* ``count_marked``: ``[key]`` markers hidden in natural text, ``count`` of them with the
  queried key and 1-9 of each of ``distractors`` other keys; the answer is the count, one
  digit. Every matching marker must be found: dropping one changes the answer.

The builders return bytes only (``tasks`` wraps them into ``Instance``s with loss masks), so
that this module depends on numpy alone.
"""

from __future__ import annotations

import numpy as np

WORD_LETTERS = 4
FREQUENT_PREFIX = b"?frequent:"
MAX_COUNT = 9


def _words(rng: np.random.Generator, n: int, letters: int) -> list[bytes]:
  """``n`` distinct random lowercase words."""
  out: list[bytes] = []
  while len(out) < n:
    word = bytes(rng.integers(ord("a"), ord("z") + 1, letters).astype(np.uint8))
    if word not in out:
      out.append(word)
  return out


def zipf_counts(slots: int, vocabulary: int) -> np.ndarray:
  """Occurrences of each word, most frequent first: ``floor(slots / ((i + 1) H))`` (at least
  1) with ``H`` the ``vocabulary``-th harmonic number, then one more (or one fewer) for the
  words after the first, from the last, until the counts sum to ``slots``.

  Raises:
    ValueError: ``slots`` too few for the first word to lead the second.
  """
  if vocabulary < 2 or slots < 3 * vocabulary:
    raise ValueError(f"slots={slots} must be >= 3 * vocabulary={3 * vocabulary} "
                     "(and vocabulary >= 2)")
  shares = 1.0 / np.arange(1, vocabulary + 1)
  counts = np.maximum(np.floor(slots * shares / shares.sum()).astype(np.int64), 1)
  diff, i = slots - int(counts.sum()), vocabulary - 1
  while diff:
    step = 1 if diff > 0 else -1
    if step > 0 or counts[i] > 1:
      counts[i] += step
      diff -= step
    i = i - 1 if i > 1 else vocabulary - 1
  counts[1:] = np.sort(counts[1:])[::-1]
  if counts[0] <= counts[1]:
    raise ValueError(f"slots={slots} are too few for {vocabulary} Zipf words")
  return counts


def frequent_word(rng: np.random.Generator, length: int,
                  vocabulary: int = 16) -> tuple[bytes, bytes, bytes]:
  """``(list, query prefix, answer)``: a shuffled list of space-separated words with
  ``zipf_counts`` occurrences, filling ``length`` bytes with the query line, and its most
  frequent word."""
  answer_len = WORD_LETTERS
  slots = (length - 2 - len(FREQUENT_PREFIX) - answer_len + 1) // (WORD_LETTERS + 1)
  if slots < 3 * vocabulary:
    raise ValueError(f"length={length} is too short for frequent_word with {vocabulary} "
                     f"words ({slots} slots, {3 * vocabulary} needed)")
  counts = zipf_counts(slots, vocabulary)
  vocab = _words(rng, vocabulary, WORD_LETTERS)
  words = np.repeat(np.arange(vocabulary), counts)
  body = b" ".join(vocab[i] for i in rng.permutation(words))
  return body, FREQUENT_PREFIX, vocab[0]


def count_marked(rng: np.random.Generator, distractors: int = 2,
                 letters: int = 5) -> tuple[list[bytes], bytes, bytes]:
  """``(markers in a random order, query prefix, answer)``: ``count`` (uniform in 1..9)
  markers ``[key]`` plus 1-9 of each of ``distractors`` other keys; the query
  ``?count[key]=`` and the answer the digit ``count``."""
  keys = _words(rng, 1 + distractors, letters)
  counts = rng.integers(1, MAX_COUNT + 1, 1 + distractors)
  markers = [b"[" + k + b"]" for k, c in zip(keys, counts) for _ in range(int(c))]
  order = rng.permutation(len(markers))
  return [markers[i] for i in order], b"?count[" + keys[0] + b"]=", str(int(counts[0])).encode()
