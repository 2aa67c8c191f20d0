"""Row gathers on Arrow tables (large ones by Polars); a table as one Arrow IPC stream and back.

Reordering a batch (splitting it by partition, merging label events into it, grouping it
by store directory) is a gather of every column. Polars gathers a large batch's string and
nested columns faster than Arrow's ``take`` (about 3 ms against 5 ms for 38k envelope rows
in one chunk here), but its conversion costs 0.6-1 ms whatever the rows and grows with the
chunks: a live commit's 600 rows in 60 chunks took 15 ms through Polars, 0.6 ms by
``take``. So only large tables in few chunks go through Polars.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table.cast(schema)``, casting only the columns whose type differs: Arrow's table
    cast costs some 7 us a column even when no type changes (0.15 ms for a 20-column
    envelope), and a live batch of a few events went through such casts a dozen times on
    its way to a decision.

    Raises:
        ValueError: the names differ, as :meth:`pyarrow.Table.cast` raises.

    Example:
        >>> t = pa.table({"k": pa.array(["a"], pa.large_string()), "n": [1]})
        >>> schema = pa.schema([("k", pa.string()), ("n", pa.int64())])
        >>> conform(t, schema).schema == schema, conform(conform(t, schema), schema).schema == schema
        (True, True)
    """
    if table.schema.equals(schema, check_metadata=True):
        return table
    if table.schema.names != schema.names:
        raise ValueError(f"cannot conform columns {table.schema.names} to {schema.names}")
    columns = [column if column.type == field.type else column.cast(field.type)
               for column, field in zip(table.columns, schema, strict=True)]
    return pa.Table.from_arrays(columns, schema=schema)


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


#: Tables from this many rows, in at most :data:`POLARS_TAKE_CHUNKS` chunks, are gathered
#: by Polars (measured: at 36k rows in one chunk Polars and Arrow are even for the store's
#: tables, at 6k rows Arrow is 2.5-3x faster, and with a chunk per batch Arrow is 15-30x
#: faster at any size).
POLARS_TAKE_ROWS = 32_768
POLARS_TAKE_CHUNKS = 4


def take_rows(table: pa.Table, indices: np.ndarray) -> pa.Table:
    """``table``'s rows at ``indices``, in that order, in ``table``'s schema.

    Example:
        >>> take_rows(pa.table({"k": ["a", "b", "c"]}), np.array([2, 0]))["k"].to_pylist()
        ['c', 'a']
    """
    if (table.num_rows < POLARS_TAKE_ROWS or table.num_columns == 0
            or table.column(0).num_chunks > POLARS_TAKE_CHUNKS):
        return table.take(pa.array(indices, pa.int64()))
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    gathered = frame[np.asarray(indices, dtype=np.int64)]
    return gathered.to_arrow(compat_level=pl.CompatLevel.oldest()).cast(table.schema)
