"""DeSupCon.ipynb runs top to bottom with PRESET = "quick" and fails on any cell error."""

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "DeSupCon.ipynb"


def test_notebook_is_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    first = code[0].source
    for setting in ("PRESET", "FORCE_RETRAIN", "FORCE_RETRAIN_BANK_ABLATION", "SEEDS", "OUTPUT_DIR"):
        assert f"{setting} =" in first


@pytest.mark.notebook
def test_notebook_runs_top_to_bottom_on_the_quick_preset(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'PRESET = "paper"' in first.source and 'OUTPUT_DIR = "."' in first.source
    first.source = (first.source.replace('PRESET = "paper"', 'PRESET = "quick"')
                    .replace('OUTPUT_DIR = "."', f'OUTPUT_DIR = {str(tmp_path)!r}'))
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(NOTEBOOK.parent) + (os.pathsep + env_path if env_path else "")
    try:
        client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert (tmp_path / "json_results" / "results.md").is_file()
    assert list((tmp_path / "plots").glob("sweep_alpha_*.png"))
    assert len(list((tmp_path / "pth_models").glob("student_*.pth"))) == 17
