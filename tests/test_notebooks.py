"""Every teaching notebook runs top to bottom (nbclient) on a tiny random base with a few steps."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_five_lessons():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tiny_base_dir, tmp_path, monkeypatch):
    # The kernel inherits these: the tiny base stands in for the shipped one, a few steps each.
    monkeypatch.setenv("LORA_DIFFUSION_BASE", str(tiny_base_dir))
    monkeypatch.setenv("NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("LORA_DIFFUSION_DATA", raising=False)
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # Every lesson shows at least one plotly figure or a table, made by the library.
    rich = [o for o in outputs if o.get("output_type") in ("display_data", "execute_result")
            and ("application/vnd.plotly.v1+json" in o.get("data", {}) or "text/markdown" in o.get("data", {}))]
    assert rich, f"{path.name} showed no figure or table"
    # ... and checks values it computed: its check cells assert, and each one ran to its last line.
    checks = [cell for cell in notebook.cells if cell.cell_type == "code" and "# Check:" in cell.source]
    assert checks and all("assert " in cell.source for cell in checks), f"{path.name} has no check cell"
    for cell in checks:
        printed = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        assert "check passed" in printed, cell.source
