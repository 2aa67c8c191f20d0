"""One run of a pipeline, as the CLI and a Ray job start it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.spec import PipelineSpec, load_pipeline


def run_job(
    config: Path,
    address: str | None = None,
    store: Path | None = None,
    inputs: list[str] | None = None,
    partitions: int | None = None,
    in_process: bool = False,
    progress: bool | None = None,
    resume: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Load and validate ``config``, then run it to the end; returns the summary."""
    from cluster.driver import ensure_simulated_input

    overrides: dict[str, Any] = {}
    if partitions is not None:
        overrides["runtime"] = {"partitions": partitions}
    spec = load_pipeline(config, overrides)
    store_root = Path(store or spec.store.path)
    if not inputs:
        ensure_simulated_input(spec.source, log)
    return run_spec(spec, store_root, address, inputs, in_process, progress, resume)


def run_spec(
    spec: PipelineSpec,
    store_root: Path,
    address: str | None = None,
    inputs: list[str] | None = None,
    in_process: bool = False,
    progress: bool | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run a validated pipeline on an embedded Ray, a cluster, or in process."""
    from cluster.driver import run_pipeline
    from cluster.partitions import LocalPartitions, RayPartitions
    from cluster.ray_runtime import ray_session

    runtime = spec.runtime
    if in_process:
        summary = run_pipeline(
            spec, lambda prefix: LocalPartitions(runtime.partitions, store_root, prefix, spec),
            store_root, inputs, progress, resume=resume,
            stage_factory=lambda prefix, stage: LocalPartitions(
                stage.partitions, store_root, prefix, spec, stage))
        return {**summary, "ray": "in-process"}
    with ray_session(address, object_store_mb=runtime.object_store_mb) as ray_facts:
        # Ray's actor default: a CPU free to be placed, none held while running. A share of
        # the cluster's CPUs per actor (cpus / actors) does not pack onto nodes it does not
        # divide (four actors of 0.75 CPU on three 1-CPU nodes: one never starts and the run
        # waits forever) and leaves no room to replace the actors of a lost node.
        per_actor = None
        summary = run_pipeline(
            spec,
            lambda prefix: RayPartitions(runtime.partitions, store_root, prefix,
                                         runtime.max_in_flight, per_actor, spec),
            store_root, inputs, progress, resume=resume,
            stage_factory=lambda prefix, stage: RayPartitions(
                stage.partitions, store_root, prefix, runtime.max_in_flight, per_actor, spec, stage))
    return {**summary, "ray": ray_facts["mode"]}
