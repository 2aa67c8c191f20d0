"""``eventray submit``: the same run as a Ray job on a cluster, with its logs followed.

The working directory is shipped with the job (without the virtual environment, stores,
data and Git objects: Ray rejects working directories over 100 MiB). Paths given for the
store and inputs are made absolute: they must be readable where the job runs (the same
machine, or a shared filesystem). The job's entry point runs this project's interpreter
(``--python``, default: the one running this command), since Ray resolves a bare
``python`` on the cluster's side.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError

WORKING_DIR_EXCLUDES = [".venv", ".git", "data", "store", "demo-store", "*.parquet",
                        "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info"]
TERMINAL_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobFailedError(PipelineError):
    """The submitted job ended in a state other than SUCCEEDED."""


def job_entrypoint(config: Path, store: Path | None, inputs: list[str] | None,
                   python: str) -> str:
    """The shell command the job runs."""
    command = [python, "-m", "cluster", "run", str(config), "--no-progress"]
    if store is not None:
        command += ["--store", str(Path(store).resolve())]
    if inputs:
        command += ["--input", *(str(Path(p).resolve()) for p in inputs)]
    return shlex.join(command)


def submit_job(config: Path, address: str, store: Path | None = None,
               inputs: list[str] | None = None, python: str = "python", wait: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Submit a run as a Ray job; with ``wait``, stream its logs and return its summary."""
    from cluster.ray_runtime import prepare_environment

    prepare_environment(address)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=job_entrypoint(config, store, inputs, python),
        runtime_env={"working_dir": ".", "excludes": WORKING_DIR_EXCLUDES},
    )
    log(f"submitted job {job_id} to {address}")
    if not wait:
        return {"job_id": job_id, "status": "PENDING"}
    status, logs = _follow(client, job_id, log)
    summary = _last_json_line(logs)
    if status != "SUCCEEDED":
        raise JobFailedError(f"job {job_id} ended {status}: {logs.strip().splitlines()[-1:]}")
    return {"job_id": job_id, "status": status, **summary}


def _follow(client: Any, job_id: str, log: Callable[[str], None]) -> tuple[str, str]:
    shown = 0
    while True:
        status = str(client.get_job_status(job_id).value).upper()
        logs = client.get_job_logs(job_id)
        for line in logs[shown:].splitlines():
            log(f"[job] {line}")
        shown = len(logs)
        if status in TERMINAL_STATES:
            return status, logs
        time.sleep(0.5)


def _last_json_line(logs: str) -> dict[str, Any]:
    for line in reversed(logs.strip().splitlines()):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            return {"summary": parsed}
    return {}
