"""Who wrote a store file or a checkpoint state: one type builds and parses the names.

A data file is named ``part-<writer>-<seq>.parquet``, its writer ``<run>-<owner>[-<step>]``:

- ``run``: the run's id (``r`` and hex digits: no ``-``);
- ``owner``: ``p0003`` for partition 3, ``ingest`` for the driver's dead letters,
  ``reader0002`` for reader actor 2's (runs with ``runtime.readers``), or
  ``stage.<name>.0001`` for a partition of an enrichment stage (checkpoint states only);
- ``step``: the step whose table rows these are (absent for the partition's events).

Step names may contain ``-``; run ids and owners never do, so a name parses one way.

Example:
    >>> w = WriterId.partition("r1a2b", 3, step="big-orders")
    >>> w.name, WriterId.parse(w.name) == w
    ('r1a2b-p0003-big-orders', True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from pipelines.errors import StoreError

_RUN = re.compile(r"^[A-Za-z0-9_]+$")
_OWNER = re.compile(r"^(p\d{4,}|ingest|reader\d{4,}|stage\.[a-z][a-z0-9_]*\.\d{4,})$")


@dataclass(frozen=True)
class WriterId:
    """The writer of store files and checkpoint states of one run."""

    run: str
    owner: str
    step: str | None = None

    def __post_init__(self) -> None:
        if not _RUN.match(self.run):
            raise StoreError(f"run id {self.run!r}: letters, digits and _ only")
        if not _OWNER.match(self.owner):
            raise StoreError(f"writer owner {self.owner!r} is not a partition, ingest, reader or stage")

    @classmethod
    def partition(cls, run: str, partition: int, step: str | None = None) -> WriterId:
        return cls(run, f"p{partition:04d}", step)

    @classmethod
    def ingest(cls, run: str) -> WriterId:
        return cls(run, "ingest")

    @classmethod
    def reader(cls, run: str, reader: int) -> WriterId:
        """The writer of reader actor ``reader``'s dead letters (and checkpoint state)."""
        return cls(run, f"reader{reader:04d}")

    @classmethod
    def stage(cls, run: str, stage: str, partition: int) -> WriterId:
        return cls(run, f"stage.{stage}.{partition:04d}")

    def for_step(self, step: str) -> WriterId:
        """This partition's writer of a step's table rows."""
        return replace(self, step=step)

    @property
    def local(self) -> str:
        """The name without the run: what :meth:`EventStore.truncate` takes."""
        return self.owner if self.step is None else f"{self.owner}-{self.step}"

    @property
    def name(self) -> str:
        return f"{self.run}-{self.local}"

    @classmethod
    def parse(cls, name: str) -> WriterId:
        """The writer a name stands for.

        Raises:
            StoreError: the name is not a writer's.
        """
        run, _, rest = name.partition("-")
        owner, _, step = rest.partition("-")
        return cls(run, owner, step or None)
