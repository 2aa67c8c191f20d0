"""The notebooks run top to bottom on a store a real pipeline run wrote (in process)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from cluster.job import run_spec
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from tests.support import fraud_spec

ROOT = Path(__file__).resolve().parents[2]
#: Notebooks that need a scored store (a model, alerts) run in test_store_notebooks.py.
SCORED = {"backtest.ipynb", "audit.ipynb"}
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if p.name not in SCORED)
#: What each notebook prints once its analysis ran (default: the mining notebook's line).
MARKERS = {"sequential_patterns.ipynb": "frequent patterns (support >= 5%)",
           "event_correlations.ipynb": "directed pairs of event types"}
#: Notebooks whose plots are drawn inline: their executed outputs hold the images.
PLOTTED = {"sequential_patterns.ipynb": 2, "event_correlations.ipynb": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nb")
    write_monthly(simulate_transactions(SimulationSpec(n_customers=150, n_terminals=300, n_days=40, seed=2)),
                  root / "tx")
    spec = fraud_spec(steps=[{"kind": "fraud"}])
    run_spec(spec, root / "store", inputs=[str(root / "tx")], in_process=True, progress=False)
    return root / "store"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTRAY_STORE", str(store))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    marker = MARKERS.get(path.name, "customers with repeated frauds")
    assert any(marker in o.get("text", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= PLOTTED.get(path.name, 0)


def test_there_is_a_notebook() -> None:
    assert NOTEBOOKS
