"""Action rules in config and the outbox a partition writes (no network, no Ray)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import pipelines.actions
from cluster.job import run_in_process
from pipelines.action_rules import ActionsSpec, BreakerSpec, retry_after_seconds
from pipelines.actions.dispatch import CircuitBreaker
from pipelines.actions.outbox import ACTIONS_STEP, ActionRules
from pipelines.envelope import envelope_schema
from pipelines.errors import ConfigError, UnknownPluginError
from pipelines.event_ids import EVENTRAY_NAMESPACE
from pipelines.keyed import PartitionWorker
from pipelines.pipeline import Pipeline, load_pipeline, validate_spec
from pipelines.testing import FakeClock, ListSink
from tests.support import ROOT

HOOK = {"name": "hook", "event_types": ["user.*"], "kind": "webhook", "url": "http://127.0.0.1:9/h"}


def with_actions(actions: Any) -> dict[str, Any]:
    raw = load_pipeline(ROOT / "configs" / "events.yaml").model_dump(by_alias=True, exclude_unset=True)
    raw["source"]["path"] = [str(ROOT / "examples" / "events.jsonl")]
    return {**raw, "actions": actions}


def test_public_names_are_pinned() -> None:
    assert sorted(pipelines.actions.__all__) == ["ActionRuleSpec", "ActionsSpec", "BreakerSpec", "RetrySpec"]


def test_the_issue_example_validates_with_rates_durations_and_the_default_allow_list() -> None:
    spec = ActionsSpec.model_validate([{
        "name": "notify-risk-team", "event_types": ["fraud.suspected", "fraud.card_testing"],
        "where": "key <> 'test'", "kind": "webhook", "url": "http://127.0.0.1:9000/hooks/fraud",
        "secret_env": "FRAUD_HOOK_SECRET", "rate_limit": "200/s",
        "retry": {"attempts": 8, "backoff": "exponential", "max_delay": "5m"}}])
    rule = spec.rules[0]
    assert (rule.rate_limit, rule.retry.max_delay, rule.retry.attempts) == (200.0, 300.0, 8)
    assert spec.allowed_hosts(rule) == ["127.0.0.1"] and spec.secret_envs() == ["FRAUD_HOOK_SECRET"]


@pytest.mark.parametrize(("actions", "names"), [
    ([{**HOOK, "rate_limit": "fast"}], "actions.rules.0.rate_limit"),
    ([{**HOOK, "url": "ftp://127.0.0.1/x"}], "actions.rules.0.url"),
    ([{**HOOK, "retry": {"attempts": 0}}], "actions.rules.0.retry.attempts"),
    ([{**HOOK, "url": None}], "a webhook action needs url"),
    ({"allow_hosts": ["hooks.internal"], "rules": [HOOK]}, "host '127.0.0.1' is not in the allow-list"),
    ([{**HOOK, "where": "read_csv('/etc/passwd') IS NULL"}], "actions.rules.0.where (action 'hook')"),
    ([{**HOOK, "secret_env": "not a name"}], "actions.rules.0.secret_env"),
    ([HOOK, HOOK], "action names must be unique"),
])
def test_bad_action_config_fails_at_start_up_naming_the_field(actions: Any, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace(")", r"\)")):
        validate_spec(with_actions(actions), "pipeline")


def test_an_unknown_kind_names_the_field_and_the_allowed_kinds() -> None:
    with pytest.raises(UnknownPluginError, match=r"actions.rules.0.kind: unknown action kind 'pager'.*"
                       r"notify.*update.*webhook.*workflow"):
        validate_spec(with_actions([{**HOOK, "kind": "pager"}]), "pipeline")


def test_a_missing_secret_is_a_start_up_error_naming_the_variable(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_HOOK_SECRET", raising=False)
    spec = validate_spec(with_actions([{**HOOK, "secret_env": "NO_SUCH_HOOK_SECRET"}]), "pipeline")
    with pytest.raises(ConfigError, match="environment variable NO_SUCH_HOOK_SECRET is not set"):
        run_in_process(spec, tmp_path / "store")
    assert not (tmp_path / "store" / "events").exists()  # nothing ran


def rules(actions: Any) -> ActionRules:
    spec = validate_spec(with_actions(actions), "pipeline")
    assert spec.actions is not None
    return ActionRules(spec.actions, envelope_schema(spec.registry()))


def envelope_rows(types: list[str], sources: list[str] | None = None) -> pa.Table:
    n = len(types)
    schema = envelope_schema(load_pipeline(ROOT / "configs" / "events.yaml").registry())
    rows = {"event_id": [f"e{i}" for i in range(n)], "event_type": types,
            "timestamp": [1_700_000_000_000_000 + i for i in range(n)],
            "source": sources or ["web"] * n, "correlation_id": [f"c{i}" for i in range(n)],
            "key": [f"k{i}" for i in range(n)],
            "data": [{"json": f'{{"user": "u{i}", "score": {i / 10}, "who": "w{i}"}}'} for i in range(n)],
            "metadata": [{"version": "1", "region": None, "ingested_at": 0, "tags": None}] * n}
    return pa.Table.from_pydict(rows, schema=schema)


def test_the_outbox_is_written_in_the_apply_that_decides_with_ids_of_event_and_rule() -> None:
    sink = ListSink()
    worker = PartitionWorker(0, sink, clock=FakeClock(), actions=rules([HOOK]))
    batch = envelope_rows(["user.login", "iot.reading", "user.logout"])
    worker.apply(0, batch)
    outbox = sink.table("actions")
    assert list(sink.batches["actions"]) == [(f"local-p0000-{ACTIONS_STEP}", 0)]  # same seq as events
    expected = [str(uuid.uuid5(EVENTRAY_NAMESPACE, f"e{i}/hook")) for i in (0, 2)]
    assert outbox["action_id"].to_pylist() == expected
    assert outbox["url"].to_pylist() == ["http://127.0.0.1:9/h"] * 2
    assert '"data":{"user": "u2", "score": 0.2, "who": "w2"}' in outbox["body"][1].as_py()
    replayed = ListSink()
    PartitionWorker(0, replayed, clock=FakeClock(), actions=rules([HOOK])).apply(0, batch)
    assert replayed.table("actions").equals(outbox)  # a replay writes the same rows


def test_events_a_step_derived_trigger_where_decided_not_again_where_stored() -> None:
    outbox = rules([{**HOOK, "event_types": ["*"]}])
    decided = envelope_rows(["fraud.suspected"], ["step:fraud"])
    stored_later = envelope_rows(["fraud.suspected", "user.login"], ["step:fraud", "web"])
    assert outbox.apply([decided], envelope_rows([]), FakeClock()()).tables["actions"].num_rows == 1
    again = outbox.apply([], stored_later, FakeClock()()).tables["actions"]
    assert again["event_type"].to_pylist() == ["user.login"]


def test_url_templates_fill_from_the_trigger_and_where_filters_rows() -> None:
    outbox = rules({"allow_hosts": ["127.0.0.1"], "rules": [{
        **HOOK, "url": "http://127.0.0.1:9/users/{data.user}/{key}", "where": "key <> 'k0'"}]})
    rows = outbox.apply([], envelope_rows(["user.login", "user.login"]), FakeClock()()).tables["actions"]
    assert rows["url"].to_pylist() == ["http://127.0.0.1:9/users/u1/k1"]


def test_where_reads_the_fields_of_json_payloads_as_numbers_or_text() -> None:
    batch = envelope_rows(["fraud.suspected"] * 3, ["step:fraud"] * 3)
    by_score = rules([{**HOOK, "event_types": ["fraud.*"], "where": "data.score > 0.05"}])
    assert by_score.apply([batch], envelope_rows([]), FakeClock()()).tables["actions"]["event_id"] \
        .to_pylist() == ["e1", "e2"]
    by_text = rules([{**HOOK, "event_types": ["fraud.*"], "where": "data.who = 'w2' OR key = 'k0'"}])
    assert by_text.apply([batch], envelope_rows([]), FakeClock()()).tables["actions"]["event_id"] \
        .to_pylist() == ["e0", "e2"]


def test_the_target_carries_settings_and_the_allow_list_never_a_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", "whsec_c2VjcmV0LXZhbHVl")
    outbox = rules([{**HOOK, "secret_env": "HOOK_SECRET"}])
    rows = outbox.apply([], envelope_rows(["user.login"]), FakeClock()()).tables["actions"]
    target = rows["target"][0].as_py()
    assert '"secret_env":"HOOK_SECRET"' in target and '"allow_hosts":["127.0.0.1"]' in target
    assert "c2VjcmV0LXZhbHVl" not in target


def test_python_api_adds_actions_to_a_pipeline() -> None:
    pipeline = Pipeline.from_dict(with_actions(None)).add_action(
        "hook", ["user.*"], kind="webhook", url="http://127.0.0.1:9/h", rate_limit="10/s")
    assert pipeline.spec.actions is not None and pipeline.spec.actions.rules[0].rate_limit == 10.0
    with pytest.raises(ConfigError, match="rate_limit"):
        pipeline.add_action("other", ["user.*"], kind="webhook", url="http://127.0.0.1:9/h",
                            rate_limit="often")


def test_breaker_opens_after_failures_in_a_row_and_lets_a_trial_through_after_reset() -> None:
    now = [0.0]
    breaker = CircuitBreaker(BreakerSpec(failures=3, reset=2), lambda: now[0])
    breaker.failure(), breaker.failure()
    assert breaker.allows()
    breaker.failure()
    assert breaker.is_open
    now[0] = 2.5
    assert breaker.allows()  # the trial
    breaker.failure()
    assert breaker.is_open  # failed again: open for another reset
    now[0] = 5.0
    breaker.success()
    assert breaker.allows() and breaker.failures == 0


def test_retry_after_reads_seconds_and_http_dates() -> None:
    import datetime as dt

    now = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds("Mon, 01 Jan 2024 00:00:30 GMT", now) == 30.0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None


def test_only_outbox_files_a_committed_checkpoint_covers_are_delivered(tmp_path: Path) -> None:
    from pipelines.actions.ledger import committed_outbox_files
    from pipelines.checkpoint import Checkpoint, CheckpointStore
    from pipelines.store import EventStore

    store = EventStore(tmp_path)
    outbox = rules([HOOK]).apply([], envelope_rows(["user.login"]), FakeClock()()).tables["actions"]
    for partition, seq in ((0, 0), (0, 1), (1, 0)):
        store.write("actions", outbox, f"r1-p{partition:04d}-{ACTIONS_STEP}", seq)
    assert committed_outbox_files(store, "r1", set()) == []  # no checkpoint yet: nothing
    CheckpointStore(tmp_path, "r1").commit(Checkpoint(1, {}, {0: 1, 1: 0}, 0))
    assert [p.name for p in committed_outbox_files(store, "r1", set())] == [
        f"part-r1-p0000-{ACTIONS_STEP}-000000000000.parquet"]  # seq 1 and p1's may be replayed
    CheckpointStore(tmp_path, "r1").commit(Checkpoint(2, {}, {0: 2, 1: 1}, 0))
    assert len(committed_outbox_files(store, "r1", set())) == 3
    assert committed_outbox_files(store, "r2", set()) == []  # another run's checkpoints
