"""The one stable hash of the project, and the key-to-partition function built on it.

64-bit FNV-1a over the UTF-8 bytes of each string, computed column-wise with numpy (one
vector step per byte position, not one Python call per row). It is defined here, not
borrowed from a library whose hash may change between releases (Python's ``hash()`` is
salted per process; polars documents its hash as unstable across versions): partitions and
duplicate filters must agree across processes, restarts and upgrades.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def fnv1a64(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """FNV-1a 64 of each string (nulls hash like the empty string).

    Example:
        >>> import pyarrow as pa
        >>> hex(int(fnv1a64(pa.array(["a"]))[0]))
        '0xaf63dc4c8601ec8c'
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks() if strings.num_chunks else pa.array([], pa.string())
    arr = pc.fill_null(strings.cast(pa.large_string()), "")
    n = len(arr)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    longest = int(lengths.max()) if n else 0
    with np.errstate(over="ignore"):
        for pos in range(longest):
            rows = np.flatnonzero(lengths > pos) if pos else np.flatnonzero(lengths > 0)
            byte = data[starts[rows] + pos].astype(np.uint64)
            h[rows] = (h[rows] ^ byte) * _FNV_PRIME
    return h


def partition_of(keys: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The partition (0..partitions-1) that owns each key: the only routing function.

    Example:
        >>> import pyarrow as pa
        >>> partition_of(pa.array(["c1", "c2", "c1"]), 4).tolist()
        [1, 0, 1]
    """
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    return (fnv1a64(keys) % np.uint64(partitions)).astype(np.int64)
