"""``benchmarks.model_decode_loop`` at tiny sizes on the CPU: the report the device run will
write (dense and Spotlight in one compiled loop each), and the layers-that-fit arithmetic
(``--layers auto`` with a pretended device memory limit)."""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import pytest

from benchmarks import model_decode_loop as mdl

GIB = 2 ** 30


def test_small_run_reports_every_field(tmp_path):
  path = tmp_path / "e2e.json"
  assert mdl.main(["--small", "--methods", "dense,spotlight", "--json", str(path)]) == 0
  report = json.loads(path.read_text())
  assert report["layers"] == 1 and report["batch"] == 2 and report["length"] == 512
  assert report["weights_bytes"] == (report["sizes"]["weights_fixed"]
                                     + report["sizes"]["weights_per_layer"])
  dense, spot = report["methods"]["dense"], report["methods"]["spotlight"]
  for row in (dense, spot):
    assert row["finite"] and row["step_ms"] > 0 and row["compile_s"] > 0
    assert abs(row["tokens_per_s"] - 2 * 2 / (row["step_ms"] * 2 / 1e3)) < 1e-6 * row[
        "tokens_per_s"]
    assert row["cache_bytes"] == report["sizes"]["cache_per_layer"]
    assert row["cache_copies_in_hlo"] == 0  # the carried cache is updated in place
    # One warm-up call and two timed calls of two steps each, one token per step.
    assert row["final_length"] == 512 + 3 * 2 and len(row["loop_s"]) == 2
  assert dense["density"] == 1.0 and dense["index_bytes"] == 0
  assert 0 < spot["density"] < 0.1 and spot["index_bytes"] == report["sizes"][
      "index_per_layer"]["spotlight"]
  assert dense["speedup_vs_dense"] == 1.0 and spot["speedup_vs_dense"] > 0


def test_layers_that_fit_llama_8b_at_128k_batch_8():
  shapes = argparse.Namespace(vocab=128256, intermediate=14336, hidden=4096)
  capacity = 131072 + 32 * 6 + 64
  size = mdl.sizes(mdl.model_config(1, shapes), ["dense", "spotlight"], 8, capacity,
                   jnp.bfloat16)
  assert size["cache_per_layer"] == 2 * 8 * 8 * capacity * 128 * 2 + 8 * 4  # K, V, lengths
  assert size["weights_per_layer"] == 2 * (4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336
                                           + 2 * 4096)
  assert size["weights_fixed"] == 2 * (2 * 128256 * 4096 + 4096)
  # An H100 (78 GiB, 95% to XLA) holds 14 layers with 6 GiB to spare; an H200 27.
  assert mdl.layers_that_fit(int(0.95 * 78 * GIB), size, 6 * GIB) == 14
  assert mdl.layers_that_fit(int(0.95 * 139 * GIB), size, 6 * GIB) == 27
  assert mdl.layers_that_fit(GIB, size, 0) == 0


def test_layers_auto_takes_the_most_that_fit(tmp_path, monkeypatch):
  small = ["--small", "--steps", "1", "--repeats", "1", "--methods", "dense,spotlight"]
  shapes = argparse.Namespace(vocab=512, intermediate=512, hidden=256)  # --small's
  sizes = mdl.sizes(mdl.model_config(1, shapes), ["dense", "spotlight"], 2, 512 + 2 + 64,
                    jnp.bfloat16)
  per_layer = (sizes["weights_per_layer"] + sizes["cache_per_layer"]
               + sizes["index_per_layer"]["spotlight"])
  limit = sizes["weights_fixed"] + 3 * per_layer + GIB // 1000 + per_layer // 2
  monkeypatch.setattr(mdl, "memory_stats", lambda: {"bytes_limit": limit})
  path = tmp_path / "auto.json"
  assert mdl.main(small + ["--layers", "auto", "--headroom-gib", "0.001", "--json",
                           str(path)]) == 0
  report = json.loads(path.read_text())
  assert report["layers"] == report["layers_that_fit"] == 3
  assert report["sizes"] == sizes and report["layers_arg"] == "auto"
  monkeypatch.setattr(mdl, "memory_stats", dict)  # a CPU reports no limit
  with pytest.raises(ValueError, match="auto"):
    mdl.main(small + ["--layers", "auto"])
