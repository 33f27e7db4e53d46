"""Sequence-sharded estimators on 8 simulated CPU devices, in their own process.

``--xla_force_host_platform_device_count=8`` must be set before JAX's backend starts, and
this pytest process has one device already: ``sharded_checks.py`` runs in a subprocess and
reports its measurements as JSON.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
  done = subprocess.run([sys.executable, str(ROOT / "tests/distributed/sharded_checks.py")],
                        env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_sharded_dense_equals_single_device(report):
  for local in (0, 64):
    r = report[f"dense local={local}"]
    assert r["out"] <= 1e-6 and r["lse"] <= 1e-5 and r["density"] == 0.0, r
  # Against float64 numpy the sharded merge is as accurate as one device.
  f64 = report["dense vs float64"]
  assert f64["sharded"] <= 2 * f64["single"] + 1e-7, f64


@pytest.mark.parametrize("name", ["streaming", "magicpig", "magicpig after append"])
def test_per_token_estimators_equal_single_device(report, name):
  r = report[name]
  assert r["out"] <= 1e-5 and r["lse"] <= 1e-5 and r["density"] <= 1e-6 and r["finite"], r


def test_sharded_topk_keeps_the_budget(report):
  # The top 2% of each device's tokens: the same number of tokens, not the same set.
  r = report["topk"]
  assert r["finite"] and r["density"] <= 0.01, r


def test_sharded_vattention_keeps_its_guarantee(report):
  # Failure rate of |D_hat - D| > eps D over 200 keys x 8 heads against delta + 3 standard
  # errors of a rate delta: a correct estimator exceeds that with probability about 0.1%.
  r = report["vattention coverage"]
  bound = r["delta"] + 3 * math.sqrt(r["delta"] * (1 - r["delta"]) / r["draws"])
  assert r["rate"] <= bound, r
  # The union bound is conservative: the split samples more than one device would.
  assert r["density"] >= r["single_device_density"], r


@pytest.mark.parametrize("name", ["dense", "magicpig"])
def test_generate_on_a_mesh_matches_one_device(report, name):
  r = report["generate"][name]
  assert r["same_tokens"] and r["density"] <= 1e-6, r


@pytest.mark.parametrize("case", ["dense batch", "dense heads", "magicpig batch",
                                  "magicpig heads"])
def test_batch_and_head_axes_shard_too(report, case):
  r = report["2-D meshes"][case]
  assert r["out"] <= 1e-5 and r["density"] <= 1e-6, r


@pytest.mark.parametrize("name", ["uniform", "spotlight", "topp"])
def test_every_estimator_runs_sharded(report, name):
  r = report["others"][name]
  assert r["finite"] and 0.0 < r["density_min"] <= r["density_max"] <= 1.0, r


@pytest.mark.parametrize("name", ["dense", "magicpig", "vattention"])
def test_sharded_empty_rows_and_capacity(report, name):
  for mode in ("eager", "jit"):
    assert report["edges"][f"{name} empty {mode}"]["ok"], report["edges"]
  r = report["edges"][f"{name} over capacity"]
  assert r["flag"] == [True, False] and r["out"] <= 1e-6, r
  if name != "vattention":
    assert report["edges"][f"{name} no key"]["out"] <= 1e-6, report["edges"]


def test_sharded_output_guarantee_is_refused(report):
  assert report["others"]["vattention output"]["refused"]
