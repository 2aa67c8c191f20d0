"""``eventray bench``: the fraud pipeline measured against what users would run instead.

On one input (the fraud handbook's transactions when present, simulator data otherwise)
and one fitted model, in one run on one machine, the harness (:mod:`cluster.bench.harness`)
runs, each in its own process tree whose memory it samples:

- ``eventray``: the pipeline of ``configs/fraud.yaml`` on an embedded local Ray
  (:mod:`cluster.bench.eventray_run`), then paced replays at fixed offered rates for latency;
- ``batch``: the same work as one Polars / scikit-learn job (:mod:`cluster.bench.batch_job`);
- ``per_event``: a port of the per-event EventDrivenPattern design (:mod:`cluster.bench.per_event`);
- ``bytewax``: Bytewax 0.21 in its own virtual environment (:mod:`cluster.bench.bytewax_env`,
  :mod:`cluster.bench.bytewax_flow`).

and reports events/s and each system's ratio to eventray as JSON and PNG
(:mod:`cluster.bench.report`). Exceptions::

    PipelineError
    └── BenchError    the bench cannot run as asked (no input, a system failed to start)
"""

from __future__ import annotations

from pipelines.errors import PipelineError


class BenchError(PipelineError):
    """The bench cannot run as asked."""


__all__ = ["BenchError"]
