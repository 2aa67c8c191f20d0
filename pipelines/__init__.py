"""Engine-agnostic event logic on Arrow batches; never imports Ray.

The public surface: the envelope and its schemas, config specs, sources, normalisation,
keyed partitioning, the event store, the simulator and the testing helpers.
"""

from pipelines.dedup import DuplicateFilter
from pipelines.envelope import (
    DEADLETTER_SCHEMA,
    Envelope,
    Metadata,
    PayloadRegistry,
    PayloadSchema,
    envelope_schema,
)
from pipelines.errors import (
    AccountingError,
    ConfigError,
    PipelineError,
    SchemaError,
    StoreError,
    UnknownPluginError,
)
from pipelines.event_ids import derived_event_ids
from pipelines.hashing import partition_of
from pipelines.keyed import BatchReceipt, PartitionWorker, SequenceGapError, split_by_partition
from pipelines.normalise import Normalised, Normaliser
from pipelines.pacing import Pacer
from pipelines.sources import (
    CsvSource,
    JsonLinesSource,
    ParquetSource,
    RawBatch,
    Source,
    SourceError,
    SourceReader,
    iter_batches,
)
from pipelines.spec import PipelineSpec, load_pipeline
from pipelines.store import EventStore

__all__ = [
    "DEADLETTER_SCHEMA",
    "AccountingError",
    "BatchReceipt",
    "ConfigError",
    "CsvSource",
    "DuplicateFilter",
    "Envelope",
    "EventStore",
    "JsonLinesSource",
    "Metadata",
    "Normalised",
    "Normaliser",
    "Pacer",
    "ParquetSource",
    "PartitionWorker",
    "PayloadRegistry",
    "PayloadSchema",
    "PipelineError",
    "PipelineSpec",
    "RawBatch",
    "SchemaError",
    "SequenceGapError",
    "Source",
    "SourceError",
    "SourceReader",
    "StoreError",
    "UnknownPluginError",
    "derived_event_ids",
    "envelope_schema",
    "iter_batches",
    "load_pipeline",
    "partition_of",
    "split_by_partition",
]
