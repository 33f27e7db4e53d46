"""The one place that knows which backend runs a kernel, and how.

* CPU: Pallas runs only in interpret mode (``interpret=True``), which is slow; the estimators
  use each kernel's ``*_reference`` twin there instead.
* GPU: ``pallas_call`` with the Triton lowering, chosen through its compiler params. JAX 0.11
  deprecates that lowering in favour of Mosaic GPU (``plgpu.kernel``); a Mosaic GPU path can be
  added here without touching the kernel bodies, which use only ``jnp``/``lax`` ops and
  ``load``/``store`` below (the one Triton-specific need: masks at the array's edge).
* TPU: ``pallas_call`` lowered through Mosaic; kernels whose memory pattern differs there
  (row fetches by DMA) have a TPU variant beside them, picked by their wrapper. Lowered
  (``target``, ``jax.export``) and checked in TPU interpret mode, not run on a TPU.

Kernels are used by default only on backends in ``VERIFIED``: those where a device run has
checked the compiled kernels against their references. Set ``SPARSE_ATTN_PALLAS=1`` to use
them anyway (or ``=0`` to never use them).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Backends whose compiled kernels matched their references on a device run: "gpu" on an
# H100 with jax 0.11.2 (benchmarks/results/2026-11-26_h100_device_kernels.json). TPU is not.
VERIFIED: frozenset[str] = frozenset({"gpu"})


_TARGETS: list[str] = []  # set by `target`


def platform() -> str:
  """``"cpu"``, ``"gpu"`` or ``"tpu"``: the default backend, or the one ``target`` names."""
  return _TARGETS[-1] if _TARGETS else jax.default_backend()


@contextlib.contextmanager
def target(name: str) -> Iterator[None]:
  """Makes every kernel choice read ``name`` (``"gpu"`` or ``"tpu"``) as the platform, to
  lower for a backend this machine does not have, e.g. from a CPU::

    with backend.target("tpu"):
      jax.export.export(jax.jit(step), platforms=["tpu"])(*args)

  Tracing must happen inside the block. Compiled and traced functions are dropped on entry
  and exit (``jax.clear_caches``), so nothing traced for one platform is reused for the
  other. Kernels are used as ``use_kernels`` says for ``name`` (``SPARSE_ATTN_PALLAS=1`` for
  a backend outside ``VERIFIED``).
  """
  if name not in ("cpu", "gpu", "tpu"):
    raise ValueError(f"name must be 'cpu', 'gpu' or 'tpu', got {name!r}")
  jax.clear_caches()
  _TARGETS.append(name)
  try:
    yield
  finally:
    _TARGETS.pop()
    jax.clear_caches()


# Kernels written since the last device run: lowered for Triton and equal to their
# references in interpret mode, but not yet compiled on a device of VERIFIED. The
# estimators call them only where SPARSE_ATTN_PALLAS=1 asks for every kernel.
PENDING: frozenset[str] = frozenset({"kept_positions", "poisson_positions",
                                     "hamming_similarity", "hamming_counted"})


def use_kernels(name: str | None = None) -> bool:
  """Whether the estimators should call the Pallas kernels (else the jnp references);
  with ``name``, that kernel (``PENDING`` ones only when asked for explicitly)."""
  flag = os.environ.get("SPARSE_ATTN_PALLAS")
  if flag is not None:
    return flag not in ("", "0", "false", "False")
  return platform() in VERIFIED and name not in PENDING


def magicpig_retrieval() -> str:
  """How MagicPIG finds a query's collisions here: ``"tables"`` (bucketed tables: a sort per
  rebuild and scatter-adds per query, which XLA:CPU runs well) on a CPU, ``"scan"`` (one
  pass over every packed code, a Pallas kernel) on accelerators, where sorts and scatters
  are slow and a streaming pass is what the hardware does best."""
  return "tables" if platform() == "cpu" else "scan"


def resolve_interpret(interpret):
  """``None`` means: interpret on CPU (the only way Pallas runs there), compile elsewhere.
  An interpret-mode parameter object (``pltpu.InterpretParams``: TPU interpret mode, which
  simulates VMEM, SMEM and DMAs on the CPU) is passed through to ``pl.pallas_call``."""
  if interpret is None:
    return platform() == "cpu"
  return interpret if not isinstance(interpret, (bool, int)) else bool(interpret)


def compiler_params():
  """Per-backend compiler parameters for a compiled (not interpreted) ``pallas_call``."""
  if platform() == "gpu":
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=2)
  if platform() == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams()
  return None


def pallas_call(kernel, *, out_shape, grid, in_specs, out_specs, interpret: bool | None,
                name: str):
  """``pl.pallas_call`` with the backend's lowering chosen here."""
  interpret = resolve_interpret(interpret)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                        out_specs=out_specs, interpret=interpret, name=name,
                        compiler_params=None if interpret else compiler_params())



def masks_edges(interpret: bool | None) -> bool:
  """Whether a kernel must mask the part of a partial last block that lies past the array.

  The Triton lowering does not clip blocks at the array's edge: unmasked, a partial last
  block reads and writes past the end (measured on an H100: ``table_match_counts`` wrote
  into the next head's row). Interpret mode and Mosaic (TPU) pad partial blocks themselves.
  """
  return not resolve_interpret(interpret) and platform() == "gpu"


def load(ref, *, mask: jax.Array, other, masked: bool) -> jax.Array:
  """``ref[...]``, and where ``masked``, ``other`` wherever ``mask`` is False, without
  reading there."""
  if not masked:
    return ref[...]
  from jax.experimental.pallas import triton as pltriton
  return pltriton.load(ref, mask=mask, other=jnp.full(mask.shape, other, ref.dtype))


def store(ref, value: jax.Array, *, mask: jax.Array, masked: bool) -> None:
  """``ref[...] = value``, and where ``masked``, only where ``mask`` holds."""
  if not masked:
    ref[...] = value
    return
  from jax.experimental.pallas import triton as pltriton
  pltriton.store(ref, value, mask=mask)


def tpu_tile(block: int, size: int, multiple: int) -> int:
  """A block of about ``block`` along a dimension of ``size`` that Mosaic (TPU) accepts as
  one of a block's last two dimensions: the whole dimension, or a multiple of ``multiple``
  (128 for the lane dimension, 8 for the sublane one)."""
  if block >= size:
    return size
  tile = -(-block // multiple) * multiple
  return size if tile >= size else tile


def tpu_scalars(block_shape, index_map):
  """A ``BlockSpec`` in SMEM, for the small blocks a kernel reads as scalars (lengths,
  thresholds, query codes): Mosaic reads scalars from SMEM, and a block whose array ends
  in ``[..., 1, 1]`` meets its tiling rule whatever the leading dimensions."""
  from jax.experimental.pallas import tpu as pltpu
  return pl.BlockSpec(block_shape, index_map, memory_space=pltpu.SMEM)


def is_tpu_interpret(interpret) -> bool:
  """Whether ``interpret`` asks for Pallas' TPU interpret mode (a ``pltpu.InterpretParams``):
  the TPU variants run there on a CPU, with their DMAs and semaphores simulated."""
  from jax.experimental.pallas import tpu as pltpu
  return isinstance(interpret, pltpu.InterpretParams)


def mosaic_layout(interpret) -> bool:
  """Whether a kernel takes its TPU (Mosaic) layout or variant: on a TPU (or a ``target``
  naming one), and in TPU interpret mode on any machine. The one test every wrapper uses."""
  return platform() == "tpu" or is_tpu_interpret(interpret)


def tpu_pallas_call(kernel, *, out_shape, grid_spec, dimension_semantics, interpret, name: str):
  """``pl.pallas_call`` for a TPU (Mosaic) kernel with a ``pltpu.PrefetchScalarGridSpec``.

  ``interpret``: a ``pltpu.InterpretParams`` is passed through; ``True`` (or ``None`` on a
  CPU) means TPU interpret mode with default params, since the TPU variants use DMAs and
  semaphores that only it simulates; otherwise the kernel is compiled, with
  ``compiler_params()`` given the grid's ``dimension_semantics`` (which axes may run in
  parallel on a megacore chip). Interpreted calls take no compiler params.
  """
  import dataclasses
  from jax.experimental.pallas import tpu as pltpu
  if not is_tpu_interpret(interpret):
    interpret = pltpu.InterpretParams() if resolve_interpret(interpret) else False
  params = None
  if interpret is False:
    params = compiler_params()
    if isinstance(params, pltpu.CompilerParams):
      params = dataclasses.replace(params, dimension_semantics=tuple(dimension_semantics))
  return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=interpret,
                        name=name, compiler_params=params)
