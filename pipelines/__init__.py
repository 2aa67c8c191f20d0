"""Engine-agnostic event logic on Arrow batches; never imports Ray.

The public surface: :class:`Pipeline` (build, ``register_processor``, ``run``), the
envelope and its schemas, config specs, sources, normalisation, keyed partitioning, the
processing seams (:class:`Step`, :class:`StepOutput`, the plugin registries), the event
store, and the testing kit in :mod:`pipelines.testing`.
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
from pipelines.kinds import SOURCE_KINDS, STAGE_KINDS, STEP_KINDS, SourceKind
from pipelines.normalise import Normalised, Normaliser
from pipelines.pacing import Pacer
from pipelines.pipeline import RUNNERS, Pipeline, load_pipeline
from pipelines.plugins import PluginImportError, PluginRegistry
from pipelines.processing import ROW_POSITION, Step, StepContext, StepOutput
from pipelines.processors import ProcessorError
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
from pipelines.spec import PipelineSpec
from pipelines.store import EventStore

__all__ = [
    "DEADLETTER_SCHEMA",
    "ROW_POSITION",
    "RUNNERS",
    "SOURCE_KINDS",
    "STAGE_KINDS",
    "STEP_KINDS",
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
    "Pipeline",
    "PipelineError",
    "PipelineSpec",
    "PluginImportError",
    "PluginRegistry",
    "ProcessorError",
    "RawBatch",
    "SchemaError",
    "SequenceGapError",
    "Source",
    "SourceError",
    "SourceKind",
    "SourceReader",
    "Step",
    "StepContext",
    "StepOutput",
    "StoreError",
    "UnknownPluginError",
    "derived_event_ids",
    "envelope_schema",
    "iter_batches",
    "load_pipeline",
    "partition_of",
    "split_by_partition",
]
