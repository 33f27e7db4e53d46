r"""Predictors that rank cached tokens for a decode query (for top-k selection).

A predictor is a value: ``sa.topk(fraction=0.02, predictor=sa.predictors.simhash(bits=128))``.
It scores every valid token; the top-k estimators then attend exactly (with the true keys)
over the best-ranked ones. The predictors:

* ``oracle()``: the exact scores ``q . k / sqrt(D)``. It reads every key, so it is an upper
  bound on what a fast predictor can reach, not a fast method.
* ``simhash(bits)``: Hamming similarity of ``bits``-bit SimHash codes of the query and of the
  centred keys (``sparse_attn.lsh``), packed LSB-first into uint32 words. Reads ``bits / 8``
  bytes per token instead of ``2 D`` or ``4 D``. Its expectation is monotone in the angle
  between ``q`` and the centred key: ``bits * (1 - theta / pi)``.
* ``spotlight(params)``: Hamming similarity of learned ``D``-bit codes
  (``sparse_attn.hash_heads``), summed over the GQA group, so every query of a group ranks
  tokens alike.

A value is a frozen configuration (equal settings compare and hash equal; Spotlight's by the
identity of its ``params``); an estimator turns it into a ``Scorer`` (its functions) with
``scorer(sinks, local, norms)``.
"""

from __future__ import annotations

import dataclasses

from sparse_attn import hash_heads
from sparse_attn._src import scoring


class Predictor:
  """A predictor's configuration; ``scorer(sinks, local, norms)`` builds its functions.

  ``sinks, local``: the estimator's exact window (SimHash leaves it out of its centring mean);
  ``norms``: also store each hashed key's norm (2 bytes per token) for score estimates
  (``sparse_attn._src.importance``).
  """

  reads_all_keys: bool = False

  def scorer(self, sinks: int, local: int, norms: bool = False) -> scoring.Scorer:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Oracle(Predictor):
  """The exact scores (reads every key)."""

  reads_all_keys = True

  def scorer(self, sinks, local, norms=False):
    del sinks, local, norms
    return scoring.oracle_scorer()


@dataclasses.dataclass(frozen=True)
class SimHash(Predictor):
  """SimHash codes of centred keys: ``bits``, a positive multiple of 32; ``append_chunk``,
  tokens hashed per step of ``append``'s loop."""

  bits: int = 128
  append_chunk: int = 16

  def __post_init__(self):
    if not isinstance(self.bits, int) or self.bits < 32 or self.bits % 32:
      raise ValueError(f"bits must be a positive multiple of 32, got {self.bits!r}")
    _check_chunk(self.append_chunk)

  def scorer(self, sinks, local, norms=False):
    return scoring.simhash_scorer(self.bits, sinks, local, self.append_chunk, norms)


@dataclasses.dataclass(frozen=True, eq=False)
class Spotlight(Predictor):
  """Learned hash codes: ``params`` of ``sa.hash_heads.init_params`` (trained with
  ``sa.train.fit_hash_heads``). Two values are equal when they hold the same ``params``
  object (arrays are not compared by value)."""

  params: dict
  append_chunk: int = 16

  def __post_init__(self):
    hash_heads.check_params(self.params)
    _check_chunk(self.append_chunk)

  def __eq__(self, other):
    return (type(other) is Spotlight and other.params is self.params
            and other.append_chunk == self.append_chunk)

  def __hash__(self):
    return hash((Spotlight, id(self.params), self.append_chunk))

  def scorer(self, sinks, local, norms=False):
    del sinks, local
    return scoring.spotlight_scorer(self.params, self.append_chunk, norms)


def _check_chunk(append_chunk):
  if not isinstance(append_chunk, int) or append_chunk < 1:
    raise ValueError(f"append_chunk must be a positive int, got {append_chunk!r}")


def oracle() -> Oracle:
  """The exact scores ``q . k / sqrt(D)`` (reads every key: an upper bound, not a fast
  method)."""
  return Oracle()


def simhash(bits: int = 128, append_chunk: int = 16) -> SimHash:
  """SimHash codes of ``bits`` bits of the centred keys, ranked by Hamming similarity; the
  planes are drawn from ``init``'s key."""
  return SimHash(bits, append_chunk)


def spotlight(params: dict, append_chunk: int = 16) -> Spotlight:
  """Learned Spotlight codes of ``params`` (this layer's hash heads), ranked by Hamming
  similarity summed over the GQA group."""
  return Spotlight(params, append_chunk)


def check(predictor, name: str = "predictor") -> Predictor:
  """``predictor`` if it is a predictor value; else a ``ValueError`` that says how to build
  one."""
  if not isinstance(predictor, Predictor):
    raise ValueError(
        f"{name} must be a predictor value such as sa.predictors.oracle(), "
        f"sa.predictors.simhash(bits=128) or sa.predictors.spotlight(params), got {predictor!r}")
  return predictor
