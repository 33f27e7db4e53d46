"""Spotlight Attention: retrieve by learned hash codes, attend exactly over the top tokens.

Keys are hashed once (``init``) or as they arrive (``append``) into ``D``-bit codes by the
learned hash heads (``sparse_attn.hash_heads``); a decode query of each KV head's group is
hashed with the same head, every cached token is scored by Hamming similarity summed over
the group (popcount over packed words: ``D / 8`` bytes read per token instead of the key's
``2 D`` or ``4 D``), and the top ``max(min(n, min_tokens), ceil(fraction * n))`` tokens are
attended exactly, shared by the group. Biased like any top-k method; its quality is the
overlap (IoU) of its top set with the exact one, which training raises.
"""

from __future__ import annotations

from sparse_attn import predictors
from sparse_attn.topk import topk
from sparse_attn.types import Estimator, configured


@configured
def spotlight(params: dict, fraction: float = 0.02, min_tokens: int = 20, sinks: int = 0,
              local: int = 0) -> Estimator:
  """Spotlight estimator: ``sa.topk`` with the Spotlight predictor and its keep rule.

  Args:
    params: hash-head parameters of this layer (``sa.hash_heads.init_params``, trained with
      ``sa.train.fit_hash_heads``).
    fraction: fraction of the valid tokens kept.
    min_tokens: keep at least ``min(n, min_tokens)`` tokens.
    sinks, local: an optional exact window kept on top of the retrieved tokens.

  Returns:
    An ``Estimator`` whose index holds the parameters and the packed key codes. Draws
    nothing: ``init`` and ``attend`` ignore their optional ``key``. ``stats``: ``selected``,
    ``valid``, ``read_all_keys`` (False).
  """
  return topk(fraction=fraction, min_tokens=min_tokens, sinks=sinks, local=local,
              predictor=predictors.spotlight(params))
