"""Test configuration: strict numerics and a persistent compilation cache in the checkout."""

import os
import pathlib

import jax
import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Silent broadcasting and accidental dtype promotion fail loudly in tests (STYLE.md).
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# Compiled executables persist across runs (ignored by git; .ci/run sets the same path).
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
  """Drops JAX's in-memory compiled functions after each test module. One process holds
  every module's executables otherwise: the whole suite in one process segfaulted in XLA
  twice (at different tests, each passing alone), suspected to be the pile-up of
  executables (the Linux limit of 65,530 memory maps per process)."""
  yield
  jax.clear_caches()
