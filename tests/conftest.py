"""Shared fixtures: the reference data location, one real local Ray per session, and the
handbook run several modules check (the suite's most expensive run, made once)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports ray: every address loopback, token auth named explicitly.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Before scikit-learn loads OpenMP (here, in Ray's workers and in every CLI subprocess): idle
# OpenMP threads spin by default, and with Ray's processes or anyone else's work on the two
# cores, the handbook's tuned boosting trained in 140 s instead of 8 s. Passive threads
# sleep instead; the models are the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.live_servers import mqtt_broker, redis_server  # noqa: E402, F401 (fixtures)
from tests.support import (  # noqa: E402 (after the environment above)
    HANDBOOK,
    HandbookRun,
    eventray,
    summary_of,
    unscored_fraud_config,
)


@pytest.fixture(scope="session")
def handbook_dir() -> Path:
    if not (HANDBOOK / "transactions-2018-04.parquet").exists():
        pytest.skip(f"fraud handbook reference data not found at {HANDBOOK}")
    return HANDBOOK


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    """A real local Ray with 2 CPUs, on loopback, shared by the whole session."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="er-test-")
    ray.init("local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             object_store_memory=256 * 1024 * 1024, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def handbook_run(tmp_path_factory: pytest.TempPathFactory, handbook_dir: Path) -> HandbookRun:
    """`eventray run` of configs/fraud.yaml without a model (as a fresh clone runs it) over the
    handbook's five months, on an embedded local Ray, through the command line.

    It takes minutes, so it is made once per session: the handbook pipeline's and the store's
    tests read the same run. Its store is read-only to them; a test that writes into a store
    (compaction, a rerun) works on a copy of it (:meth:`HandbookRun.copy_store`).
    """
    root = tmp_path_factory.mktemp("handbook-run")
    config = unscored_fraud_config(root)
    store = root / "store"
    summary = summary_of(eventray("run", str(config), "--input", str(handbook_dir), "--store",
                                  str(store), "--no-progress", timeout=1800))
    return HandbookRun(config=config, store=store, summary=summary)
