"""The named method configurations of the experiments' tables.

Each row of a table is a ``Method``: the name printed, the estimator family and its
settings, and how to build it from what the experiment supplies (``Context``: the exact
window, epsilon and delta, a density, Spotlight's hash heads). The experiments look methods
up here by name and read their settings; no display name is parsed back into settings.

* ``EVAL``: ``python -m benchmarks eval`` (the reference model's real attention).
* ``EQUAL_DENSITY``: the vAttention rows of ``python -m benchmarks equal-density``.
* ``COMPARE``: the fixed rows of ``python -m benchmarks compare`` (its other rows are sized
  at run time to MagicPIG's density).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import sparse_attn as sa

ORACLE_FRACTION = 0.02  # the top-k rows' and the IoU oracle's fraction of the tokens


class Context(NamedTuple):
  """What an experiment supplies when it builds a method."""

  sinks: int = 4
  local: int = 64
  epsilon: float | None = None
  delta: float | None = None
  density: float | None = None
  hash_params: dict | None = None  # this layer's Spotlight heads, for ``hash_heads`` methods


@dataclasses.dataclass(frozen=True)
class Method:
  """A named estimator configuration.

  Attributes:
    name: the row's name in the tables and reports.
    family: ``dense``, ``streaming``, ``topk``, ``topp``, ``magicpig``, ``spotlight``,
      ``vattention`` (``sa.vattention``) or ``vattention_importance``.
    settings: the estimator's own arguments (``build``'s keywords).
    build: ``build(context, **settings) -> sa.Estimator``.
    hash_heads: whose Spotlight heads ``context.hash_params`` must hold: ``"trained"``,
      ``"untrained"`` (identity-initialised: the sign of each coordinate), or None.
  """

  name: str
  family: str
  settings: Mapping[str, Any]
  build: Callable[..., sa.Estimator]
  hash_heads: str | None = None

  def make(self, context: Context) -> sa.Estimator:
    return self.build(context, **self.settings)

  @property
  def samples(self) -> bool:
    """A vAttention variant: random draws, with an (epsilon, delta) promise or a density,
    and a token set that depends on the values (no value probe can read it off)."""
    return self.family in ("vattention", "vattention_importance")


def proposal_codes(proposal: str, hash_params: dict | None = None):
  """vAttention's residual sampler: ``"uniform"`` (None), ``"simhash"`` (1024-bit SimHash
  codes) or ``"spotlight"`` (the hash heads ``hash_params``)."""
  if proposal == "uniform":
    return None
  if proposal == "simhash":
    return sa.predictors.simhash(bits=1024)
  if proposal == "spotlight":
    return sa.predictors.spotlight(hash_params)
  raise ValueError(f"unknown proposal {proposal!r}: uniform, simhash or spotlight")


def _window(c: Context) -> dict:
  return dict(sinks=c.sinks, local=c.local)


def _dense(c: Context) -> sa.Estimator:
  return sa.dense()


def _streaming(c: Context) -> sa.Estimator:
  return sa.streaming(**_window(c))


def _topk(c: Context, **settings) -> sa.Estimator:
  return sa.topk(**settings, **_window(c))


def _topp(c: Context, p: float) -> sa.Estimator:
  return sa.topp(p)  # reads every key: no exact window


def _magicpig(c: Context, **settings) -> sa.Estimator:
  return sa.magicpig(**settings, **_window(c))


def _spotlight(c: Context, **settings) -> sa.Estimator:
  return sa.spotlight(c.hash_params, **settings, **_window(c))


def _vattention(c: Context, **settings) -> sa.Estimator:
  return sa.vattention(c.epsilon, c.delta, **settings, **_window(c))


def _vattention_importance(c: Context, proposal: str, **settings) -> sa.Estimator:
  return sa.vattention_importance(c.epsilon, c.delta, density=c.density,
                                  proposal=proposal_codes(proposal, c.hash_params),
                                  **settings, **_window(c))


def _table(*methods: Method) -> dict[str, Method]:
  return {m.name: m for m in methods}


# The evaluation's rows, in its table's order. MagicPIG keeps every candidate
# (max_selected = 1): at head dim 32 collisions are frequent, and a cap would drop tokens.
EVAL = _table(
    Method("dense", "dense", {}, _dense),
    Method("streaming", "streaming", {}, _streaming),
    Method("topk 2% (oracle)", "topk", {"fraction": ORACLE_FRACTION}, _topk),
    Method("topp 0.9 (oracle)", "topp", {"p": 0.9}, _topp),
    Method("magicpig K=10 L=150", "magicpig", {"K": 10, "L": 150, "max_selected": 1.0},
           _magicpig),
    Method("magicpig K=8 L=75", "magicpig", {"K": 8, "L": 75, "max_selected": 1.0}, _magicpig),
    Method("vattention e=d=0.05", "vattention", {"guarantee": "output"}, _vattention),
    Method("vattention simhash e=d=0.05", "vattention_importance",
           {"proposal": "simhash", "guarantee": "output"}, _vattention_importance),
    Method("vattention spotlight e=d=0.05", "vattention_importance",
           {"proposal": "spotlight", "guarantee": "output"}, _vattention_importance,
           hash_heads="trained"),
    Method("vattention spotlight e=d=0.05 slice=512", "vattention_importance",
           {"proposal": "spotlight", "guarantee": "output", "certain_slice": 512},
           _vattention_importance, hash_heads="trained"),
    Method("spotlight 2% (trained)", "spotlight", {"fraction": ORACLE_FRACTION}, _spotlight,
           hash_heads="trained"),
    Method("linear hash 2% (untrained)", "spotlight", {"fraction": ORACLE_FRACTION},
           _spotlight, hash_heads="untrained"),
)

# The vAttention rows of the equal-density table, built with ``Context(density=d)``: the
# uniform residual, the proposals unbiased, and the proposals with ``unbiased=False``
# (``least-error``: a head may keep its top part alone).
EQUAL_DENSITY = _table(
    Method("vattention uniform", "vattention_importance",
           {"proposal": "uniform", "guarantee": "output"}, _vattention_importance),
    Method("vattention simhash", "vattention_importance",
           {"proposal": "simhash", "guarantee": "output", "unbiased": True},
           _vattention_importance),
    Method("vattention spotlight", "vattention_importance",
           {"proposal": "spotlight", "guarantee": "output", "unbiased": True},
           _vattention_importance, hash_heads="trained"),
    Method("simhash least-error", "vattention_importance",
           {"proposal": "simhash", "guarantee": "output", "unbiased": False},
           _vattention_importance),
    Method("spotlight least-error", "vattention_importance",
           {"proposal": "spotlight", "guarantee": "output", "unbiased": False},
           _vattention_importance, hash_heads="trained"),
)

# The comparison's fixed rows (built with ``Context(epsilon=0.05, delta=0.05)``), apart from
# dense and streaming; its matched-density rows follow MagicPIG's measured density.
COMPARE = _table(
    Method("magicpig K=10 L=150", "magicpig", {"K": 10, "L": 150}, _magicpig),
    Method("magicpig K=8 L=75", "magicpig", {"K": 8, "L": 75}, _magicpig),
    Method("topp p=0.9 (oracle)", "topp", {"p": 0.9}, _topp),
    Method("vattention denominator e=d=0.05", "vattention", {"guarantee": "denominator"},
           _vattention),
    Method("vattention output e=d=0.05", "vattention", {"guarantee": "output"}, _vattention),
    Method("spotlight (trained) 2%", "spotlight", {}, _spotlight, hash_heads="trained"),
    Method("linear hash (same bits, untrained)", "spotlight", {}, _spotlight,
           hash_heads="untrained"),
)


def lookup(table: dict[str, Method], name: str) -> Method:
  try:
    return table[name]
  except KeyError:
    raise ValueError(f"unknown method {name!r}; choose from {list(table)}") from None
