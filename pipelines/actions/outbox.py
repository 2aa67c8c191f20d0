"""The outbox: action rows a partition writes in the apply that makes the decision.

:class:`ActionRules` turns a batch's triggers (the events its steps decided, and the events
it stores that no step derived) into rows of the ``actions`` table, one per (trigger, rule)
that matches, vectorised per rule. Each row's ``action_id`` is a UUIDv5 of the trigger's
``event_id`` and the rule's name: a replayed batch writes the same ids, and the id is the
``webhook-id`` a receiver deduplicates by. The row carries everything a delivery needs (the
resolved URL, the signed body, the rule's settings): dispatchers and ``eventray actions
retry`` need no config, and a secret never enters it (only the name of its variable).

Rules whose effect is the pipeline's own take effect here, under the same checkpoint:
``workflow`` with ``event_type`` derives a command event (routed like any derived event)
and ``update`` upserts rows into a named state table.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from pipelines.action_rules import URL_PLACEHOLDER, ActionRuleSpec, ActionsSpec
from pipelines.envelope import TIMESTAMP, envelope_schema
from pipelines.errors import ConfigError
from pipelines.event_ids import uuid5_strings
from pipelines.routing import safe_filter_sql, type_regex
from pipelines.spec import PipelineSpec

#: The writer step of a partition's outbox rows (never a step's name: those start with a
#: letter or a digit).
ACTIONS_STEP = "_actions"
ENVELOPE_COLUMNS = ("event_id", "event_type", "timestamp", "source", "correlation_id", "key",
                    "data", "metadata")
#: Sources of events a partition's steps derived: they are triggers where they are decided.
DERIVED_SOURCES = ("step:", "processor:")

ACTIONS_SCHEMA = pa.schema([
    pa.field("action_id", pa.string(), nullable=False),
    pa.field("rule", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("event_id", pa.string(), nullable=False),  # the trigger's
    pa.field("event_type", pa.string(), nullable=False),  # the trigger's
    pa.field("timestamp", TIMESTAMP, nullable=False),  # the trigger's event time
    pa.field("key", pa.string(), nullable=False),
    pa.field("decided_at", TIMESTAMP, nullable=False),
    pa.field("url", pa.string()),
    pa.field("body", pa.string(), nullable=False),
    pa.field("target", pa.string(), nullable=False),  # the rule's settings, as JSON
])


@dataclass
class ActionOutput:
    """What one batch's actions write: store tables by name, and derived command events."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    derived: pa.Table | None = None


def payload_text(data: str, name: str, columns: list[str]) -> pl.Expr:
    """A payload field as text: the struct's field, or else from the JSON payload."""
    parts = []
    if name in columns:
        parts.append(pl.col(data).struct.field(name).cast(pl.String))
    if "json" in columns:
        parts.append(pl.col(data).struct.field("json").str.json_path_match(f"$.{name}"))
    return pl.coalesce(parts) if parts else pl.lit(None, pl.String)


def _data_json(frame: pl.DataFrame) -> pl.Expr:
    """Each trigger's payload as JSON: its JSON text when it has one, else its fields."""
    dtype = frame.schema["data"]
    if not isinstance(dtype, pl.Struct):
        return pl.lit("null")
    names = [f.name for f in dtype.fields]
    others = [n for n in names if n != "json"]
    encoded = pl.struct([pl.col("data").struct.field(n) for n in others]).struct.json_encode() \
        if others else pl.lit("{}")
    if "json" in names:
        encoded = pl.when(pl.col("data").struct.field("json").is_not_null()) \
            .then(pl.col("data").struct.field("json")).otherwise(encoded)
    return pl.when(pl.col("data").is_null()).then(pl.lit("null")).otherwise(encoded)


class ActionRules:
    """The rules of an ``actions:`` section, compiled against a pipeline's envelope.

    Raises:
        ConfigError: a ``where`` filter that is not a safe expression over the envelope,
            naming the rule.

    Example:
        >>> from pipelines.envelope import envelope_schema
        >>> spec = ActionsSpec.model_validate([{"name": "hook", "event_types": ["a.*"],
        ...     "kind": "webhook", "url": "http://127.0.0.1/x"}])
        >>> ActionRules(spec, envelope_schema()).rules[0].name
        'hook'
    """

    def __init__(self, spec: ActionsSpec, envelope: pa.Schema) -> None:
        self.spec, self.envelope = spec, envelope
        self.rules = list(spec.rules)
        self._masks = [self._compile(i, rule) for i, rule in enumerate(self.rules)]
        self._targets = [self._target(rule) for rule in self.rules]

    def _compile(self, index: int, rule: ActionRuleSpec) -> pl.Expr:
        """The rule's mask: its event types, and its ``where`` over the envelope. Payload
        fields a JSON payload holds (``data.score`` of an alert event) are read from it, as
        numbers when the filter type-checks so, else as text."""
        mask = pl.col("event_type").str.contains(type_regex(rule.event_types))
        if rule.where is None:
            return mask
        error: Exception | None = None
        for json_type in (None, pl.Float64, pl.String):
            try:
                condition = pl.sql_expr(safe_filter_sql(rule.where))
                payload = self._json_payload(rule.where, json_type)
                empty = pl.from_arrow(self.envelope.empty_table())
                assert isinstance(empty, pl.DataFrame)
                if payload is not None:
                    empty = empty.with_columns(payload)
                empty.filter(condition)  # type errors show now, not at the first batch
            except Exception as exc:  # polars raises several kinds for a bad expression
                error = error or exc
                continue
            if payload is not None:  # the fields read, then the filter over them
                return mask & pl.struct(pl.all()).map_batches(
                    lambda s, p=payload, c=condition: s.struct.unnest().with_columns(p).select(
                        c.fill_null(False)).to_series(), return_dtype=pl.Boolean)
            return mask & condition.fill_null(False)
        raise ConfigError(f"actions.rules.{index}.where (action {rule.name!r}): "
                          f"{rule.where!r}: {error}") from None

    def _json_payload(self, where: str, json_type: Any) -> pl.Expr | None:
        """``data`` with the filter's missing payload fields read from its JSON text."""
        import sqlglot
        from sqlglot import exp

        fields = self.envelope.field("data").type
        names = {fields.field(i).name for i in range(fields.num_fields)}
        if json_type is None or "json" not in names:
            return None
        wanted = sorted({c.name for c in sqlglot.parse_one(where, read="postgres").find_all(exp.Column)
                         if c.table == "data" and c.name not in names})
        if not wanted:
            return None
        text = pl.field("json")
        return pl.col("data").struct.with_fields(
            text.str.json_path_match(f"$.{name}").cast(json_type, strict=False).alias(name)
            for name in wanted)

    def _target(self, rule: ActionRuleSpec) -> str:
        return rule.model_copy(update={"allow_hosts": self.spec.allowed_hosts(rule)}).model_dump_json()

    def triggers(self, decided: list[pa.Table], stored: pa.Table) -> pl.DataFrame:
        """The batch's triggers: what its steps decided, and what it stores that no step
        derived (those were triggers in the apply that decided them)."""
        names = list(ENVELOPE_COLUMNS)
        parts = [t.select(names) for t in decided if t.num_rows]
        if stored.num_rows and "source" in stored.column_names:
            frame = pl.from_arrow(stored.select(names))
            assert isinstance(frame, pl.DataFrame)
            derived = pl.any_horizontal(pl.col("source").str.starts_with(s) for s in DERIVED_SOURCES)
            parts.append(frame.filter(~derived).to_arrow())
        if not parts:
            return pl.DataFrame()
        frame = pl.from_arrow(pa.concat_tables(parts, promote_options="permissive"))
        assert isinstance(frame, pl.DataFrame)
        return frame

    def apply(self, decided: list[pa.Table], stored: pa.Table, decided_at: dt.datetime) -> ActionOutput:
        """The outbox rows, state-table rows and command events for one applied batch."""
        triggers = self.triggers(decided, stored)
        if triggers.height == 0:
            return ActionOutput()
        out = ActionOutput()
        outbox, commands = [], []
        for rule, mask, target in zip(self.rules, self._masks, self._targets, strict=True):
            matched = triggers.filter(mask)
            if matched.height == 0:
                continue
            ids = pl.Series("action_id", uuid5_strings((matched["event_id"] + f"/{rule.name}").to_arrow()),
                            dtype=pl.String)
            matched = matched.with_columns(ids)
            if rule.kind == "update":
                out.tables[rule.table] = _concat(out.tables.get(rule.table), self._update_rows(rule, matched))
            elif rule.kind == "workflow" and rule.event_type is not None:
                commands.append(self._command_events(rule, matched))
            else:
                outbox.append(self._outbox_rows(rule, target, matched, decided_at))
        if outbox:
            out.tables["actions"] = pa.concat_tables(outbox)
        if commands:
            out.derived = pa.concat_tables(commands)
        return out

    def _outbox_rows(self, rule: ActionRuleSpec, target: str, matched: pl.DataFrame,
                     decided_at: dt.datetime) -> pa.Table:
        head = pl.struct(
            action_id="action_id", rule=pl.lit(rule.name), type="event_type", event_id="event_id",
            key="key", timestamp=pl.col("timestamp").dt.to_string("%Y-%m-%dT%H:%M:%S%.6fZ"),
        ).struct.json_encode().str.strip_suffix("}")
        body = pl.concat_str([head, pl.lit(',"data":'), _data_json(matched), pl.lit("}")])
        rows = matched.select(
            "action_id", rule=pl.lit(rule.name), kind=pl.lit(rule.kind), event_id="event_id",
            event_type="event_type", timestamp="timestamp", key="key",
            decided_at=pl.lit(decided_at).cast(pl.Datetime("us", "UTC")),
            url=self._url(rule, matched), body=body, target=pl.lit(target))
        return rows.to_arrow().cast(ACTIONS_SCHEMA)

    @staticmethod
    def _url(rule: ActionRuleSpec, matched: pl.DataFrame) -> pl.Expr:
        """The rule's URL with its placeholders filled from each trigger (per column)."""
        if rule.url is None:
            return pl.lit(None, pl.String)
        columns = [f.name for f in matched.schema["data"].fields] \
            if isinstance(matched.schema.get("data"), pl.Struct) else []
        parts: list[pl.Expr] = [pl.col("key").str.slice(0, 0)]  # one value per row
        literal = 0
        for found in URL_PLACEHOLDER.finditer(rule.url):
            name = found[1]
            value = payload_text("data", name[5:], columns) if name.startswith("data.") \
                else pl.col(name).cast(pl.String)
            parts += [pl.lit(rule.url[literal:found.start()]), value.fill_null("")]
            literal = found.end()
        return pl.concat_str([*parts, pl.lit(rule.url[literal:])])

    @staticmethod
    def _update_rows(rule: ActionRuleSpec, matched: pl.DataFrame) -> pa.Table:
        """Rows of the rule's state table: the trigger's key and ``fields`` (as text)."""
        assert rule.fields is not None
        columns = [f.name for f in matched.schema["data"].fields] \
            if isinstance(matched.schema.get("data"), pl.Struct) else []
        return matched.select(
            "action_id", "event_id", "event_type", "timestamp", "key", rule=pl.lit(rule.name),
            reason=pl.lit(str(rule.params.get("reason", rule.name))), since="timestamp",
            until=(pl.col("timestamp") + pl.duration(seconds=float(rule.params["ttl_s"])))
            if "ttl_s" in rule.params else pl.lit(None, pl.Datetime("us", "UTC")),
            **{name: payload_text("data", name, columns) for name in rule.fields},
        ).to_arrow()

    def _command_events(self, rule: ActionRuleSpec, matched: pl.DataFrame) -> pa.Table:
        """Command events (``case.opened``...): the trigger's key, time, correlation and
        payload; the action's id, so a replay derives the same event."""
        assert rule.event_type is not None
        events = matched.select(
            event_id="action_id", event_type=pl.lit(rule.event_type), timestamp="timestamp",
            source=pl.lit(f"action:{rule.name}"), correlation_id="correlation_id", key="key",
            data="data", metadata=pl.col("metadata").struct.with_fields(version=pl.lit("1", pl.String)))
        return events.to_arrow().cast(self.envelope)


def outbox_rules(spec: PipelineSpec) -> ActionRules | None:
    """The pipeline's compiled action rules (``None``: it has none)."""
    if spec.actions is None or not spec.actions.rules:
        return None
    return ActionRules(spec.actions, envelope_schema(spec.registry()))


def _concat(first: pa.Table | None, second: pa.Table) -> pa.Table:
    return second if first is None else pa.concat_tables([first, second])
