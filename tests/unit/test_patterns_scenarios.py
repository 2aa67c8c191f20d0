"""The shipped pattern configs find exactly the instances the scenario generators plant
(precision and recall 1.0), run as a pipeline's patterns in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from pipelines import Pipeline
from pipelines.patterns.scenarios import (
    customer_scenario,
    fraud_scenario,
    monitoring_scenario,
    supply_chain_scenario,
)
from pipelines.testing import run_local

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TX_PAYLOAD = {"CUSTOMER_ID": "str", "TX_AMOUNT": "float", "TERMINAL_ID": "str",
              "TERMINAL_X": "float", "TERMINAL_Y": "float"}


def pipeline(patterns_file: str) -> Pipeline:
    return Pipeline.from_dict({
        "name": "scenario",
        "source": {"format": "jsonl", "path": ["-"], "order_ties_by": "event_id"},
        "mapping": {"event_id": "eventId", "event_type": "eventType", "timestamp": "timestamp",
                    "source": "source", "correlation_id": "correlationId",
                    "payload": {"json": "data"}, "metadata": {"json": "metadata"}},
        "event_types": {"transaction.created": {"key": "CUSTOMER_ID", "payload": TX_PAYLOAD}},
        "patterns": yaml.safe_load((CONFIGS / "patterns" / patterns_file).read_text())["patterns"]})


def found(out: dict[str, pl.DataFrame]) -> set[tuple[str, str, tuple[str, ...]]]:
    matches = out["events"].filter(pl.col("source") == "processor:patterns")
    data = matches["data"].struct
    return set(zip(data.field("pattern").to_list(), matches["key"].to_list(),
                   [tuple(ids) for ids in data.field("event_ids").to_list()], strict=True))


@pytest.mark.parametrize(("patterns_file", "scenario", "kinds"), [
    ("fraud.yaml", fraud_scenario, {"card-testing", "terminal-hopping", "far-terminals"}),
    ("supply-chain.yaml", supply_chain_scenario, {"order-fulfilled", "paid-not-shipped"}),
    ("customer.yaml", customer_scenario, {"abandoned-cart"}),
    ("monitoring.yaml", monitoring_scenario, {"errors-then-restart"}),
])
def test_planted_instances_are_found_exactly(patterns_file: str, scenario: Any, kinds: set[str]) -> None:
    events, truth = scenario(seed=3)
    assert {pattern for pattern, _, _ in truth} == kinds and len(truth) >= 10
    got = found(run_local(pipeline(patterns_file), events))
    true_positives = len(got & truth)
    assert (true_positives / len(got), true_positives / len(truth)) == (1.0, 1.0), \
        (sorted(got - truth)[:3], sorted(truth - got)[:3])
