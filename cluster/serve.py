"""``eventray serve``: a pipeline over live sources until SIGTERM or SIGINT, then a drain.

:func:`serve_pipeline` loads the config, starts Ray, the ingress actor of an ``http``
source (:mod:`cluster.ingress`) and the run: :class:`~cluster.live_run.LiveRun` in this
process with its stages and partitions in actors of their own, or, with
``runtime.chain``, the whole run in one actor (:mod:`cluster.chained`) while this process
only coordinates.

On SIGTERM or SIGINT: the ingress stops accepting (what it accepted is in the journal),
the run reads the source to its end, processes it, takes a final checkpoint, acknowledges
it, and returns the run's one-line summary.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.dispatchers import RayDispatchers
from cluster.live_run import LiveRun, ScoreReplies, TerminalLine, live_run_id
from pipelines.errors import ConfigError
from pipelines.journal import HttpSourceOptions, JournalSource
from pipelines.kinds import build_source, source_kind
from pipelines.live import LiveSource
from pipelines.spec import PipelineSpec
from pipelines.store import store_folder


def ingress_name(run: str) -> str:
    """The ingress actor's name in namespace ``eventray``: the partitions reply to it."""
    return f"{run}-ingress"


def journal_folder(spec: PipelineSpec, store_root: Path) -> Path:
    """The ``http`` source's journal: ``source.path[0]``, under the store when relative."""
    folder = Path(spec.source.path[0])
    return folder if folder.is_absolute() else store_root / folder


def serve_pipeline(config: Path, store: Path | None = None, address: str | None = None,
                   port: int | None = None, progress: bool | None = None,
                   log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """``eventray serve``: load ``config``, serve until SIGTERM/SIGINT, drain; the summary."""
    from cluster.ray_runtime import prepare_environment

    prepare_environment(address)
    from pipelines.pipeline import load_pipeline

    spec = load_pipeline(config)
    store_root = store_folder(store or spec.store.path)
    _, options = source_kind(spec.source, tuple(spec.search_path))
    http = isinstance(options, HttpSourceOptions)
    inputs = [str(journal_folder(spec, store_root))] if http else None
    source = build_source(spec, inputs)
    if spec.source.ordering != "arrival":
        raise ConfigError("serve: a live source decides in arrival order (an event older than "
                          "its key's latest goes the late lane); set source.ordering: arrival")
    if not isinstance(source, LiveSource):
        raise ConfigError(f"serve: source format {spec.source.format!r} is not a live source "
                          "(http, or a kind implementing pipelines.live.LiveSource)")
    token = None
    if http:
        token = os.environ.get(options.token_env)
        if not token:
            raise ConfigError(f"serve: the http source's token is read from ${options.token_env}, "
                              "which is not set")
        if port is not None:
            options = options.model_copy(update={"port": port})
    return _serve_on_ray(spec, store_root, source, options if http else None, token, address,
                         progress, log)


def _serve_on_ray(spec: PipelineSpec, store_root: Path, source: LiveSource,
                  options: HttpSourceOptions | None, token: str | None, address: str | None,
                  progress: bool | None, log: Callable[[str], None]) -> dict[str, Any]:
    import ray

    from cluster.ingress import IngressReplies, ingress_actor_class
    from cluster.job import code_folders
    from cluster.partitions import NAMESPACE, RayPartitions, ray_stages
    from cluster.ray_runtime import ray_session

    runtime = spec.runtime
    stop = threading.Event()
    # Ctrl-C on a terminal signals the whole process group, Ray's own processes too, which
    # would die before the drain: they inherit SIGINT ignored; serve alone handles it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with ray_session(address, object_store_mb=runtime.object_store_mb,
                     code_search_path=code_folders(spec, {})) as facts:
        for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own
            signal.signal(signum, lambda *_: stop.set())
        http = options is not None
        run_id = live_run_id(spec, source)
        ingress, bound = None, None
        if options is not None:
            assert token is not None and isinstance(source, JournalSource)
            ingress = ingress_actor_class().options(name=ingress_name(run_id),
                                                    namespace=NAMESPACE).remote(
                spec, str(source.folder), options, token)
            bound = ray.get(ingress.start.remote())
            log(f"listening on http://{options.host}:{bound} (POST /events, POST /score, "
                "GET /healthz)")
        if runtime.chain:
            try:
                summary = _serve_chained(spec, store_root, run_id, source, ingress, stop,
                                         progress, log)
            finally:
                if ingress is not None:
                    ray.get(ingress.close.remote())
                    ray.kill(ingress)
            return {**summary, "port": bound, "ray": facts["mode"]}
        # a source with a reply channel of its own (a Redis stream of decisions)
        sink = source.decision_sink() if hasattr(source, "decision_sink") else None
        run = LiveRun(spec, lambda run_id: RayPartitions(
            runtime.partitions, store_root, run_id, runtime.max_in_flight, None, spec,
            live=True, decisions_to=IngressReplies(ingress_name(run_id)) if http else sink),
            store_root, source,
            stages=ray_stages(spec, store_root, runtime.max_in_flight),
            actions=lambda run_id: RayDispatchers(spec.actions, store_root, run_id), run=run_id)
        if ingress is not None:
            run.replies = ScoreReplies(lambda answers: ingress.resolve.remote(answers),
                                       direct=True)
            run.progress_to = lambda consumed: ingress.progress.remote(consumed)

        def ready() -> None:
            if ingress is not None:
                ray.get(ingress.set_ready.remote())
            log("ready")

        def drain_to() -> dict[str, int] | None:
            log("draining")
            return ray.get(ingress.stop_accepting.remote()) if ingress is not None else None

        try:
            summary = run.serve(stop, ready, drain_to, progress)
        finally:
            if ingress is not None:
                ray.get(ingress.close.remote())
                ray.kill(ingress)
    return {**summary, "port": bound, "ray": facts["mode"]}


def _serve_chained(spec: PipelineSpec, store_root: Path, run: str, source: LiveSource,
                   ingress: Any, stop: threading.Event, progress: bool | None,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """``runtime.chain``: the run in one actor (:mod:`cluster.chained`); this process
    coordinates and shows its progress line."""
    from cluster.chained import ChainedServe
    from pipelines.actions.dispatch import read_secrets

    delivered = spec.actions is not None and spec.actions.delivered
    secrets = read_secrets(spec.actions.secret_envs()) if delivered else {}  # type: ignore[union-attr]
    inputs = [str(source.folder)] if isinstance(source, JournalSource) else None
    shown = sys.stderr.isatty() if progress is None else progress
    chained = ChainedServe(spec, store_root, run, inputs, ingress_name(run) if ingress else None,
                           secrets, log)
    line = TerminalLine()
    try:
        return chained.serve(stop, line.show if shown else None)
    finally:
        if shown:
            line.close()
