"""sparse-attn: sparse attention estimators for long-context LLM decoding in JAX.

Every estimator is a factory returning ``Estimator(init, append, attend)``::

  import sparse_attn as sa
  est = sa.magicpig(K=10, L=150)
  index = est.init(cache, key)          # at prefill (MagicPIG draws its planes from key)
  index = est.append(index, cache)      # after new tokens were written to cache
  res = est.attend(q, cache, index)     # res.out, res.lse, res.density, res.stats
  # key is optional in init and attend; estimators that draw there say so (ValueError).
"""

from sparse_attn import distributed, hash_heads, lsh, predictors
from sparse_attn import synthetic, train
from sparse_attn.attention import dense, dense_attention, merge
from sparse_attn.magicpig import MagicPigIndex, magicpig
from sparse_attn.sampling import uniform
from sparse_attn.spotlight import spotlight
from sparse_attn.streaming import streaming
from sparse_attn.topk import topk, topp
from sparse_attn.vattention import vattention
from sparse_attn.vattention_importance import vattention_importance
from sparse_attn.types import AttentionResult, Estimator, KVCache

__all__ = [
    "AttentionResult", "Estimator", "KVCache", "MagicPigIndex", "dense", "dense_attention",
    "distributed", "hash_heads", "lsh", "magicpig", "merge", "predictors",
    "spotlight", "streaming", "synthetic", "topk", "topp", "train", "uniform", "vattention",
    "vattention_importance",
]
