"""The Bytewax system's own virtual environment, built by the bench (never our dependencies).

``python -m venv WORK/bytewax-venv`` and ``pip install bytewax==0.21.*`` with numpy, pyarrow,
scikit-learn, scipy and skops pinned to the versions this environment has, so the model
artifact loads the same and the comparison is about the engine. By default (``share``) the
new environment also sees this environment's site-packages, after its own (a ``.pth``
file): the pinned libraries are then already there and only Bytewax and what it needs are
installed into it (seconds instead of half a minute and 500 MB); whatever Bytewax needs in
another version is installed into its own site-packages, which come first, so it never
constrains ours. The environment is reused while its requirements are unchanged (a stamp
file records them). When it cannot be built (no network, no wheel for this Python),
:func:`ensure_bytewax` returns the reason instead of raising: the bench then reports
Bytewax as unavailable.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

BYTEWAX = "bytewax==0.21.*"
SHARED = ("numpy", "pyarrow", "scikit-learn", "scipy", "skops")
STAMP = ".eventray-bench-requirements"
INSTALL_TIMEOUT_S = 600


@dataclass(frozen=True)
class BytewaxEnv:
    """The environment's interpreter, or why there is none."""

    python: Path | None
    reason: str | None = None
    version: str | None = None


def requirements() -> list[str]:
    """What the environment installs: Bytewax 0.21 and our versions of the shared libraries."""
    return [BYTEWAX, *(f"{name}=={metadata.version(name)}" for name in SHARED)]


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def ensure_bytewax(work: Path, log: Callable[[str], None] = lambda _: None,
                   share: bool = True) -> BytewaxEnv:
    """Build (or reuse) ``work/bytewax-venv``; never raises for a failed build."""
    venv = work / "bytewax-venv"
    wanted = "\n".join([*requirements(), f"share={share}"])
    python, stamp = _python(venv), venv / STAMP
    if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
        log(f"building the Bytewax environment in {venv} ({BYTEWAX})")
        failure = _run([sys.executable, "-m", "venv", "--clear", str(venv)])
        if not failure and share:
            failure = _share_site_packages(python)
        failure = failure or _run([str(python), "-m", "pip", "install", "--quiet",
                                   "--disable-pip-version-check", *requirements()])
        if failure:
            return BytewaxEnv(None, reason=failure)
        stamp.write_text(wanted)
    probe = subprocess.run([str(python), "-c", "import bytewax, importlib.metadata as m; "
                            "print(m.version('bytewax'))"], capture_output=True, text=True)
    if probe.returncode:
        return BytewaxEnv(None, reason=f"bytewax does not import: {_tail(probe.stderr)}")
    return BytewaxEnv(python, version=probe.stdout.strip())


def _share_site_packages(python: Path) -> str | None:
    """Append this environment's site-packages to the new one's path (after its own)."""
    probe = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"cannot locate the new environment's site-packages: {_tail(probe.stderr)}"
    ours = dict.fromkeys(sysconfig.get_path(kind) for kind in ("purelib", "platlib"))
    Path(probe.stdout.strip(), "_eventray_bench_shared.pth").write_text("\n".join(ours) + "\n")
    return None


def _run(command: list[str]) -> str | None:
    """Run a build step; the reason it failed, or None."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{command[2] if len(command) > 2 else command[0]}: {exc}"
    if done.returncode:
        return f"`{' '.join(command[1:4])} ...` failed: {_tail(done.stderr or done.stdout)}"
    return None


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if "is ignored" not in line]
    return " | ".join(kept[-lines:]) or "no output"
