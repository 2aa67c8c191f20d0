"""What happened to each action: committed outbox rows, attempts, and dead letters.

The outbox is read only where a committed checkpoint covers it: a partition's file
``part-<run>-p<i>-_actions-<seq>`` is committed once the run's last manifest says the
partition's next sequence number is past ``seq`` (files past it may still be rewritten by a
replay, or removed by a resume). Dispatchers record every attempt in ``action_attempts``
and hopeless actions in ``actions_deadletter``; an attempt row with status ``delivered`` is
the durable acknowledgement that keeps a replay from sending an action again.

Ledger files are named ``part-<run>_ledger-<owner>-<seq>``: a fresh run of the same input
(which clears the run's own files) keeps them, so an action acknowledged once is never sent
again from this store, whatever reruns follow.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path

import polars as pl
import pyarrow as pa

from pipelines.actions.outbox import ACTIONS_SCHEMA, ACTIONS_STEP
from pipelines.checkpoint import CheckpointStore
from pipelines.envelope import TIMESTAMP
from pipelines.store import EventStore

ATTEMPTS_TABLE, DEADLETTER_TABLE = "action_attempts", "actions_deadletter"
_OUTBOX_FILE = re.compile(
    rf"^part-(?P<run>[^-]+)-p(?P<partition>\d{{4,}})-{ACTIONS_STEP}-(?P<seq>\d{{12}})\.parquet$")

#: Statuses of an attempt: ``delivered`` (2xx: acknowledged), ``failed`` (retryable),
#: ``breaker_open`` (not sent: the endpoint's breaker is open), ``refused`` (not sent or not
#: retried: the host is not allowed, a redirect, a 4xx, an endpoint gone with 410).
ATTEMPTS_SCHEMA = pa.schema([
    pa.field("action_id", pa.string(), nullable=False),
    pa.field("rule", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("event_type", pa.string(), nullable=False),
    pa.field("timestamp", TIMESTAMP, nullable=False),
    pa.field("attempt", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("http_status", pa.int32()),
    pa.field("latency_ms", pa.float64()),
    pa.field("dispatch_ms", pa.float64()),  # decision to 2xx, delivered attempts only
    pa.field("error", pa.string()),
    pa.field("attempted_at", TIMESTAMP, nullable=False),
    pa.field("dispatcher", pa.string(), nullable=False),
])
DEADLETTER_SCHEMA = pa.schema([
    *ACTIONS_SCHEMA,
    pa.field("reason", pa.string(), nullable=False),
    pa.field("attempts", pa.int32(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("deadlettered_at", TIMESTAMP, nullable=False),
])


def committed_outbox_files(store: EventStore, run: str, seen: set[Path]) -> list[Path]:
    """The run's outbox files a committed checkpoint covers, less those in ``seen``."""
    latest = CheckpointStore(store.root, run).latest()
    if latest is None:
        return []
    found = []
    pattern = f"event_type=*/date=*/part-{run}-p*-{ACTIONS_STEP}-*.parquet"
    for path in store.table_dir("actions").glob(pattern):
        match = _OUTBOX_FILE.match(path.name)
        if path in seen or match is None or match["run"] != run:
            continue
        if int(match["seq"]) < latest.partition_seqs.get(int(match["partition"]), 0):
            found.append(path)
    return sorted(found)


def _ids(store: EventStore, table: str, status: str | None = None) -> set[str]:
    files = store.files(table)
    if not files:
        return set()
    frame = pl.scan_parquet(files, hive_partitioning=False)
    if status is not None:
        frame = frame.filter(pl.col("status") == status)
    return set(frame.select("action_id").unique().collect()["action_id"].to_list())


def delivered_ids(store: EventStore) -> set[str]:
    """Every action acknowledged (a ``delivered`` attempt) in this store."""
    return _ids(store, ATTEMPTS_TABLE, "delivered")


def deadlettered_ids(store: EventStore) -> set[str]:
    """Every action parked in ``actions_deadletter`` in this store."""
    return _ids(store, DEADLETTER_TABLE)


class LedgerWriter:
    """Buffers attempt and dead-letter rows and writes them durably in small files.

    Args:
        store: the event store.
        run: the run's id (``retry`` for ``eventray actions retry``).
        owner: the writer (``dispatcher-0``); with a fresh incarnation id, so a restarted
            dispatcher never overwrites its predecessor's files.
    """

    def __init__(self, store: EventStore, run: str, owner: str) -> None:
        self.store = store
        self.writer = f"{run}_ledger-{owner}.{uuid.uuid4().hex[:8]}"
        self.seq = 0
        self.attempts: list[dict] = []
        self.dead: list[dict] = []

    def attempt(self, row: dict) -> None:
        self.attempts.append(row)

    def deadletter(self, row: dict) -> None:
        self.dead.append(row)

    @property
    def buffered(self) -> int:
        return len(self.attempts) + len(self.dead)

    def flush(self) -> int:
        """Write what is buffered (fsynced, folders too) and return the rows written."""
        written = 0
        for table, rows, schema in ((ATTEMPTS_TABLE, self.attempts, ATTEMPTS_SCHEMA),
                                    (DEADLETTER_TABLE, self.dead, DEADLETTER_SCHEMA)):
            if rows:
                self.store.write(table, pa.Table.from_pylist(rows, schema), self.writer, self.seq)
                written += len(rows)
        if written:
            self.store.sync()  # the acknowledgements are durable before anyone relies on them
            self.seq += 1
            self.attempts, self.dead = [], []
        return written


def run_outcomes(store: EventStore, run: str) -> dict[str, object]:
    """Delivered, dead-lettered and pending actions among the run's committed outbox, and
    the dispatch latency (decision to 2xx) of the delivered ones, for the summary."""
    files = committed_outbox_files(store, run, set())
    if not files:
        return {"actions": 0, "delivered": 0, "dead_lettered": 0, "pending": 0,
                "dispatch_ms": {"p50": None, "p99": None}}
    ids = pl.scan_parquet(files, hive_partitioning=False).select("action_id").unique().collect()
    delivered, dead = delivered_ids(store), deadlettered_ids(store)
    mine = set(ids["action_id"].to_list())
    done, parked = mine & delivered, (mine & dead) - delivered
    latency = pl.Series([], dtype=pl.Float64)
    if store.files(ATTEMPTS_TABLE):
        latency = (pl.scan_parquet(store.files(ATTEMPTS_TABLE), hive_partitioning=False)
                   .filter(pl.col("status") == "delivered", pl.col("action_id").is_in(list(done)))
                   .group_by("action_id").agg(pl.col("dispatch_ms").min()).collect()["dispatch_ms"])
    p50, p99 = ((round(float(latency.quantile(q, "nearest")), 2) for q in (0.5, 0.99))
                if len(latency) else (None, None))
    return {"actions": len(mine), "delivered": len(done), "dead_lettered": len(parked),
            "pending": len(mine - done - parked), "dispatch_ms": {"p50": p50, "p99": p99}}


def utc_now() -> dt.datetime:
    """The wall clock, UTC: the default clock of dispatchers (tests inject their own)."""
    return dt.datetime.now(dt.UTC)
