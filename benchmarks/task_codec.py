"""Task instances (bytes) as a model's ids, and back: the evaluation's one tokenizer seam.

The reference model reads bytes; any other checkpoint brings a ``tokenizer.json``, read with
the ``tokenizers`` package (``pip install tokenizers``, in the ``hub`` extra).
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import numpy as np


class Encoded(NamedTuple):
  """Instances as model ids: ``tokens int32 [B, T]`` right-padded to ``lengths``; the last
  answer starts at ``starts`` and is ``answers`` (text), ``answer_tokens`` ids long."""

  tokens: np.ndarray
  lengths: np.ndarray
  starts: np.ndarray
  answers: list
  answer_tokens: np.ndarray


class Codec:
  """Task bytes to a model's ids and back: the bytes themselves for a byte-level model
  (vocabulary of 256), else the checkpoint's ``tokenizer.json`` through the ``tokenizers``
  package (``pip install tokenizers``; not needed for the reference model)."""

  def __init__(self, folder: str, vocab_size: int):
    path = pathlib.Path(folder) / "tokenizer.json"
    self.tokenizer = None
    if path.is_file():
      try:
        import tokenizers
      except ImportError:
        raise ValueError(f"{folder} has a tokenizer.json: pip install tokenizers to evaluate "
                         "it") from None
      self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
    elif vocab_size != 256:
      raise ValueError(f"--model must have a byte-level vocabulary (256 ids) or a "
                       f"tokenizer.json; {folder} has vocab_size={vocab_size} and no "
                       "tokenizer.json")
    # A tokenizer may split the answer differently in context: decode two more tokens and
    # compare text.
    self.extra = 0 if self.tokenizer is None else 2

  def ids(self, text: bytes, first: bool) -> list[int]:
    if self.tokenizer is None:
      return list(text)
    return self.tokenizer.encode(text.decode("utf-8", errors="replace"),
                                 add_special_tokens=first).ids

  def decode(self, ids) -> str:
    if self.tokenizer is None:
      return bytes(int(i) for i in ids).decode("latin-1")
    return self.tokenizer.decode([int(i) for i in ids])

  def encode(self, group: list) -> Encoded:
    rows, starts, answers, counts = [], [], [], []
    for inst in group:
      start, stop = inst.spans[-1]
      data = inst.tokens.tobytes()
      prompt, answer = self.ids(data[:start], True), self.ids(data[start:stop], False)
      rows.append(prompt + answer + self.ids(data[stop:], False))
      starts.append(len(prompt))
      counts.append(len(answer))
      answers.append(self.decode(answer) if self.tokenizer is None else
                     data[start:stop].decode("utf-8", errors="replace"))
    lengths = np.array([len(r) for r in rows], np.int32)
    tokens = np.zeros((len(rows), int(lengths.max())), np.int32)
    for row, ids in zip(tokens, rows):
      row[:len(ids)] = ids
    return Encoded(tokens, lengths, np.array(starts, np.int32), answers,
                   np.array(counts, np.int32))
