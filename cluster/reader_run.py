"""The driver of a run with reader actors: it coordinates, it never touches an event.

:func:`run_with_readers` plans and deals the splits, starts the stage, partition and reader
actors (:mod:`cluster.readers`, :mod:`cluster.round_operators`), then loops over rounds of
event time: where the next round ends is decided from what the readers report (the
earliest time each may still contribute); every ``runtime.checkpoint_every`` rounds it
takes a checkpoint at the round's boundary. When any actor dies the round fails: every
actor is stopped, the store is truncated to the last checkpoint and the actors start
again from it. At the end the readers' and partitions' counters are summed and checked
(read + derived = stored + dead-lettered + filtered), and each kind of process's
CPU-seconds per million events is reported.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from cluster.accounting import RunCounts
from cluster.checkpointing import Checkpointer, ResumeError, RunIdentity
from cluster.driver import Progress, config_digest, estimate_rows, run_id
from cluster.partitions import NAMESPACE, actor_name
from cluster.readers import ReadersFailed, reader_actor_class
from cluster.round_operators import ACTOR_CPUS, counts_of, partition_actor_class, stage_actor_class
from pipelines.checkpoint import Checkpoint
from pipelines.errors import ConfigError
from pipelines.keyed import merge_counters
from pipelines.kinds import build_source
from pipelines.normalise import Clock, utc_now
from pipelines.rounds import END_OF_TIME, deal, plan_splits, round_length
from pipelines.sources import Source
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore
from pipelines.writers import WriterId

#: Restarts from a checkpoint in a row without a new checkpoint before the run gives up.
MAX_FUTILE_RESTARTS = 5
SPAWN_TIMEOUT_S = 120.0
#: The driver's own state in a checkpoint: rounds, their length, the readers' sequences.
ROUNDS_STATE = "readers"


def add_counts(total: RunCounts, more: RunCounts) -> None:
    """Add ``more``'s counters to ``total`` (reasons and steps' counters merged)."""
    for field in fields(RunCounts):
        if field.name not in ("reasons", "steps"):
            setattr(total, field.name, getattr(total, field.name) + getattr(more, field.name))
    for reason, n in more.reasons.items():
        total.reasons[reason] = total.reasons.get(reason, 0) + n
    merge_counters(total.steps, more.steps)


def _process_cpu(pid: int) -> float | None:
    """CPU-seconds of a process on this machine (user and system), if it is here."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return times.user + times.system


class ReaderRun:
    """One run with ``runtime.readers`` reader actors. Use :func:`run_with_readers`."""

    def __init__(self, spec: PipelineSpec, store_root: str | Path, inputs: list[str] | None,
                 clock: Clock = utc_now, run: str | None = None,
                 objects: dict[str, Any] | None = None) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        self._ray, self._failures = ray, (RayActorError, RayTaskError, GetTimeoutError)
        if spec.actions is not None and spec.actions.delivered:
            raise ConfigError("runtime.readers: actions delivered by dispatchers run on the "
                              "driver path only (runtime.readers: 0)")
        for index, stage in enumerate(spec.enrich):
            if stage.placement == "driver":
                raise ConfigError(f"enrich.{index}.placement (stage {stage.name!r}): a stage in "
                                  "the driver takes its events from the driver path; with "
                                  "runtime.readers, use placement: actors")
        if spec.source.ordering != "event-time":
            raise ConfigError("runtime.readers: readers merge their events by event time; "
                              "source.ordering must be event-time")
        self.spec, self.readers, self.clock, self.objects = spec, spec.runtime.readers, clock, objects
        self.source = build_source(spec, inputs)
        if not isinstance(self.source, Source):
            raise ConfigError(f"runtime.readers: source format {spec.source.format!r} is live; "
                              "reader actors read bounded sources")
        self.store = EventStore(store_root)
        self.store_root = str(Path(store_root).resolve())
        self.run = run or run_id(spec, self.source)
        self.checkpointer = Checkpointer(spec, self.store, self.run, RunIdentity.of(
            spec, config_digest(spec), self.source.list_parts()), clock)
        # Parquet files are cut so that each reader's batch spans what one batch of the
        # whole input would: every reader holds some of every stretch of time
        rows = max(1, math.ceil(spec.source.batch_size / self.readers))
        reader_spec = spec.model_copy(update={"source": spec.source.model_copy(
            update={"batch_size": rows})})
        self.reader_source = build_source(reader_spec, inputs)
        self.splits = deal(plan_splits(self.reader_source, rows), self.readers)
        self.restarts, self.checkpoints_taken = 0, 0
        self.progress: Progress | None = None
        self.cpu: dict[str, float] = {}
        self.baseline: dict[str, tuple[str, float, int]] = {}

    # -- state -------------------------------------------------------------------------

    def _reader_writers(self, latest: Checkpoint) -> dict[str, int]:
        state = json.loads(self.checkpointer.checkpoints.read_state(latest.epoch, ROUNDS_STATE))
        if state["readers"] != self.readers:
            raise ResumeError(f"--resume: run {self.run} ran with {state['readers']} readers, "
                              f"not {self.readers}: resume it with --readers {state['readers']}")
        return {WriterId.reader(self.run, i).local: seq for i, seq in enumerate(state["reader_seqs"])}

    def _restore(self, resume: bool) -> dict[str, Any] | None:
        restored = self.checkpointer.restore(resume, None, self._reader_writers)
        if restored is None:
            return None
        state = json.loads(self.checkpointer.checkpoints.read_state(
            self.checkpointer.epoch, ROUNDS_STATE))
        self.checkpoints_taken = state["checkpoints"]
        return state

    # -- actors ------------------------------------------------------------------------

    def _start(self, actor_class: Any, name: str, *args: Any) -> Any:
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while True:
            try:
                return actor_class.options(name=name, namespace=NAMESPACE, num_cpus=ACTOR_CPUS,
                                           scheduling_strategy="SPREAD").remote(*args)
            except ValueError:  # a stopped actor's name is not released yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _spawn(self, epoch: int | None) -> None:
        """Start every actor of the run (restored from ``epoch``) and wait until they answer."""
        spec, run, root, n = self.spec, self.run, self.store_root, self.readers
        stage, partition, reader = stage_actor_class(), partition_actor_class(), reader_actor_class()
        self.stages = {s.name: [self._start(stage, f"{run}-{actor_name(p, s)}", p, root, run, spec, s, n)
                                for p in range(s.partitions)] for s in spec.enrich}
        self.partitions = [self._start(partition, f"{run}-{actor_name(p)}", p, root, run, spec, n,
                                       self.objects) for p in range(spec.runtime.partitions)]
        self.reader_actors = [self._start(reader, f"{run}-reader-{i}", i, spec, root, run,
                                          self.reader_source, self.splits[i], self.stages,
                                          self.partitions, epoch, self.clock) for i in range(n)]
        actors = self._actors()
        answers = self._get([actor.cpu.remote() for _, actor in actors])
        self.baseline = {name: (role, cpu["cpu_s"], int(cpu["pid"])) for (name, actor), cpu, role in
                         zip(actors, answers, self._roles(), strict=True)}

    def _actors(self) -> list[tuple[str, Any]]:
        found = [(f"reader-{i}", a) for i, a in enumerate(self.reader_actors)]
        found += [(f"{name}-{p}", a) for name, actors in self.stages.items() for p, a in enumerate(actors)]
        return found + [(f"partition-{p}", a) for p, a in enumerate(self.partitions)]

    def _roles(self) -> list[str]:
        stages = sum(len(actors) for actors in self.stages.values())
        return ["readers"] * self.readers + ["stages"] * stages + ["partitions"] * len(self.partitions)

    def _collect_cpu(self) -> None:
        """Add each live actor's CPU-seconds since it started to its role's total. An actor
        busy in a round that cannot finish (a peer died) is read from outside by its pid
        when it runs on this machine; a dead actor's seconds are lost with it."""
        asked = {name: actor.cpu.remote() for name, actor in self._actors() if name in self.baseline}
        ready, _ = self._ray.wait(list(asked.values()), num_returns=len(asked), timeout=2.0)
        for name, ref in asked.items():
            role, start, pid = self.baseline[name]
            now = None
            if ref in ready:
                try:
                    now = self._ray.get(ref)["cpu_s"]
                except Exception:  # it died meanwhile
                    now = None
            if now is None:
                now = _process_cpu(pid)
            if now is not None:
                self.cpu[role] = self.cpu.get(role, 0.0) + now - start
        self.baseline = {}

    def _stop(self) -> None:
        self._collect_cpu()
        for _, actor in self._actors():
            try:
                self._ray.kill(actor)
            except Exception:  # already gone
                pass

    def _get(self, refs: list[Any]) -> list[Any]:
        """The calls' results; the first failure raises (a dead actor, a stalled round)."""
        pending = list(refs)
        timeout = self.spec.runtime.batch_timeout_s
        while pending:
            ready, pending = self._ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                raise self._failures[2](f"no answer within runtime.batch_timeout_s = {timeout:g} s")
            self._ray.get(ready)
        return self._ray.get(refs)

    def _call(self, method: str, *args: Any) -> list[Any]:
        return self._get([getattr(actor, method).remote(*args) for actor in self.reader_actors])

    # -- rounds ------------------------------------------------------------------------

    def _rounds(self, state: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Rounds until every reader is done; returns the readers' last statuses."""
        if state is None:
            # a round of about one source batch per reader: each reader's piece of a
            # round is as large as a driver's batch, so fixed costs per call stay small
            self.length = round_length(self._call("first_batch"),
                                       self.spec.source.batch_size * self.readers)
            self.round, self.end_us = 0, None
        else:
            self.length, self.round, self.end_us = state["length"], state["round"], state["end_us"]
        statuses = self._call("status")
        # a round holds about one source batch per reader: checkpoint_every source batches
        every = max(1, round(self.spec.runtime.checkpoint_every / self.readers))
        while True:
            final = all(s["done"] for s in statuses)
            end = END_OF_TIME
            if not final:
                lower = min(s["next_us"] for s in statuses if s["next_us"] is not None)
                end = max(lower if self.end_us is None else self.end_us, lower) + self.length
            due = final or (self.round + 1) % every == 0
            statuses = self._call("run_round", self.round, end, final, due)
            self._show(statuses)
            self.round += 1
            self.end_us = self.end_us if final else end
            if due:
                self._checkpoint()
            if final:
                return statuses

    def _show(self, statuses: list[dict[str, Any]]) -> None:
        """Progress on a terminal: events the readers have read so far."""
        if self.progress is not None:
            read = sum(status["counts"]["read"] for status in statuses)
            self.progress.update(read - self.progress.bar.n, RunCounts(read=read), 0)

    def _checkpoint(self) -> None:
        """A checkpoint at this round boundary: nothing is in flight (the readers drained)."""
        checkpointer = self.checkpointer
        epoch = checkpointer.epoch + 1
        seqs = self._get([p.checkpoint.remote(epoch) for p in self.partitions])
        stage_seqs = {name: dict(enumerate(self._get([a.checkpoint.remote(epoch) for a in actors])))
                      for name, actors in self.stages.items()}
        written = self._call("checkpoint", epoch)
        reader_seqs = [reader["seq"] for reader in written]
        offsets = {split: offset for reader in written for split, offset in reader["offsets"].items()}
        self.checkpoints_taken += 1
        counts = self._totals(self._call("status"))
        checkpointer.checkpoints.write_state(epoch, ROUNDS_STATE, json.dumps({
            "round": self.round, "end_us": self.end_us, "length": self.length,
            "readers": self.readers, "reader_seqs": reader_seqs,
            "checkpoints": self.checkpoints_taken}).encode())
        checkpointer.checkpoints.commit(Checkpoint(
            epoch, offsets, dict(enumerate(seqs)), 0, counts.numbers(), dict(counts.reasons), stage_seqs))
        checkpointer.committer.commit(epoch, self.clock())
        checkpointer.epoch = epoch
        self.futile = 0

    def _totals(self, statuses: list[dict[str, Any]]) -> RunCounts:
        total = RunCounts()
        parts = statuses + self._get([p.counts.remote() for p in self.partitions])
        for part in parts:
            add_counts(total, counts_of(part))
        total.checkpoints, total.restarts = self.checkpoints_taken, self.restarts
        return total

    def execute(self, resume: bool, progress: bool | None = False) -> dict[str, Any]:
        starting = time.perf_counter()
        self.progress = Progress(estimate_rows(self.source), progress)
        state = self._restore(resume)
        resumed, self.futile = state is not None, 0
        self.reader_actors, self.stages, self.partitions = [], {}, []
        started, driver_cpu = None, 0.0
        try:
            while True:
                try:
                    self._spawn(self.checkpointer.epoch if state is not None else None)
                    if started is None:  # clocks start once all are up, as the actors' do
                        started, driver_cpu = time.perf_counter(), time.process_time()
                    statuses = self._rounds(state)
                    break
                except self._failures as exc:
                    state = self._recover(exc)
            counts = self._totals(statuses)
        finally:
            self.progress.close()
            self._stop()
        counts.check()
        elapsed = time.perf_counter() - (started or starting)
        self.cpu["driver"] = time.process_time() - driver_cpu
        return {**self._summary(counts, elapsed), "startup_s": round((started or starting) - starting, 3),
                "run": self.run, "resumed": resumed}

    def _recover(self, exc: Exception) -> dict[str, Any] | None:
        """Stop every actor, truncate to the last checkpoint, start them again from it."""
        self.futile += 1
        if self.futile > MAX_FUTILE_RESTARTS:
            raise ReadersFailed(f"the run failed {self.futile} times from the same checkpoint; "
                                f"last: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}") from exc
        self._stop()
        self.restarts += 1
        return self._restore(self.checkpointer.checkpoints.latest() is not None)

    def _summary(self, counts: RunCounts, elapsed: float) -> dict[str, Any]:
        million = max(counts.read, 1) / 1e6
        total_cpu = sum(self.cpu.values())
        return {
            "pipeline": self.spec.name, "events_in": counts.read, "stored": counts.stored,
            "dead_lettered": counts.dead_lettered, "duplicates": counts.duplicates,
            "filtered": counts.filtered, "derived": counts.derived,
            "hop_limited": counts.hop_limited, "alerts": counts.alerts,
            "reasons": dict(sorted(counts.reasons.items())),
            "partitions": self.spec.runtime.partitions, "readers": self.readers,
            "rounds": self.round, "round_length_s": round(self.length / 1e6, 3),
            "batches": counts.batches, "checkpoints": counts.checkpoints,
            "restarts": counts.restarts, "elapsed_s": round(elapsed, 3),
            "events_per_s": round(counts.read / elapsed, 1) if elapsed > 0 else None,
            "latency_ms": {"p50": None, "p99": None},
            "cpu_s": {role: round(s, 3) for role, s in sorted(self.cpu.items())},
            "cpu_s_per_million": {role: round(s / million, 3) for role, s in sorted(self.cpu.items())},
            "driver_cpu_share": round(self.cpu.get("driver", 0.0) / total_cpu, 4) if total_cpu else None,
            "store": str(self.store.root),
            **dict(sorted(counts.steps.items())),
        }


def run_with_readers(spec: PipelineSpec, store_root: str | Path, inputs: list[str] | None = None,
                     clock: Clock = utc_now, resume: bool = False, run_id: str | None = None,
                     objects: dict[str, Any] | None = None,
                     progress: bool | None = False) -> dict[str, Any]:
    """Run a pipeline with ``spec.runtime.readers`` reader actors on the Ray this process is
    connected to; returns the summary (the driver path's, plus ``readers``, ``rounds``,
    ``cpu_s`` and ``cpu_s_per_million`` by kind of process). ``progress``: a progress bar
    (``None``: when stderr is a terminal)."""
    return ReaderRun(spec, store_root, inputs, clock, run_id, objects).execute(resume, progress)
