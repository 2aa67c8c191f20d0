"""The fraud application: card transactions scored as they stream, built on the public seams.

Nothing in the engine imports this package. It plugs in the way any installed package
does, through entry points (see ``pyproject.toml``):

- source kind ``transactions`` (:mod:`pipelines.fraud.source`): the transaction files,
  simulated on first use (:mod:`pipelines.fraud.simulator`);
- stage kind ``handbook_terminal`` and step kind ``fraud`` (:mod:`pipelines.fraud.flow`): the
  fraud handbook's 15 inputs in two keyed stages, and scoring with a registry model;
- the engine's generic label feed (``labels:`` in the config) plays the delayed fraud
  reports back as ``fraud.reported`` events.

Offline it has the handbook's features over a whole history (:mod:`pipelines.fraud.features`),
training (:mod:`pipelines.fraud.train`) and the handbook's evaluation protocol
(:mod:`pipelines.fraud.evaluation`), which ``eventray train`` and ``eventray evaluate fraud``
run.
"""
