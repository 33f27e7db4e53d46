"""The arrays every estimator shares: the KV cache, the result, the estimator triple.

Shapes: batch ``B``, query heads ``Hq``, KV heads ``Hkv`` (``Hq % Hkv == 0``, GQA group
``G = Hq // Hkv``), static capacity ``S``, head dim ``D``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable, Hashable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


class KVCache(NamedTuple):
  """A preallocated decode cache.

  Attributes:
    keys: ``[B, Hkv, S, D]`` post-RoPE keys; rows at or past ``length`` are ignored.
    values: ``[B, Hkv, S, D]``.
    length: ``int32 [B]``, the number of valid tokens of each batch row (ragged).
  """

  keys: jax.Array
  values: jax.Array
  length: jax.Array


class AttentionResult(NamedTuple):
  """An (estimated) attention output that can be merged with others.

  Attributes:
    out: ``[B, Hq, D]`` in the query's dtype.
    lse: ``float32 [B, Hq]``, log of the (estimated) softmax denominator
      ``sum_i exp(q.k_i / sqrt(D))``; ``-inf`` where no token entered.
    density: ``float32 [B, Hq]``, the fraction of valid tokens that entered the estimate.
    stats: dict of ``[B, Hq]`` arrays (diagnostics; see each estimator).
      Every estimator reports ``selected`` (tokens that entered), ``valid`` (valid tokens,
      at most ``S``), so that ``merge`` can recompute ``density``, and ``over_capacity``
      (bool: a traced ``length > S``, clamped to ``S``; eagerly it raises).

  Edges, the same for every estimator, eagerly and under ``jit``: a row with ``length == 0``
  gives ``out = 0``, ``lse = -inf``, ``density = 0``. A valid token whose key has a NaN or
  inf entry gives ``out = NaN`` and ``lse = NaN`` on every query head of its KV head
  (estimators that score or index every key flag it wherever it is; ``streaming`` and
  ``uniform``, which read only the rows they attend, when they read it); the other heads are
  unaffected, and ``out`` and ``lse`` are NaN together or not at all.
  """

  out: jax.Array
  lse: jax.Array
  density: jax.Array
  stats: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Estimator:
  """An attention estimator as a triple of pure functions (optax style).

  ``index = init(cache, key=None)`` builds the estimator's state at prefill;
  ``index = append(index, cache)`` extends it after new tokens were written to ``cache``;
  ``res = attend(q, cache, index, key=None)`` returns an ``AttentionResult``.
  Configuration lives in the factory's closure; arrays live in ``index``.

  Keys: both are optional; an estimator that draws randomness at that step raises a
  ``ValueError`` naming ``key`` when it is missing. Each factory's docstring says which key
  it consumes (init's: hash planes; attend's: samples).

  Identity: a factory's estimator carries its ``config`` (the factory and its arguments), and
  two estimators with equal configs compare and hash equal, so ``jax.jit`` with one as a
  static argument compiles once per configuration (``configured``). Arrays among the
  arguments (hash-head parameters) count by identity, not by value. An estimator built by
  hand, or changed with ``_replace``, has no config and equals only itself.
  """

  init: Callable[[KVCache, jax.Array], Any]
  append: Callable[[Any, KVCache], Any]
  attend: Callable[[jax.Array, KVCache, Any, jax.Array], AttentionResult]
  config: Hashable | None = None

  def __eq__(self, other):
    if self.config is None or not isinstance(other, Estimator) or other.config is None:
      return self is other
    return self.config == other.config

  def __ne__(self, other):
    return not self == other

  def __hash__(self):
    return id(self) if self.config is None else hash(self.config)

  def _replace(self, **fields) -> Estimator:  # a changed estimator is no longer its factory's
    return dataclasses.replace(self, **{"config": None, **fields})


class _ByIdentity:
  """An unhashable argument (arrays, dicts of arrays) in a config: equal only to itself."""

  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __eq__(self, other):
    return isinstance(other, _ByIdentity) and other.value is self.value

  def __hash__(self):
    return id(self.value)

  def __repr__(self):
    return f"<{type(self.value).__name__} at {id(self.value):#x}>"


def _config_value(value):
  try:
    hash(value)
  except TypeError:
    return _ByIdentity(value)
  return value


_BUILT: collections.OrderedDict = collections.OrderedDict()
_MAX_BUILT = 256  # estimators kept for reuse (least recently built dropped first)


def configured(factory: Callable[..., Estimator]) -> Callable[..., Estimator]:
  """Decorates an estimator factory so that equal arguments give the same ``Estimator``.

  The arguments, bound to the signature with defaults applied, form the estimator's
  ``config``; a repeated call returns the estimator already built (its jitted functions, and
  so their compilations, are shared), and any two built from equal configs compare equal.
  """
  signature = inspect.signature(factory)
  name = f"{factory.__module__}.{factory.__qualname__}"
  var_keyword = next((p.name for p in signature.parameters.values()
                      if p.kind is inspect.Parameter.VAR_KEYWORD), None)

  @functools.wraps(factory)
  def build(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    config = (name,) + tuple((arg, _config_value(value)) for arg, value in sorted(
        bound.arguments.items() if var_keyword is None else {
            **bound.arguments, **bound.arguments.pop(var_keyword)}.items()))
    built = _BUILT.get(config)
    if built is None:
      built = factory(*bound.args, **bound.kwargs)._replace(config=config)
      _BUILT[config] = built
      while len(_BUILT) > _MAX_BUILT:
        _BUILT.popitem(last=False)
    else:
      _BUILT.move_to_end(config)
    return built

  return build


def no_index(cache: KVCache, key: jax.Array | None = None) -> tuple[()]:
  """``init`` of an estimator that keeps no index (dense, streaming, the oracles): checks
  ``cache`` like every ``init``, draws nothing."""
  del key
  check_cache(cache)
  return ()


def keep_index(index: Any, cache: KVCache) -> Any:
  """``append`` of an estimator whose index does not depend on the cache's length."""
  del cache
  return index


def _dtype_name(x) -> str:
  return jnp.dtype(x.dtype).name


def check_cache(cache: KVCache, name: str = "cache") -> None:
  """Raises ``ValueError`` (at trace time) unless ``cache`` is a well-formed KVCache."""
  if not isinstance(cache, KVCache):
    raise ValueError(f"{name} must be a sparse_attn.KVCache, got {type(cache).__name__}")
  k, v, n = cache
  if k.ndim != 4:
    raise ValueError(f"{name}.keys must have shape [B, Hkv, S, D], got shape {tuple(k.shape)}")
  if v.shape != k.shape:
    raise ValueError(
        f"{name}.values must have the keys' shape [B, Hkv, S, D] = {tuple(k.shape)}, "
        f"got {tuple(v.shape)}")
  for arr, what in ((k, "keys"), (v, "values")):
    if jnp.dtype(arr.dtype) not in FLOAT_DTYPES:
      raise ValueError(
          f"{name}.{what} must be bfloat16, float16 or float32, got {_dtype_name(arr)}")
  batch, _, capacity, head_dim = k.shape
  if capacity == 0:
    raise ValueError(f"{name} is empty: capacity S = keys.shape[2] must be > 0")
  if head_dim == 0:
    raise ValueError(f"{name}.keys has head dim D = 0; expected D > 0")
  if n.shape != (batch,):
    raise ValueError(f"{name}.length must have shape [B] = ({batch},), got {tuple(n.shape)}")
  if not jnp.issubdtype(n.dtype, jnp.integer):
    raise ValueError(f"{name}.length must be an integer array (int32), got {_dtype_name(n)}")
  try:
    lengths = np.asarray(n)  # concrete lengths are checked now; traced ones cannot be
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    lengths = None
  if lengths is not None:
    if lengths.min() < 0 or lengths.max() > capacity:
      raise ValueError(
          f"{name}.length must lie in [0, S={capacity}] for every batch row (0: an empty row, "
          f"valid), got {lengths.tolist()}")


def within_capacity(cache: KVCache) -> tuple[KVCache, jax.Array]:
  """``(cache, over)``: ``cache`` with ``length`` clamped to ``[0, S]``, and ``bool [B]``, True
  where a row's ``length`` exceeded the capacity ``S``.

  What every estimator does with a traced ``length > S`` (eagerly, ``check_cache`` raises):
  it attends over the ``S`` stored tokens and reports ``stats["over_capacity"]``, rather than
  read past the cache or loop for tokens that can never arrive.
  """
  capacity = cache.keys.shape[2]
  over = cache.length > capacity
  return cache._replace(length=jnp.clip(cache.length, 0, capacity).astype(cache.length.dtype)), over


def check_query(q: jax.Array, cache: KVCache, name: str = "q") -> int:
  """Validates a decode query against ``cache``; returns the GQA group size ``G``."""
  check_cache(cache)
  batch, num_kv_heads, _, head_dim = cache.keys.shape
  if q.ndim != 3:
    raise ValueError(f"{name} must have shape [B, Hq, D], got shape {tuple(q.shape)}")
  if jnp.dtype(q.dtype) not in FLOAT_DTYPES:
    raise ValueError(f"{name} must be bfloat16, float16 or float32, got {_dtype_name(q)}")
  if q.shape[0] != batch or q.shape[2] != head_dim:
    raise ValueError(
        f"{name} must have shape [B={batch}, Hq, D={head_dim}] to match the cache, "
        f"got {tuple(q.shape)}")
  if q.shape[1] % num_kv_heads:
    raise ValueError(
        f"{name} has Hq = {q.shape[1]} query heads, which must be a multiple of the cache's "
        f"Hkv = {num_kv_heads} KV heads (GQA)")
  return q.shape[1] // num_kv_heads


@contextlib.contextmanager
def donated_index_hint(name: str = "index") -> Iterator[None]:
  """Re-raises JAX's "Array has been deleted" (a ``RuntimeError``, or a ``ValueError`` when
  the buffer reaches an executable) with the likely cause: ``append`` donates its ``index``
  (updates it in place), so only the index it returns may be used afterwards."""
  try:
    yield
  except (RuntimeError, ValueError) as error:
    if "deleted" not in str(error):
      raise
    kind = ValueError if isinstance(error, ValueError) else RuntimeError
    raise kind(
        f"{str(error).rstrip('.')}. An estimator's append donates its {name} (its buffers "
        f"are updated in place): after `{name} = est.append({name}, cache)` use only the "
        f"returned {name}, never the one passed in") from error


def check_key(key: jax.Array | None, name: str = "key", purpose: str = "") -> None:
  """Raises ``ValueError`` unless ``key`` is a single JAX PRNG key; ``purpose`` says what the
  estimator draws from it (for the message when it is missing)."""
  if key is None:
    why = f" ({purpose})" if purpose else ""
    raise ValueError(f"{name} must be a jax.random key{why}, got None")
  shape = key.shape if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key.shape[:-1]
  if shape != ():
    raise ValueError(f"{name} must be a single jax.random key, got shape {tuple(key.shape)}")
