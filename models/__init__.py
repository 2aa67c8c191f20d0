"""Machine learning of eventray: fraud classifiers, streaming anomaly detectors, training,
evaluation protocols and the model registry. It sees feature columns, never the event
envelope, and never imports Ray.

Nothing is exported yet: the models arrive with the scoring work (features and ML issue).
"""

import models.detectors  # noqa: F401  (the established anomaly detectors register themselves)

__all__: list[str] = []
