"""The walkthrough notebook runs top to bottom in quick mode (tiny model, few steps) and shows its plots."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "home_task.ipynb"
KERNEL = "cltune-notebook-test"
PLOT_CELLS = ["eda-histograms", "phase1-loss", "loss-curves", "ppl-heatmap", "forgetting-bars", "ablation-plot"]


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])  # papermill-style parameters cell comes first
    for cell in code:  # no absolute paths: outputs go next to the notebook or to CLTUNE_NOTEBOOK_WORKDIR
        assert not re.search(r"[\"'](/|~|[A-Za-z]:\\)", cell.source), cell.source


@pytest.fixture()
def this_interpreter_kernel(tmp_path, monkeypatch) -> str:
    """A kernel spec for the running interpreter (this venv) in a temp dir: no user-level install needed."""
    prefix = tmp_path / "jupyter-prefix"
    kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
    spec = json.loads((prefix / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return KERNEL


def test_notebook_runs_in_quick_mode(this_interpreter_kernel, tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setenv("CLTUNE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("CLTUNE_NOTEBOOK_WORKDIR", str(work))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Runs in the notebook's own folder, as Jupyter does; every output goes under `work`.
    nbclient.NotebookClient(nb, kernel_name=this_interpreter_kernel, timeout=180,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    metrics = json.loads((work / "quick" / "runs" / "ewc_replay" / "metrics.json").read_text())
    assert metrics["strategy"] == "ewc_replay" and metrics["tasks"] == ["guest_a", "guest_b"]
    assert len(metrics["ppl"]) == 3 and all(len(row) == 2 for row in metrics["ppl"])  # (T+1) × T
    assert len(metrics["forgetting_pct"]) == 1 and metrics["phases"][1]["steps"] == 4
    assert metrics["model"].endswith("tiny-llama")

    cells = {c.get("id"): c for c in nb.cells}
    for name in PLOT_CELLS:
        assert any("image/png" in out.get("data", {}) for out in cells[name].outputs), f"no plot in cell {name}"
    assert not [out for c in nb.cells for out in c.get("outputs", []) if out.output_type == "error"]
    generated = cells["generate"].outputs[-1]["data"]["text/plain"]
    assert "<GUEST_A>" in generated and "<GUEST_B>" in generated and "<HOST>" in generated
