"""The backtest and time-travel audit notebooks run top to bottom on a store as `make demo`
leaves it: a run without a model, a model trained on its features, the run again scored
(in process, real Parquet, the real CLI for training)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from cluster.job import run_spec
from pipelines.fraud.simulator import SimulationSpec, simulate_transactions, write_monthly
from tests.support import ROOT, eventray, fraud_spec, summary_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("store-nb")
    write_monthly(simulate_transactions(SimulationSpec(n_customers=200, n_terminals=400, n_days=56,
                                                       seed=4)), root / "tx")
    config = yaml.safe_load((ROOT / "configs" / "fraud.yaml").read_text())
    config["steps"][0]["model"]["registry"] = str(root / "registry")
    config["runtime"]["checkpoint_every"] = 4
    (root / "fraud.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    spec = fraud_spec(**config)
    run_spec(spec, root / "store", inputs=[str(root / "tx")], in_process=True, progress=False)
    summary_of(eventray("train", "--store", str(root / "store"), "--model", "logistic_regression",
                        "--start", "2018-05-02", "--end", "2018-05-09", "--registry",
                        str(root / "registry"), "--name", "fraud"))
    scored = run_spec(spec, root / "store", inputs=[str(root / "tx")], in_process=True, progress=False)
    assert scored["alerts"] > 0
    return {"EVENTRAY_STORE": root / "store", "EVENTRAY_CONFIG": root / "fraud.yaml",
            "EVENTRAY_REGISTRY": root / "registry"}


@pytest.mark.parametrize(("name", "says"), [
    ("backtest.ipynb", "backtest of ['a', 'b']"),
    ("audit.ipynb", "inputs equal to its scores row"),
])
def test_notebook_runs_on_a_scored_store(name: str, says: str, demo_like: dict[str, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in demo_like.items():
        monkeypatch.setenv(variable, str(value))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(says in o.get("text", "") for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # it plots
