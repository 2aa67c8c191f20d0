"""Actions: what decisions set off outside the pipeline, delivered effectively once.

Partitions write action rows into an outbox (the ``actions`` table) in the apply that makes
the decision (:mod:`pipelines.actions.outbox`); once a checkpoint commits them, dispatchers
deliver them (:mod:`pipelines.actions.dispatch`), recording every attempt in
``action_attempts`` and parking hopeless ones in ``actions_deadletter``
(:mod:`pipelines.actions.ledger`). This package never imports Ray; ``cluster.dispatchers``
runs the dispatchers as actors.

Exceptions (all :class:`~pipelines.errors.PipelineError`)::

    DeliveryFailed            an attempt failed; ``retryable`` and ``retry_after`` say how
    └── (raised inside the retry loop only; a hopeless action is a dead letter, not an error)
"""

from __future__ import annotations

from pipelines.action_rules import ActionRuleSpec, ActionsSpec, BreakerSpec, RetrySpec

__all__ = ["ActionRuleSpec", "ActionsSpec", "BreakerSpec", "RetrySpec"]
