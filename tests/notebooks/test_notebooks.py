"""The notebooks in ``notebooks/``: each runs end to end in its small mode (as CI runs it),
shows what it is for, and its ``.ipynb`` is its paired ``.py`` (jupytext), without outputs.

The ``.py`` files (jupytext "percent" format) are the source; regenerate the ``.ipynb`` with
``jupytext --sync notebooks/*.py``. With the pretrained weights in ``../shared/weights`` the
notebooks run the models; without them they must say so and skip the model cells cleanly,
which is what is checked then.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, WEIGHTS_DIR

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))
HAVE_WEIGHTS = (WEIGHTS_DIR / "blast-ct-v1" / "model_1.pt").is_file()
SKIPPED = "Skipped the model cells"

#: Text each notebook's outputs hold when the models ran (its point), and when they did not.
SHOWS: dict[str, tuple[str, ...]] = {
    # the findings table, and the routing table (which needs no weights)
    "01_quickstart": ("intracranial_haemorrhage", "blast-ct-v1"),
    # the metrics table
    "02_evaluate": ("auroc", "sensitivity", "demonstration only, nothing clinical"),
    # the decision on the registry entry, and the version serving picks
    "03_finetune_register_promote": ("promotion.decision", "+registry.1"),
}
SHOWS_WITHOUT_WEIGHTS: dict[str, tuple[str, ...]] = {
    "01_quickstart": (SKIPPED, "blast-ct-v1"),
    "02_evaluate": (SKIPPED, "intracranial_haemorrhage"),
    "03_finetune_register_promote": (SKIPPED, "frozen test set"),
}
#: PNG outputs at least (key image; ROC, reliability, detection limit, volumes).
IMAGES = {"01_quickstart": 1, "02_evaluate": 3, "03_finetune_register_promote": 0}


def _cell_key(cell: Any) -> tuple[str, str, tuple[str, ...]]:
    return (cell.cell_type, cell.source.strip(), tuple(cell.metadata.get("tags", ())))


def _outputs(nb: Any) -> tuple[str, int]:
    """All text the executed notebook shows, and its number of PNG outputs."""
    texts: list[str] = []
    pngs = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            data = out.get("data", {})
            for mime in ("text/plain", "text/html", "text/markdown"):
                if mime in data:
                    texts.append(str(data[mime]))
            pngs += "image/png" in data
    return "\n".join(texts), pngs


def test_there_are_notebooks_each_with_its_pair() -> None:
    assert [p.stem for p in NOTEBOOKS] == sorted(SHOWS)
    assert (NOTEBOOKS_DIR / "jupytext.toml").is_file()
    for py in NOTEBOOKS:
        assert py.with_suffix(".ipynb").is_file(), f"{py.name} has no .ipynb (jupytext --sync)"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_ipynb_is_in_sync_with_its_py_and_has_no_outputs(py: Path) -> None:
    source = jupytext.read(py)
    paired = jupytext.read(py.with_suffix(".ipynb"))
    stale = f"{py.with_suffix('.ipynb').name} differs from {py.name}: jupytext --sync {py}"
    assert [_cell_key(c) for c in paired.cells] == [_cell_key(c) for c in source.cells], stale
    assert paired.metadata.get("kernelspec", {}).get("name") == "python3"
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit without outputs"
    # Every notebook starts with its parameters cell, which reads the small-mode switch.
    first = next(c for c in source.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", ())
    assert 'os.environ.get("TRIAGE_NOTEBOOK_SMALL") == "1"' in first.source


@pytest.mark.slow
@pytest.mark.parametrize("py", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_small_mode(
    py: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel inherits this environment: the small mode, the weights when present, and a
    # temporary folder of its own (the notebooks write under tempfile.mkdtemp()).
    for key in [k for k in os.environ if k.startswith("TRIAGE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TRIAGE_NOTEBOOK_SMALL", "1")
    if HAVE_WEIGHTS:
        monkeypatch.setenv("TRIAGE_MODEL_MIRROR", str(WEIGHTS_DIR))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = jupytext.read(py)
    client = nbclient.NotebookClient(
        nb,
        timeout=900,  # per cell; a model run takes 30-70 s per study on 2 CPU cores
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError with the traceback when a cell fails
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    text, pngs = _outputs(nb)
    expected = SHOWS if HAVE_WEIGHTS else SHOWS_WITHOUT_WEIGHTS
    for fragment in expected[py.stem]:
        assert fragment in text, f"{py.name}: no output shows {fragment!r}"
    if HAVE_WEIGHTS:
        assert SKIPPED not in text
        assert pngs >= IMAGES[py.stem], f"{py.name}: {pngs} images"
    # Small mode cleans up after itself.
    assert not list(tmp_path.glob("triage-*"))
