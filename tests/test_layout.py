"""The installed packages are a library: imports flow ``models -> sparse_attn ->
pallas_kernels``, none imports ``argparse`` or ``benchmarks``, and no module is over 400
lines."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 400
# Package -> the top-level names its modules must not import.
FORBIDDEN = {
    "models": {"argparse", "benchmarks"},
    "sparse_attn": {"argparse", "benchmarks", "models"},
    "pallas_kernels": {"argparse", "benchmarks", "models", "sparse_attn"},
}
MODULES = sorted(path for package in FORBIDDEN for path in (ROOT / package).rglob("*.py"))


def imported(source: str) -> set[str]:
  """Top-level names of every module ``source`` imports (anywhere, not only at the top)."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split(".")[0])
  return names


def violations(package: str, source: str) -> set[str]:
  return imported(source) & FORBIDDEN[package]


def test_the_checker_catches_each_kind_of_import():
  source = ("import os\nimport argparse as ap\n"
            "def f():\n  from models.llama import Llama\n  import benchmarks.harness\n"
            "from . import sibling\nfrom sparse_attn import topk\n")
  assert imported(source) == {"os", "argparse", "models", "benchmarks", "sparse_attn"}
  assert violations("models", source) == {"argparse", "benchmarks"}
  assert violations("sparse_attn", source) == {"argparse", "benchmarks", "models"}
  assert violations("pallas_kernels", source) == {"argparse", "benchmarks", "models",
                                                  "sparse_attn"}
  assert violations("pallas_kernels", "import jax\nfrom pallas_kernels import backend\n") == set()


def test_every_package_has_modules():
  for package in FORBIDDEN:
    assert any(p.is_relative_to(ROOT / package) for p in MODULES), package


def sources() -> dict[str, str]:
  return {str(p.relative_to(ROOT)): p.read_text() for p in MODULES}


def test_library_imports_flow_one_way():
  bad = {name: sorted(violations(name.split("/")[0], text)) for name, text in sources().items()}
  assert not {name: v for name, v in bad.items() if v}, "imports against the flow"


def over_limit(texts: dict[str, str]) -> dict[str, int]:
  counts = {name: len(text.splitlines()) for name, text in texts.items()}
  return {name: n for name, n in counts.items() if n > MAX_LINES}


def test_no_library_module_is_over_400_lines():
  assert over_limit({"ok.py": "x = 1\n" * 400, "long.py": "x = 1\n" * 401}) == {"long.py": 401}
  long = over_limit(sources())
  assert not long, f"over {MAX_LINES} lines: {long}"
