"""Shared fixtures: the reference data location and one real local Ray per session."""

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

from tests.live_servers import mqtt_broker, redis_server  # noqa: E402, F401 (fixtures)
from tests.support import HANDBOOK  # noqa: E402 (after the environment above)


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
