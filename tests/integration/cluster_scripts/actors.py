"""Finding a run's actors by their names in Ray, from outside the run (the scripts here
import none of the project's packages): a run registers ``<run>-partition-<i>`` in
namespace ``eventray``."""

from __future__ import annotations

from typing import Any

import ray

NAMESPACE = "eventray"


def get_named(name: str) -> Any:
    """The live actor ``<some run>-<name>`` (``name`` as ``partition-0``); ValueError if none."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE and actor["name"].endswith(f"-{name}"):
            return ray.get_actor(actor["name"], namespace=NAMESPACE)
    raise ValueError(f"no actor named *-{name} in namespace {NAMESPACE}")
