"""A chained live run: the source, the enrichment stages and the partitions in one Ray actor.

With ``runtime.chain: true`` (one partition per keyed operator, no readers) ``eventray
serve`` runs its :class:`~cluster.live_run.LiveRun` inside one actor, ``<run>-chain`` in
namespace ``eventray``, with every keyed operator in that actor's process
(:class:`~cluster.partitions.LocalPartitions`): a batch goes from the source through
ingest, the stages, routing and the partitions without crossing a process, the way Flink
chains operators whose connection needs no shuffle. Decisions leave the actor as soon as
a batch is scored (to the ingress that answers ``POST /score``, or the source's decision
stream). The driver only coordinates: it starts the actor, shows its progress, tells it
to stop on SIGTERM, and replaces it when it dies. The replacement resumes from the last
checkpoint as a restarted ``serve`` does: the source is read again from what the
checkpoint covers (the journal from its offsets; Redis from the group's pending entries,
acknowledged only by checkpoints), and the store's files written past it are replaced, so
every event is stored once.

Measured on 2 cores at 300 ``/score`` events/s: each actor a batch crosses costs it a
Ray call each way and a share of the CPU that five busy processes fight over, so the
chained run decides with fewer processes and less CPU per batch (figures in the README).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.live_run import TerminalLine
from cluster.partitions import NAMESPACE, error_line
from pipelines.errors import PipelineError
from pipelines.spec import PipelineSpec

#: Deaths in a row of the chained actor, none after a checkpoint of its own, that end the run.
MAX_FUTILE_DEATHS = 5
#: How long a replacement may wait for its dead predecessor's name.
SPAWN_TIMEOUT_S = 60.0
#: How often the driver looks at the chained actor (progress, readiness, SIGTERM).
LOOK_EVERY_S = 0.25


class ChainFailed(PipelineError):
    """The chained run's actor died again and again without a checkpoint in between."""


class _Watch:
    """What the driver knows of one chained actor: its checkpoints, and when its loop last
    turned. Stalled: ready, and the loop not seen turning for ``limit`` seconds (the same
    ``runtime.batch_timeout_s`` after which a partition actor is replaced)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        #: how long one look at the actor may wait for its answer
        self.patience = min(10.0, limit)
        self.first: int | None = None  # checkpoints when ready (restored ones included)
        self.checkpoints = 0
        self.turns: int | None = None
        self.turned = time.monotonic()

    def saw(self, status: dict[str, Any]) -> None:
        if status["checkpoints"] is not None:
            self.first = status["checkpoints"] if self.first is None else self.first
            self.checkpoints = status["checkpoints"]
        if status["ready"] and status["turns"] != self.turns:
            self.turns, self.turned = status["turns"], time.monotonic()

    def stalled(self) -> bool:
        return self.turns is not None and time.monotonic() - self.turned > self.limit

    def checkpointed(self) -> bool:
        """Whether the actor took a checkpoint of its own before it ended."""
        return self.first is not None and self.checkpoints > self.first


class KeptLine(TerminalLine):
    """A progress line kept for the driver to show (the actor has no terminal)."""

    def __init__(self) -> None:
        self.text = ""

    def show(self, line: str) -> None:
        self.text = line

    def close(self) -> None:
        pass  # the driver ends the line on its terminal


def chain_name(run: str) -> str:
    """The chained run's actor name in namespace ``eventray``."""
    return f"{run}-chain"


def chained_actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=2)
    class ChainedRun:
        """Owns a live run and all its operators: :meth:`serve` runs it to the end while
        :meth:`stop` and :meth:`status` answer from a second thread."""

        def __init__(self, spec: PipelineSpec, store_root: str, inputs: list[str] | None,
                     ingress: str | None, secrets: dict[str, str]) -> None:
            self.args = spec, store_root, inputs, ingress, secrets
            self.run: Any = None
            self.ingress: Any = None
            self.stopping = threading.Event()
            self.is_ready = False
            self.kept = KeptLine()  # the progress line, shown by the driver

        def _build(self) -> Any:
            """The run and its operators, built in :meth:`serve` (an error there is the
            run's own, raised to the driver as it is, not an actor that failed to start)."""
            from cluster.dispatchers import RayDispatchers
            from cluster.ingress import IngressChannel
            from cluster.live_run import LiveRun, ScoreReplies
            from cluster.partitions import LocalPartitions
            from pipelines.kinds import build_source

            spec, store_root, inputs, ingress, secrets = self.args
            os.environ.update(secrets)  # the action dispatchers' secrets, read by the driver
            source = build_source(spec, inputs)
            run = LiveRun(
                spec, lambda run: LocalPartitions(spec.runtime.partitions, store_root, run, spec,
                                                  live=True),
                store_root, source,
                stages=lambda run, stage: LocalPartitions(stage.partitions, store_root, run,
                                                          spec, stage),
                actions=lambda run: RayDispatchers(spec.actions, store_root, run))  # type: ignore[arg-type]
            if ingress is not None:
                self.ingress = handle = ray.get_actor(ingress, namespace=NAMESPACE)
                node, path = ray.get(handle.replies_address.remote())
                here = node == ray.get_runtime_context().get_node_id()
                channel = IngressChannel(handle, path if here else None)
                # the awaited events' answers are made here: each batch's table of
                # decisions pickled to the ingress cost this loop ~0.8 ms a batch
                run.replies = ScoreReplies(channel.resolve)
                run.progress_to = channel.progress
            elif hasattr(source, "decision_sink"):  # a source's own reply channel
                run.decisions_to = source.decision_sink()
            if run.decisions_to is not None:
                run.decisions_to.connect()
            run.progress_line = self.kept
            return run

        def serve(self, progress: bool) -> dict[str, Any]:
            """Run until :meth:`stop`, drain, and return the run's summary."""
            self.run = self._build()
            return self.run.serve(self.stopping, self._ready, self._drain_to, progress)

        def _ready(self) -> None:
            if self.ingress is not None:
                ray.get(self.ingress.set_ready.remote())
            self.is_ready = True

        def _drain_to(self) -> dict[str, int] | None:
            if self.ingress is None:
                return None
            return ray.get(self.ingress.stop_accepting.remote())

        def stop(self) -> None:
            self.stopping.set()

        def status(self) -> dict[str, Any]:
            """Whether the run is ready, its checkpoints so far and its progress line."""
            # the run's checkpoints (restored ones included) once it has started
            return {"ready": self.is_ready, "line": self.kept.text,
                    "checkpoints": self.run.counts.checkpoints if self.is_ready else None,
                    "turns": self.run.turns if self.run is not None else 0}

    return ChainedRun


class ChainedServe:
    """The driver's side of a chained run: start the actor, watch it, replace it.

    Args:
        spec: the pipeline (``runtime.chain``).
        store_root: the event store.
        run: the run's id (:func:`~cluster.live_run.live_run_id`).
        inputs: the source's inputs (the ``http`` source's journal folder).
        ingress: the ingress actor's name, for an ``http`` source.
        secrets: the action dispatchers' secrets (read from the environment at start-up).
        log: where the driver's messages go.
    """

    def __init__(self, spec: PipelineSpec, store_root: Path, run: str, inputs: list[str] | None,
                 ingress: str | None, secrets: dict[str, str],
                 log: Callable[[str], None] = lambda _: None) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        self._ray, self._died, self._raised = ray, RayActorError, RayTaskError
        self.spec, self.store_root, self.run = spec, str(store_root), run
        self.inputs, self.ingress, self.secrets, self.log = inputs, ingress, secrets, log
        self.restarts = 0

    def _spawn(self) -> Any:
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while True:
            try:
                return chained_actor_class().options(name=chain_name(self.run),
                                                     namespace=NAMESPACE).remote(
                    self.spec, self.store_root, self.inputs, self.ingress, self.secrets)
            except ValueError:  # a dead predecessor's name is not released yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def serve(self, stop: threading.Event, progress: Callable[[str], None] | None) -> dict[str, Any]:
        """Run the chained actor until ``stop`` is set and it has drained; replace it each
        time it dies, or stalls (its loop not turning for ``runtime.batch_timeout_s`` once
        ready: hung, or its process stopped), from the last checkpoint. Returns its summary,
        ``restarts`` counting the replacements.

        Raises:
            ChainFailed: its actor died ``MAX_FUTILE_DEATHS`` times in a row without a
                checkpoint.
            PipelineError: the run's own error (a config, a store that cannot be written).
        """
        futile, announced = 0, False
        while True:
            actor = self._spawn()
            done = actor.serve.remote(progress is not None)
            watch = _Watch(self.spec.runtime.batch_timeout_s)
            asked = False
            while not self._ray.wait([done], timeout=LOOK_EVERY_S)[0]:
                if stop.is_set() and not asked:
                    self.log("draining")
                    actor.stop.remote()
                    asked = True
                try:
                    status = self._ray.get(actor.status.remote(), timeout=watch.patience)
                except self._died:
                    continue  # dead: the serve call says so
                except self._ray.exceptions.GetTimeoutError:
                    status = None  # slow, or its process stopped: the watch decides
                if status is not None:
                    watch.saw(status)
                    if status["ready"] and not announced:
                        self.log("ready")
                        announced = True
                    if progress is not None and status["line"]:
                        progress(status["line"])
                if watch.stalled():
                    self.log(f"the chained run's actor {chain_name(self.run)} made no progress "
                             f"for runtime.batch_timeout_s = {watch.limit:g} s; replacing it")
                    self._kill(actor)  # its serve call fails now: replaced below
                    break
            try:
                summary: dict[str, Any] = self._ray.get(done)
            except self._died as exc:
                futile = 1 if watch.checkpointed() else futile + 1
                if futile >= MAX_FUTILE_DEATHS:
                    raise ChainFailed(f"the chained run's actor {chain_name(self.run)} died "
                                      f"{futile} times in a row without a checkpoint; last: "
                                      f"{error_line(exc)}") from exc
                self.restarts += 1
                self.log(f"the chained run's actor died ({error_line(exc)}); resuming from "
                         "the last checkpoint")
                self._kill(actor)
                continue
            except self._raised as exc:  # the run's own error, as the driver path raises it
                self._kill(actor)
                cause = getattr(exc, "cause", None)
                raise cause if isinstance(cause, Exception) else exc from None
            self._kill(actor)
            summary["restarts"] = summary.get("restarts", 0) + self.restarts
            return summary

    def _kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor)
        except self._died:
            pass
