"""What a live run decided about each event, in the shape its callers are answered in.

A partition's batch of decisions is one row per applied event and step that scored it
(:data:`pipelines.keyed.DECISIONS_SCHEMA`). Callers want one answer per event: its scores
with the models that gave them, and the alerts they raised. ``POST /score`` answers its
waiting clients with them; a Redis source can add them to a stream of decisions.
"""

from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc


class DecisionSink(Protocol):
    """Where a partition hands each batch's decisions as soon as it is scored (picklable:
    it travels to the partition's actor, and connects there)."""

    def connect(self) -> None:
        """Connect now: called once in the partition's process as it starts, so that its
        first decisions do not wait for a lookup or a new connection. A sink it fails for
        connects on first use instead (it never stops the partition)."""

    def send(self, decisions: pa.Table) -> None:
        """Hand on a batch's decisions (rows of ``DECISIONS_SCHEMA``)."""


def answers(decisions: pa.Table, awaited: pa.Array | None = None) -> list[dict[str, Any]]:
    """One answer per event among ``decisions`` (only those in ``awaited`` when given): its
    ``event_id``, ``scores`` (step, model, score) and ``alerts`` (type, step, score,
    threshold), in the order the batch applied them.

    Example:
        >>> rows = pa.table({"event_id": ["a", "b"], "step": ["fraud"] * 2, "model": ["m@1"] * 2,
        ...                  "score": [0.9, 0.1], "alert": ["fraud.suspected", None],
        ...                  "threshold": [0.5, None]})
        >>> answers(rows, pa.array(["a"]))[0]["alerts"][0]["type"]
        'fraud.suspected'
        >>> [a["scores"][0]["score"] for a in answers(rows)]
        [0.9, 0.1]
    """
    if awaited is not None:
        decisions = decisions.filter(pc.is_in(decisions.column("event_id"), awaited))
    found: dict[str, dict[str, Any]] = {}
    for row in decisions.to_pylist():  # the rows of one batch: bounded by its size
        answer = found.setdefault(row["event_id"], {"event_id": row["event_id"],
                                                    "scores": [], "alerts": []})
        if row["step"] is not None:
            answer["scores"].append({"step": row["step"], "model": row["model"],
                                     "score": row["score"]})
        if row["alert"] is not None:
            answer["alerts"].append({"type": row["alert"], "step": row["step"],
                                     "score": row["score"], "threshold": row["threshold"]})
    return list(found.values())
