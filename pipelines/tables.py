"""Row gathers on Arrow tables, done by Polars; a table as one Arrow IPC stream and back.

Reordering a batch (splitting it by partition, merging label events into it, grouping it
by store directory) is a gather of every column. Polars gathers string and nested columns
several times faster than Arrow's ``take`` (about 3 ms against 5 ms for 38k envelope rows
here), so the hot path gathers through it and casts back to the table's own schema.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa


def to_ipc(table: pa.Table) -> pa.Buffer:
    """``table`` as one Arrow IPC stream: its schema (metadata included), then its rows; a
    slice is written as its slice. Snapshots keep it as bytes (``.to_pybytes()``).

    Example:
        >>> from_ipc(to_ipc(pa.table({"k": ["a"]}))).to_pydict()
        {'k': ['a']}
    """
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def from_ipc(data: pa.Buffer | bytes) -> pa.Table:
    """The table of :func:`to_ipc` (zero-copy over ``data``)."""
    return pa.ipc.open_stream(data).read_all()


def take_rows(table: pa.Table, indices: np.ndarray) -> pa.Table:
    """``table``'s rows at ``indices``, in that order, in ``table``'s schema.

    Example:
        >>> take_rows(pa.table({"k": ["a", "b", "c"]}), np.array([2, 0]))["k"].to_pylist()
        ['c', 'a']
    """
    if table.num_rows == 0 or table.num_columns == 0:
        return table.take(pa.array(indices, pa.int64()))
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    gathered = frame[np.asarray(indices, dtype=np.int64)]
    return gathered.to_arrow(compat_level=pl.CompatLevel.oldest()).cast(table.schema)
