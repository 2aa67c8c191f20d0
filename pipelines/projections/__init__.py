"""Event-sourced projections: declared folds of event types into per-key state tables.

A projection (:class:`~pipelines.projection_spec.ProjectionSpec`, under ``projections:`` in
a pipeline config) is folded in the stream by a ``projection`` step in the keyed partitions
(:class:`ProjectionStep`, writing the changed keys' states to the table named after it), and
rebuilt offline from the store's history with snapshots (:class:`Projection`), where
``Projection(spec, store).state(key, as_of=T)`` is the key's state at event time ``T``. Both
use one vectorised fold (:class:`ProjectionFold`), so online equals offline.

Example:
    >>> from pipelines.projections import CUSTOMER_PROFILE
    >>> [f.op for f in CUSTOMER_PROFILE.fields]
    ['count', 'sum', 'last', 'set', 'last']
"""

from pipelines.projection_spec import CUSTOMER_PROFILE, EventMatch, FieldSpec, ProjectionSpec
from pipelines.projections.fold import ProjectionFold
from pipelines.projections.offline import Projection
from pipelines.projections.step import ProjectionStep, ProjectionStepSpec

__all__ = [
    "CUSTOMER_PROFILE",
    "EventMatch",
    "FieldSpec",
    "Projection",
    "ProjectionFold",
    "ProjectionSpec",
    "ProjectionStep",
    "ProjectionStepSpec",
]
