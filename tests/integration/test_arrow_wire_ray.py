"""On Ray, the run's processes send tables as Arrow IPC streams: a partition actor's
receipt and the batch it was given arrive equal, and the payload is the IPC stream."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from cluster.arrow_wire import send_tables_as_ipc
from pipelines.tables import from_ipc
from tests.unit.test_arrow_wire import envelope_like

#: a table's payload names the module of its reading function when it travels as IPC
WIRE = from_ipc.__module__.encode()


def test_tables_cross_ray_as_ipc_streams_and_arrive_equal(ray_local: Any) -> None:
    import ray
    from ray import cloudpickle

    send_tables_as_ipc()
    table = envelope_like(50).slice(10, 5)
    assert WIRE in cloudpickle.dumps(table)

    @ray.remote
    def echo(rows: pa.Table) -> pa.Table:
        send_tables_as_ipc()  # as every actor of the run does when it starts
        assert WIRE in cloudpickle.dumps(rows)
        return rows.slice(1, 3)

    back = ray.get(echo.remote(table))
    assert back.equals(table.slice(1, 3), check_metadata=True)
