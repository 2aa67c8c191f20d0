"""The contract between a live source (HTTP journal, Redis Streams, MQTT) and the runtime.

A file source ends; a live one does not. It hands over what has arrived, says where it
stands, and acknowledges upstream only what a committed checkpoint covers, so that
acknowledged means durable (invariant 1 in DESIGN.md):

1. ``open(resume)`` with the positions of the last committed checkpoint (``None`` on a
   fresh run): the source resumes there; anything after it that upstream still holds
   unacknowledged (a Redis consumer group's pending entries, an MQTT persistent session's
   unacked messages, the journal after its committed offset) is read again.
2. ``poll(max_rows, timeout)`` returns the batches that arrived (possibly none) within
   ``timeout`` seconds; each :class:`~pipelines.sources.RawBatch` carries ``part`` and
   strictly increasing integer ``offsets`` within that part.
3. ``positions()`` is the state to store in the next checkpoint: it covers every batch
   returned so far.
4. ``committed(positions)`` is called once the checkpoint holding ``positions`` is durable;
   only then does the source acknowledge upstream (``XACK``, PUBACK, journal truncation).
5. ``close()`` releases connections; it acknowledges nothing.
6. Optionally, ``decision_sink()`` returns a :class:`~pipelines.decisions.DecisionSink`
   (or ``None``): the source's own reply channel, to which every partition hands each
   batch's decisions as soon as it is scored (a Redis stream of decisions).

A re-delivered record is the same event (its ``event_id`` is the producer's, or derived
from its part and offset), so the run's duplicate filter drops what was already stored.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from pipelines.sources import RawBatch


@runtime_checkable
class LiveSource(Protocol):
    """A source without an end, read by polling and acknowledged after each commit."""

    name: str

    def open(self, resume: dict[str, Any] | None) -> None:
        """Connect, and resume after the positions of the last committed checkpoint."""

    def poll(self, max_rows: int, timeout: float) -> list[RawBatch]:
        """The batches that arrived within ``timeout`` seconds, at most ``max_rows`` rows."""

    def positions(self) -> dict[str, Any]:
        """Where the source stands: JSON-serialisable, covers every batch returned so far."""

    def committed(self, positions: dict[str, Any]) -> None:
        """A checkpoint covering ``positions`` is durable: acknowledge upstream up to there."""

    def close(self) -> None:
        """Release connections without acknowledging anything."""
