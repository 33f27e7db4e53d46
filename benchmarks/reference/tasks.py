"""Seeded byte-level sequences for training and evaluating the reference model.

Every instance is exactly ``length`` bytes (token id = byte value) with a loss mask and the
answer spans, so exact match is "every answer byte is the argmax of the logits one position
earlier" (teacher-forced; for one answer span this equals greedy decoding of that span from
the same prefix). Tasks, in the style of RULER:

* ``text``: a chunk of natural text (Python standard library sources and docs); loss on
  every byte (language modelling), no answer spans.
* ``copy``: text, a random string, a newline, the string again (loss on the repeat): the
  induction-head warm-up.
* ``mqar``: multi-query associative recall, the dense-supervision warm-up: many records
  ``<keyvalue>`` (5 lowercase letters, then 7 digits) with a little text between them, then
  a query ``?keyvalue`` for every record in random order; loss on the values.
* ``needle_single``: one record hidden in a haystack of natural text at a uniform depth, then
  one query.
* ``needle_multikey``: four records with distinct keys in the haystack, one queried (the others
  distract); ``needle_multiquery`` queries them all (denser, used in training).
* ``variable_tracking``: a chain ``<12345678abcde>``, ``<abcdefghij>``, ... (read "the value
  flows into the name on the right"; names have 5 letters) hidden in the haystack, query
  ``?12345678`` with answer ``abcdefghij...``, the names of the chain in order, concatenated;
  each name is one retrieval hop.
* ``common_words``: aggregation (attention is not sparse): a list of words where three occur
  more often than any other, query ``?common:`` with answer the three, most frequent first.
* ``frequent_word``: aggregation built to be learnable (``aggregation``): a list of words with
  Zipf shares, query ``?frequent:``, answer the most frequent word (twice the next's count).
* ``count_marked``: counting: markers ``[key]`` in a haystack, 1-9 with the queried key and
  1-9 of each of two other keys; query ``?count[key]=``, answer the count (one digit).

The query's bytes before an answer repeat the record's (``key``, with no delimiter between key
and answer), so one mechanism, a multi-byte induction head (find the earlier ``key``, copy what
follows), serves every retrieval task. Randomness comes only from ``numpy.random.Generator``s
seeded by the caller; the corpus file list is sorted and split into train / held-out by a hash
of each file's path, so both are the same on every machine with the same Python version.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import sysconfig
import zlib
from typing import Callable

import numpy as np

from benchmarks.reference import aggregation

SUFFIXES = (".py", ".txt", ".rst")
EXCLUDED_DIRS = ("site-packages", "__pycache__", "test", "tests", "idle_test")
HELD_OUT_PERCENT = 10
KEY_LETTERS = 5
VALUE_DIGITS = 7
LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
DIGITS = np.frombuffer(b"0123456789", np.uint8)


@dataclasses.dataclass(frozen=True)
class Instance:
  """One sequence: ``tokens uint8 [length]``, ``mask float32 [length]`` (1 on the bytes that
  carry loss), ``spans`` the ``(start, stop)`` byte ranges of each answer (empty for text)."""

  tokens: np.ndarray
  mask: np.ndarray
  spans: tuple[tuple[int, int], ...]

  def answers(self) -> list[bytes]:
    return [self.tokens[a:b].tobytes() for a, b in self.spans]


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The natural text: ``train`` and ``held_out`` byte arrays, and a fingerprint."""

  train: np.ndarray
  held_out: np.ndarray
  files: int
  sha256: str

  def split(self, held_out: bool) -> np.ndarray:
    return self.held_out if held_out else self.train


def corpus_files(root: str | pathlib.Path | None = None) -> list[pathlib.Path]:
  """The sorted text files of the standard library (tests and site-packages excluded)."""
  root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()
           and not set(p.relative_to(root).parts[:-1]) & set(EXCLUDED_DIRS)]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=2)
def load_corpus(root: str | None = None) -> Corpus:
  """Reads the corpus once; a file is held out when ``crc32(relative path) % 100 < 10``."""
  base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  parts: dict[bool, list[bytes]] = {False: [], True: []}
  digest = hashlib.sha256()
  files = corpus_files(base)
  for path in files:
    rel = path.relative_to(base).as_posix()
    data = path.read_bytes().replace(b"\r\n", b"\n")
    digest.update(rel.encode() + b"\0" + data)
    parts[zlib.crc32(rel.encode()) % 100 < HELD_OUT_PERCENT].append(data)
  if not parts[False] or not parts[True]:
    raise ValueError(f"no text corpus found under {str(base)!r}")
  arrays = {k: np.frombuffer(b"\n".join(v), np.uint8) for k, v in parts.items()}
  return Corpus(arrays[False], arrays[True], len(files), digest.hexdigest())


def text_chunk(rng: np.random.Generator, corpus: Corpus, length: int,
               held_out: bool = False) -> np.ndarray:
  """``length`` consecutive bytes from a uniform offset of the corpus."""
  data = corpus.split(held_out)
  start = int(rng.integers(0, data.size - length))
  return data[start:start + length]


def random_word(rng: np.random.Generator, letters: int = KEY_LETTERS) -> bytes:
  return LETTERS[rng.integers(0, 26, letters)].tobytes()


def random_number(rng: np.random.Generator, digits: int = VALUE_DIGITS) -> bytes:
  first = DIGITS[rng.integers(1, 10, 1)]
  return np.concatenate([first, DIGITS[rng.integers(0, 10, digits - 1)]]).tobytes()


def distinct_words(rng: np.random.Generator, n: int, avoid: bytes = b"",
                   letters: int = KEY_LETTERS) -> list[bytes]:
  """``n`` distinct random words, none of which occurs in ``avoid``."""
  if n > 26**letters // 2:
    raise ValueError(f"{n} distinct words of {letters} letters are too many")
  words: list[bytes] = []
  while len(words) < n:
    word = random_word(rng, letters)
    if word not in words and word not in avoid:
      words.append(word)
  return words


def compose(rng: np.random.Generator, corpus: Corpus, length: int, records: list[bytes],
            queries: list[tuple[bytes, bytes]], held_out: bool) -> Instance:
  """Hides ``records`` in order at uniform depths of a natural-text haystack, then appends
  the ``(prefix, answer)`` queries, one per line; loss on the answer bytes.

  Raises:
    ValueError: the records and queries do not fit in ``length`` bytes.
  """
  tail = b"".join(b"\n" + prefix + answer for prefix, answer in queries) + b"\n"
  hay_len = length - len(tail) - sum(len(r) for r in records)
  if hay_len < 0:
    raise ValueError(f"{len(records)} records and {len(queries)} queries need "
                     f"{length - hay_len} bytes, more than length={length}")
  hay = text_chunk(rng, corpus, hay_len, held_out).tobytes() if hay_len else b""
  cuts = np.sort(rng.integers(0, hay_len + 1, len(records)))
  pieces, prev = [], 0
  for cut, record in zip(cuts, records):
    pieces += [hay[prev:cut], record]
    prev = int(cut)
  pieces.append(hay[prev:])
  body = b"".join(pieces)
  tokens = np.frombuffer(body + tail, np.uint8).copy()
  mask = np.zeros(length, np.float32)
  spans, pos = [], len(body)
  for prefix, answer in queries:
    start = pos + 1 + len(prefix)
    spans.append((start, start + len(answer)))
    mask[start:start + len(answer)] = 1.0
    pos = start + len(answer)
  return Instance(tokens, mask, tuple(spans))


def key_value(rng: np.random.Generator, corpus: Corpus, length: int, num_records: int,
              num_queries: int, held_out: bool = False,
              hay_fraction: float | None = None, key_letters: int = KEY_LETTERS) -> Instance:
  """Records ``<keyvalue>`` in a haystack; ``num_queries`` of them queried as ``?key``.

  ``hay_fraction`` (mqar) keeps the haystack to about that fraction of the sequence by
  adding records until it fits (at most half of the possible keys); None uses exactly
  ``num_records``. Fewer ``key_letters`` make an easier variant.
  """
  if hay_fraction is not None:
    per_pair = 2 * (key_letters + VALUE_DIGITS) + 3
    num_records = max(1, int(length * (1.0 - hay_fraction)) // per_pair)
    num_records = num_queries = min(num_records, 26**key_letters // 2)
  keys = distinct_words(rng, num_records, letters=key_letters)
  values = [random_number(rng) for _ in keys]
  records = [b"<" + k + v + b">" for k, v in zip(keys, values)]
  asked = rng.permutation(num_records)[:num_queries]
  queries = [(b"?" + keys[i], values[i]) for i in asked]
  return compose(rng, corpus, length, records, queries, held_out)


def variable_tracking(rng: np.random.Generator, corpus: Corpus, length: int, hops: int = 3,
                      held_out: bool = False, key_letters: int = KEY_LETTERS) -> Instance:
  """A chain ``value -> name_1 -> ... -> name_hops`` in the haystack; answer the names."""
  value = random_number(rng, VALUE_DIGITS + 1)
  names = distinct_words(rng, hops, letters=key_letters)
  chain = [value] + names
  records = [b"<" + a + b + b">" for a, b in zip(chain[:-1], chain[1:])]
  return compose(rng, corpus, length, records, [(b"?" + value, b"".join(names))], held_out)


def common_words(rng: np.random.Generator, corpus: Corpus, length: int, top: int = 3,
                 held_out: bool = False) -> Instance:
  """A list of 4-letter words in which ``top`` words occur more often than all others
  (strictly decreasing counts); answer them, most frequent first, space-separated.

  ``corpus`` and ``held_out`` are unused (the list is the whole context), kept so that every
  task has the same signature.
  """
  del corpus, held_out
  prefix = b"?common:"
  answer_len = top * 5 - 1
  slots = (length - 2 - len(prefix) - answer_len) // 5  # each word is 4 letters + a space
  base = max(2, slots // 24)  # the most frequent filler count
  counts = [base + 2 * (top - i) for i in range(top)]
  fill = slots - sum(counts)
  if fill < 0:
    raise ValueError(f"length={length} is too short for common_words")
  tops = distinct_words(rng, top, letters=4)
  words = [w for w, c in zip(tops, counts) for _ in range(c)]
  taken = set(tops)
  while len(words) < slots:  # fillers occur 1..base times, fewer than any top word
    word = random_word(rng, 4)
    if word not in taken:
      taken.add(word)
      words += [word] * min(int(rng.integers(1, base + 1)), slots - len(words))
  order = rng.permutation(len(words))
  body = b" ".join(words[i] for i in order)
  return final_query(body, prefix, b" ".join(tops), length)


def final_query(body: bytes, prefix: bytes, answer: bytes, length: int) -> Instance:
  """``body``, a newline, ``prefix + answer`` and a newline, left-padded with spaces to
  ``length`` bytes; loss on the answer.

  Raises:
    ValueError: it does not fit in ``length`` bytes.
  """
  text = body + b"\n" + prefix + answer + b"\n"
  if len(text) > length:
    raise ValueError(f"{len(text)} bytes do not fit in length={length}")
  tokens = np.frombuffer(text.rjust(length, b" "), np.uint8).copy()
  start = length - 1 - len(answer)
  mask = np.zeros(length, np.float32)
  mask[start:start + len(answer)] = 1.0
  return Instance(tokens, mask, ((start, start + len(answer)),))


def frequent_word(rng: np.random.Generator, corpus: Corpus, length: int,
                  held_out: bool = False) -> Instance:
  """``aggregation.frequent_word``'s list and question (no text: ``corpus`` unused)."""
  del corpus, held_out
  return final_query(*aggregation.frequent_word(rng, length), length)


def count_marked(rng: np.random.Generator, corpus: Corpus, length: int,
                 held_out: bool = False, key_letters: int = KEY_LETTERS) -> Instance:
  """``aggregation.count_marked``'s markers hidden in a haystack, then its question."""
  markers, prefix, answer = aggregation.count_marked(rng, letters=key_letters)
  return compose(rng, corpus, length, markers, [(prefix, answer)], held_out)


def copy(rng: np.random.Generator, corpus: Corpus, length: int,
         held_out: bool = False) -> Instance:
  """Text, then a random string of letters and digits of random length, a newline, and the
  string again; loss on the repeat. Every supervised byte is solved by an induction head
  (find the previous occurrence of the current byte, copy its successor), the circuit every
  retrieval task builds on; the random length keeps a fixed-offset head from solving it.
  """
  n = int(rng.integers(8, (length - 1) // 2 + 1))
  alphabet = np.concatenate([LETTERS, DIGITS])
  string = alphabet[rng.integers(0, alphabet.size, n)]
  hay = text_chunk(rng, corpus, length - 2 * n - 1, held_out)
  tokens = np.concatenate([hay, string, np.frombuffer(b"\n", np.uint8), string])
  mask = np.zeros(length, np.float32)
  mask[length - n:] = 1.0
  return Instance(tokens, mask, ((length - n, length),))


def text(rng: np.random.Generator, corpus: Corpus, length: int,
         held_out: bool = False) -> Instance:
  """Natural text with loss on every byte but the first."""
  mask = np.ones(length, np.float32)
  mask[0] = 0.0
  return Instance(text_chunk(rng, corpus, length, held_out).copy(), mask, ())


Task = Callable[..., Instance]
TASKS: dict[str, Task] = {
    "text": text,
    "copy": copy,
    "mqar": functools.partial(key_value, num_records=0, num_queries=0, hay_fraction=0.2),
    "needle_single": functools.partial(key_value, num_records=1, num_queries=1),
    "needle_multikey": functools.partial(key_value, num_records=4, num_queries=1),
    "needle_multiquery": functools.partial(key_value, num_records=4, num_queries=4),
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_word": frequent_word,
    "count_marked": count_marked,
}
AGGREGATION = ("common_words", "frequent_word", "count_marked")


def make(task: str, seed: int | tuple[int, ...] | np.random.Generator, length: int,
         held_out: bool = False, corpus: Corpus | None = None,
         key_letters: int = KEY_LETTERS) -> Instance:
  """One instance of ``task`` (a key of ``TASKS``), a pure function of ``seed``.

  ``key_letters`` sets the length of the keys and names of the retrieval tasks.
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  options = {} if task in ("text", "copy", "common_words", "frequent_word") else {"key_letters": key_letters}
  inst = TASKS[task](rng, corpus or load_corpus(), length, held_out=held_out, **options)
  if inst.tokens.shape != (length,):
    raise AssertionError(f"{task} made {inst.tokens.shape[0]} bytes, not {length}")
  return inst


def batch(instances: list[Instance]) -> tuple[np.ndarray, np.ndarray]:
  """Stacks instances: ``(tokens int32 [B, T], mask float32 [B, T])``."""
  return (np.stack([i.tokens for i in instances]).astype(np.int32),
          np.stack([i.mask for i in instances]))
