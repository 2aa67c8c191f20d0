"""Actions: what decisions set off outside the pipeline, delivered effectively once.

Rules come from the ``actions:`` section (:mod:`pipelines.action_rules`). Partitions write
action rows into an outbox (the ``actions`` table) in the apply that makes the decision
(:mod:`pipelines.actions.outbox`); once a checkpoint commits them, dispatchers deliver
them (:mod:`pipelines.actions.dispatch`, kinds in :mod:`pipelines.actions.kinds`),
recording every attempt in ``action_attempts`` and parking hopeless ones in
``actions_deadletter`` (:mod:`pipelines.actions.ledger`).
:mod:`pipelines.actions.receiver` is a webhook receiver for tests and benchmarks. This
package never imports Ray; ``cluster.dispatchers`` runs the dispatchers as actors.

Exceptions::

    PipelineError
    └── DeliveryFailed    one attempt failed (``retryable``, ``retry_after``, ``reason``);
                          it never leaves a delivery: a hopeless action is a dead letter
"""

from __future__ import annotations

from pipelines.action_rules import ActionRuleSpec, ActionsSpec, BreakerSpec, RetrySpec

__all__ = ["ActionRuleSpec", "ActionsSpec", "BreakerSpec", "RetrySpec"]
