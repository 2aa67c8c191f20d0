"""Tables cross Ray processes as Arrow IPC streams (:mod:`cluster.arrow_wire`, with
:func:`pipelines.tables.to_ipc`): what
arrives equals what was sent, types, metadata and slices included."""

from __future__ import annotations

import datetime as dt
import pickle

import numpy as np
import pyarrow as pa
import pytest

from pipelines.tables import from_ipc, to_ipc


def envelope_like(rows: int) -> pa.Table:
    """Nested, nullable, timestamped, large strings and metadata: a routed batch's kinds."""
    stamp = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    table = pa.table({
        "event_id": pa.array([f"e{i}" for i in range(rows)], pa.large_string()),
        "timestamp": pa.array([stamp + dt.timedelta(seconds=i) for i in range(rows)],
                              pa.timestamp("us", "UTC")),
        "data": pa.array([{"CUSTOMER_ID": i, "TX_AMOUNT": None if i % 3 else float(i)}
                          for i in range(rows)]),
        "tags": pa.array([[str(i)] * (i % 3) for i in range(rows)]),
        "kind": pa.array(["a", "b"] * (rows // 2) + ["a"] * (rows % 2)).dictionary_encode(),
        "score": pa.array(np.linspace(0, 1, rows)),
    })
    return table.replace_schema_metadata({"eventray": "1"})


@pytest.mark.parametrize("rows", [0, 1, 7, 5_000])
def test_a_table_comes_back_equal(rows: int) -> None:
    table = envelope_like(rows)
    back = from_ipc(to_ipc(table))
    assert back.equals(table, check_metadata=True) and back.schema == table.schema


def test_a_slice_sends_only_its_rows() -> None:
    whole = envelope_like(20_000)
    piece = whole.slice(10_000, 3)
    wire = to_ipc(piece)
    assert from_ipc(wire).equals(piece)
    assert wire.size < to_ipc(whole.slice(0, 100)).size  # not the whole buffers
    assert from_ipc(pickle.loads(pickle.dumps(wire))).equals(piece)  # as Ray ships it
