"""Consistent checkpoints of a run, written durably beside the store.

A checkpoint is taken at a source-batch boundary, like an aligned barrier: the driver has
handed every partition all the pieces of the batches before it, each partition actor
snapshots its state after applying them (calls run in order) and writes it here, then the
driver commits a manifest naming the source offsets, every partition's next sequence
number and state file, the dead-letter sequence, the duplicate filter and the counters.
The manifest is the commit: written last, atomically, fsync'ed. A state file without a
manifest is ignored. Before any state file or manifest is written, the store folders this
process changed are fsynced (:func:`pipelines.store.sync_written_folders`; each data file
itself was fsynced before its rename), so the order on disk is data files, their folders,
state, manifest: a committed checkpoint never covers a file a crash could lose.

Layout: ``STORE/_checkpoints/<run>/{manifest-<epoch>.json, p<i>-<epoch>.state, dedup-<epoch>.bin}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.durable import write_durably
from pipelines.errors import PipelineError
from pipelines.store import sync_written_folders

CHECKPOINT_DIR = "_checkpoints"
_MANIFEST = re.compile(r"^manifest-(\d{12})\.json$")


class StateRestoreError(PipelineError):
    """A checkpoint exists but cannot be read back."""


@dataclass(frozen=True)
class Checkpoint:
    """What a committed checkpoint says; everything needed to continue exactly once."""

    epoch: int
    source_offsets: dict[str, int]
    partition_seqs: dict[int, int]
    deadletter_seq: int
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    #: enrichment stage name -> its partitions' next sequence numbers
    stage_seqs: dict[str, dict[int, int]] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["partition_seqs"] = {str(k): v for k, v in self.partition_seqs.items()}
        data["stage_seqs"] = {name: {str(k): v for k, v in seqs.items()}
                              for name, seqs in self.stage_seqs.items()}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        data = json.loads(text)
        data["partition_seqs"] = {int(k): v for k, v in data["partition_seqs"].items()}
        data["stage_seqs"] = {name: {int(k): v for k, v in seqs.items()}
                              for name, seqs in data.get("stage_seqs", {}).items()}
        return cls(**data)


class CheckpointStore:
    """The checkpoints of one run.

    Example:
        >>> import tempfile
        >>> ckpts = CheckpointStore(tempfile.mkdtemp(), "r1")
        >>> ckpts.write_state(1, "p0", b"s")
        >>> ckpts.commit(Checkpoint(1, {"a.parquet": 10}, {0: 3}, deadletter_seq=2))
        >>> ckpts.latest().partition_seqs, ckpts.read_state(1, "p0")
        ({0: 3}, b's')
    """

    def __init__(self, store_root: str | Path, run: str) -> None:
        self.directory = Path(store_root) / CHECKPOINT_DIR / run

    def write_state(self, epoch: int, owner: str, state: bytes) -> None:
        sync_written_folders()  # the store files this state covers are durable first
        write_durably(self.directory / f"{owner}-{epoch:012d}.state", state)

    def read_state(self, epoch: int, owner: str) -> bytes:
        path = self.directory / f"{owner}-{epoch:012d}.state"
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StateRestoreError(f"checkpoint {epoch}: state of {owner} unreadable: {exc}") from exc

    def commit(self, checkpoint: Checkpoint) -> None:
        """Commit a checkpoint: this process's store folders, then the manifest, durably."""
        sync_written_folders()
        write_durably(self.directory / f"manifest-{checkpoint.epoch:012d}.json",
                      checkpoint.to_json().encode())
        self._prune(keep=2)

    def latest(self) -> Checkpoint | None:
        epochs = self._epochs()
        if not epochs:
            return None
        path = self.directory / f"manifest-{epochs[-1]:012d}.json"
        try:
            return Checkpoint.from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise StateRestoreError(f"checkpoint manifest {path} unreadable: {exc}") from exc

    def clear(self) -> None:
        """Forget every checkpoint of the run (a fresh run starts from nothing)."""
        for path in self.directory.glob("*"):
            path.unlink(missing_ok=True)

    def _epochs(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (_MANIFEST.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _prune(self, keep: int) -> None:
        epochs = self._epochs()
        if len(epochs) <= keep:
            return
        oldest_kept = epochs[-keep]
        for path in self.directory.iterdir():
            match = re.search(r"-(\d{12})\.(json|state)$", path.name)
            if match and int(match.group(1)) < oldest_kept:
                path.unlink(missing_ok=True)
