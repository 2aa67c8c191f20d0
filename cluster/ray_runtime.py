"""Starting and joining Ray: an embedded local Ray on loopback, or an existing cluster.

Environment facts this module relies on (measured on Ray 2.60, see the project notes):
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` must be set before ``ray`` is imported for a local
Ray to bind 127.0.0.1 only; ``RAY_AUTH_MODE=token`` keeps token auth on for servers and
clients alike; ``ray.init()`` with no address may silently join a cluster recorded on the
machine, so an embedded run says ``"local"`` and uses a private temporary directory.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def settle_heap() -> None:
    """Collect, then move every object alive now out of the garbage collector's reach
    (``gc.freeze``): a long-lived process (the serve loop, a partition, the ingress) calls it
    once it is set up. A full collection scans every tracked object; with the pipeline's
    libraries and model loaded that was ~185,000 objects and 85 ms, a stall that fell on
    whichever decision was in flight, several times a minute. Objects frozen are still
    freed when their last reference goes; only cycles among them would stay.
    """
    gc.collect()
    gc.freeze()


def is_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``http://host:port``) names this machine's loopback.

    Example:
        >>> is_loopback("127.0.0.1:6379"), is_loopback("http://localhost:8265"), is_loopback("10.0.0.5:6379")
        (True, True, False)
    """
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_environment(address: str | None) -> None:
    """Set Ray's environment before ``ray`` is imported; call first thing.

    An embedded Ray, and a client of a cluster on loopback, keep every address on
    127.0.0.1 (otherwise Ray registers and dials the machine's external interface). A
    client of a remote cluster must not: its own address has to be reachable.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    target = address or os.environ.get("RAY_ADDRESS")
    if target is None or is_loopback(target):
        os.environ.setdefault(LOOPBACK_ENV, "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int = 512,
    code_search_path: list[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Connect to Ray for the duration of a ``with`` block; yields facts about it.

    Args:
        address: a cluster's address (``127.0.0.1:6379``, ``ray://...``); ``None`` uses
            the Ray this process is already connected to, or else starts an embedded local
            Ray, unless running inside a Ray job (``RAY_ADDRESS`` set), which joins the
            job's cluster.
        num_cpus: CPUs of an embedded Ray (default: the machine's).
        object_store_mb: object store size of an embedded Ray.
        code_search_path: folders the job's workers put on ``sys.path`` (user processors'
            modules; on a cluster they must exist on every node, as a submitted job's
            working directory does).
    """
    prepare_environment(address)
    import ray
    from ray.job_config import JobConfig

    if address is None and ray.is_initialized():  # a caller's own Ray (a notebook, a test)
        yield {"mode": "existing", "cpus": ray.cluster_resources().get("CPU", 0.0)}
        return
    job_config = JobConfig(code_search_path=code_search_path) if code_search_path else None

    temp_dir = None
    if address is None and "RAY_ADDRESS" not in os.environ:
        temp_dir = tempfile.mkdtemp(prefix="eventray-ray-")
        ray.init(
            "local",
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=object_store_mb * 1024 * 1024,
            _temp_dir=temp_dir,
            logging_level="ERROR",
            log_to_driver=True,
            job_config=job_config,
        )
        mode = "embedded"
    else:
        ray.init(address=address, logging_level="ERROR", job_config=job_config)
        mode = "cluster"
    try:
        yield {"mode": mode, "cpus": ray.cluster_resources().get("CPU", 0.0)}
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
