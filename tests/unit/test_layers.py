"""The layers contract (``[tool.importlinter]`` in pyproject.toml), run as ``lint-imports``.

One contract for the whole tree: ``pipelines`` and ``models`` never import Ray or
``cluster``; ``models`` never sees the envelope; the engine never imports an application
(the fraud flow plugs in through entry points); no import cycles between sibling modules,
function-local and ``TYPE_CHECKING`` imports included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept() -> None:
    result = lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_the_contract_catches_an_engine_module_importing_the_application(tmp_path: Path) -> None:
    config = (ROOT / "pyproject.toml").read_text()
    probe = ROOT / "pipelines" / "_layers_probe.py"
    probe.write_text("def late() -> None:\n    from pipelines.fraud import flow  # noqa: F401\n")
    try:
        (tmp_path / "pyproject.toml").write_text(config.replace(
            '"pipelines.writers",', '"pipelines.writers", "pipelines._layers_probe",'))
        result = lint("--config", str(tmp_path / "pyproject.toml"))
    finally:
        probe.unlink()
    assert result.returncode != 0
    assert "the engine never imports an application BROKEN" in result.stdout
