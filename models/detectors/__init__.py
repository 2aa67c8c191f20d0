"""Established streaming anomaly detectors, each written from its published description.

Every detector here is a :class:`models.anomaly.StreamingDetector` (per-key state, plain
snapshots, the same scores for any split of a stream into batches) and is registered in
:data:`models.anomaly.DETECTORS`:

- ``cad_ose``: contextual anomaly detector in the manner of CAD OSE (:mod:`.contextual`);
- ``knn_cad``: conformalised k-nearest-neighbour detector (:mod:`.knn_cad`);
- ``bocpd``: Bayesian online change-point detection (:mod:`.changepoint`);
- ``relative_entropy``: histogram regimes compared by relative entropy
  (:mod:`.relative_entropy`);
- ``likelihood``: any of them post-processed into its anomaly likelihood (:mod:`.likelihood`);
- ``ensemble``: several detectors combined by their minimum (or mean), reported at a burst's
  onset (:mod:`.ensemble`).
"""

from __future__ import annotations

import models.anomaly  # noqa: F401  (first: the base classes, then the registry imports us)
from models.detectors.changepoint import ChangePointDetector
from models.detectors.contextual import ContextualDetector
from models.detectors.ensemble import EnsembleDetector
from models.detectors.knn_cad import KnnCadDetector
from models.detectors.likelihood import LikelihoodDetector
from models.detectors.relative_entropy import RelativeEntropyDetector

__all__ = [
    "ChangePointDetector",
    "ContextualDetector",
    "EnsembleDetector",
    "KnnCadDetector",
    "LikelihoodDetector",
    "RelativeEntropyDetector",
]
