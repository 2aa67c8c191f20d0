"""One run of a pipeline, as the CLI, a Ray job and :meth:`pipelines.Pipeline.run` start it.

:func:`run_on_ray` and :func:`run_in_process` are the ``ray`` and ``local`` runners of the
entry-point group ``eventray.runners``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipelines.pipeline import load_pipeline
from pipelines.spec import PipelineSpec
from pipelines.store import store_folder


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
    run_id: str | None = None,
    readers: int | None = None,
) -> dict[str, Any]:
    """Load and validate ``config``, then run it to the end; returns the summary."""
    overrides: dict[str, Any] = {}
    if partitions is not None:
        overrides["runtime"] = {"partitions": partitions}
    if readers is not None:
        overrides["runtime"] = {**overrides.get("runtime", {}), "readers": readers}
    spec = load_pipeline(config, overrides)
    store_root = store_folder(store or spec.store.path)
    return run_spec(spec, store_root, address, inputs, in_process, progress, resume, run_id=run_id)


def run_spec(
    spec: PipelineSpec,
    store_root: Path,
    address: str | None = None,
    inputs: list[str] | None = None,
    in_process: bool = False,
    progress: bool | None = None,
    resume: bool = False,
    objects: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Run a validated pipeline on an embedded Ray, a cluster, or in process.

    ``objects``: processors registered in Python (by step name), shipped to the actors.
    """
    if in_process and spec.runtime.readers:
        from pipelines.errors import ConfigError

        raise ConfigError("runtime.readers: reader actors need Ray; run in process with "
                          "runtime.readers 0 (--readers 0)")
    if in_process:
        return run_in_process(spec, store_root, objects=objects, inputs=inputs,
                              resume=resume, progress=progress, run_id=run_id)
    return run_on_ray(spec, store_root, objects=objects, address=address, inputs=inputs,
                      resume=resume, progress=progress, run_id=run_id)


def run_in_process(spec: PipelineSpec, store_root: Path, *, objects: Mapping[str, Any] | None = None,
                   inputs: list[str] | None = None, resume: bool = False,
                   progress: bool | None = False, address: str | None = None,
                   run_id: str | None = None) -> dict[str, Any]:
    """The ``local`` runner: the same driver and partition logic, in this process."""
    from cluster.dispatchers import LocalDispatchers
    from cluster.driver import run_pipeline
    from cluster.partitions import LocalPartitions

    if address is not None:
        from pipelines.errors import ConfigError

        raise ConfigError("runner 'local' runs in this process: it takes no address")
    found = dict(objects or {})
    summary = run_pipeline(
        spec, lambda run: LocalPartitions(spec.runtime.partitions, store_root, run, spec, objects=found),
        store_root, inputs, progress, resume=resume, run_id=run_id,
        stage_factory=lambda run, stage: LocalPartitions(stage.partitions, store_root, run, spec, stage),
        actions_factory=lambda run: LocalDispatchers(spec.actions, store_root, run))
    return {**summary, "ray": "in-process"}


def code_folders(spec: PipelineSpec, objects: Mapping[str, Any] | None) -> list[str]:
    """Folders the actors need on ``sys.path``: the spec's search path and the folders of
    the modules that registered processors come from (a module outside any installed
    package, such as a user's script folder)."""
    folders = [str(Path(f).resolve()) for f in spec.search_path]
    for processor in (objects or {}).values():
        module = sys.modules.get(getattr(processor, "__module__", None) or
                                 type(processor).__module__)
        source = inspect.getsourcefile(module) if module is not None and \
            getattr(module, "__file__", None) else None
        if source is not None and module.__name__ != "__main__":
            depth = module.__name__.count(".") + 1
            folders.append(str(Path(source).resolve().parents[depth - 1]))
    return list(dict.fromkeys(f for f in folders if Path(f).is_dir()))


def ship_by_value(objects: Mapping[str, Any]) -> None:
    """Pickle registered processors' own modules by value, so actors need not import them
    (a user's module beside a script or notebook, on any node); installed packages are
    still pickled by reference."""
    import ray.cloudpickle

    for processor in objects.values():
        name = getattr(processor, "__module__", None) or type(processor).__module__
        module = sys.modules.get(name)
        source = getattr(module, "__file__", None) or ""
        if module is None or name == "__main__" or "site-packages" in source:
            continue
        ray.cloudpickle.register_pickle_by_value(module)


def run_on_ray(spec: PipelineSpec, store_root: Path, *, objects: Mapping[str, Any] | None = None,
               address: str | None = None, inputs: list[str] | None = None, resume: bool = False,
               progress: bool | None = False, run_id: str | None = None) -> dict[str, Any]:
    """The ``ray`` runner: keyed actors on an embedded local Ray, or on the cluster at
    ``address`` (a Ray job joins its own cluster)."""
    from cluster.dispatchers import RayDispatchers
    from cluster.driver import run_pipeline
    from cluster.partitions import RayPartitions, ray_stages
    from cluster.ray_runtime import ray_session

    runtime, found = spec.runtime, dict(objects or {})
    with ray_session(address, object_store_mb=runtime.object_store_mb,
                     code_search_path=code_folders(spec, found)) as ray_facts:
        ship_by_value(found)
        # Ray's actor default: a CPU free to be placed, none held while running. A share of
        # the cluster's CPUs per actor (cpus / actors) does not pack onto nodes it does not
        # divide (four actors of 0.75 CPU on three 1-CPU nodes: one never starts and the run
        # waits forever) and leaves no room to replace the actors of a lost node.
        per_actor = None
        if runtime.readers:  # reader actors ingest and route; the driver coordinates
            from cluster.reader_run import run_with_readers

            summary = run_with_readers(spec, store_root, inputs, resume=resume, run_id=run_id,
                                       objects=found, progress=progress)
            return {**summary, "ray": ray_facts["mode"]}
        summary = run_pipeline(
            spec,
            lambda run: RayPartitions(runtime.partitions, store_root, run, runtime.max_in_flight,
                                      per_actor, spec, objects=found),
            store_root, inputs, progress, resume=resume, run_id=run_id,
            stage_factory=ray_stages(spec, store_root, runtime.max_in_flight, per_actor),
            actions_factory=lambda run: RayDispatchers(spec.actions, store_root, run))
    return {**summary, "ray": ray_facts["mode"]}
