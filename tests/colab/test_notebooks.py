"""The tutorials in colab/: each .ipynb is its .py's jupytext conversion (outputs stripped),
opens with an "Open in Colab" badge and a Colab-only install cell, and runs top to bottom.

Execution uses the small sizes (``SPARSE_ATTN_SMALL=1``) and the Agg matplotlib backend, in
a temporary working directory; every PNG a notebook saves there must be a real image.
Regenerate a notebook after editing its source with ``jupytext --to ipynb colab/NAME.py``.
"""

from __future__ import annotations

import os
import pathlib

import jupytext
import matplotlib.image
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
COLAB = ROOT / "colab"
NAMES = sorted(p.stem for p in COLAB.glob("[0-9][0-9]_*.py"))
BADGE = ("https://colab.research.google.com/github/sparse-attn/sparse-attn/blob/main/colab/"
         "{name}.ipynb")


def test_the_five_tutorials_exist():
  assert NAMES == ["01_estimators", "02_verified_sampling", "03_flax_integration",
                   "04_train_hash_heads", "05_pallas_kernels"]
  for name in NAMES:
    assert (COLAB / f"{name}.ipynb").is_file(), f"{name}.ipynb is missing: run jupytext"


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_in_sync_with_py(name):
  expected = jupytext.read(COLAB / f"{name}.py")
  actual = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  nbformat.validate(actual)
  # Cell ids are random per conversion; everything else must match.
  strip = lambda nb: [(c.cell_type, c.source, dict(c.metadata)) for c in nb.cells]  # noqa: E731
  assert strip(actual) == strip(expected), (
      f"colab/{name}.ipynb differs from colab/{name}.py: run jupytext --to ipynb colab/{name}.py")
  assert actual.metadata.get("kernelspec") == expected.metadata.get("kernelspec")
  for cell in actual.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, "outputs must be stripped"


@pytest.mark.parametrize("name", NAMES)
def test_badge_and_colab_only_install_cell(name):
  cells = nbformat.read(COLAB / f"{name}.ipynb", as_version=4).cells
  assert cells[0].cell_type == "markdown"
  assert "colab-badge.svg" in cells[0].source and BADGE.format(name=name) in cells[0].source
  install = cells[1]
  assert install.cell_type == "code"
  assert 'if "google.colab" in sys.modules:' in install.source
  assert "https://github.com/sparse-attn/sparse-attn" in install.source


def test_readme_links_every_notebook():
  readme = (ROOT / "README.md").read_text()
  missing = [name for name in NAMES if f"colab/{name}.ipynb" not in readme]
  assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_saves_real_figures(name, tmp_path, monkeypatch):
  monkeypatch.setenv("SPARSE_ATTN_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The kernel imports the checkout's packages even without an editable install.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
  nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  # The kernel is this interpreter's (jupyter_client runs "python" as sys.executable).
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  pngs = sorted(tmp_path.glob("*.png"))
  assert pngs, f"{name} saved no figure"
  for png in pngs:
    assert png.stat().st_size > 1024, f"{png.name} is nearly empty"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and min(image.shape[:2]) >= 100, f"{png.name}: {image.shape}"
    assert image.std() > 0, f"{png.name} is blank"
