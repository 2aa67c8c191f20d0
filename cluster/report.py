"""``eventray report``: one day of a store as a self-contained HTML compliance report.

The report reads the store with Polars only (no Ray) and writes one HTML file whose plots
are embedded as PNG (matplotlib, base64), so it can be mailed or archived as it is:

- events of the day (event time) by type, and per hour;
- dead letters by reason (by the day they were *ingested*: a dead letter has no
  trustworthy event time);
- alerts of the day: by step and alert type, per hour, score distribution, top keys;
- models in use: every ``name:version`` that scored the day's events (``scores.model``),
  with the rows it scored and its mean score;
- action delivery: the ``actions`` table of the day by status, or a line saying the store
  has none.

Example:
    >>> import tempfile
    >>> summary = write_report(tempfile.mkdtemp(), dt.date(2024, 1, 1), None)
    >>> summary["events"], summary["actions"]
    (0, None)
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.errors import StoreError
from pipelines.store import EventStore

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
h2{border-bottom:1px solid #ddd;margin-top:2em}.none{color:#777;font-style:italic}"""


def day_rows(store: EventStore, table: str, day: dt.date) -> pl.DataFrame:
    """The table's rows of ``day`` (its time column's UTC date), or an empty frame."""
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    try:
        return store.scan(table, start=start, end=start + dt.timedelta(days=1)).collect()
    except (StoreError, pl.exceptions.ComputeError, FileNotFoundError):
        return pl.DataFrame()


def html_table(frame: pl.DataFrame, empty: str = "none") -> str:
    """A frame as an HTML table (values escaped); ``empty`` when it has no rows."""
    if frame.height == 0:
        return f'<p class="none">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                   for row in frame.iter_rows())
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return "" if value is None else str(value)


def png(figure: Any) -> str:
    """A matplotlib figure as an embedded ``<img>`` (PNG, base64); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def bar_plot(labels: list[str], values: list[float], title: str, horizontal: bool = False) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 2.8))
    if horizontal:
        axes.barh(labels, values)
    else:
        axes.bar(labels, values)
    axes.set_title(title)
    return png(figure)


def hourly(frame: pl.DataFrame, column: str = "timestamp") -> pl.DataFrame:
    """Rows per hour of the day (0-23, empty hours as 0)."""
    hours = pl.DataFrame({"hour": list(range(24))}, schema={"hour": pl.Int8})
    counts = frame.group_by(pl.col(column).dt.hour().alias("hour")).agg(pl.len().alias("n")) \
        if frame.height else pl.DataFrame(schema={"hour": pl.Int8, "n": pl.UInt32})
    return hours.join(counts, on="hour", how="left").with_columns(pl.col("n").fill_null(0)).sort("hour")


def events_section(events: pl.DataFrame) -> tuple[str, int]:
    if events.height == 0:
        return '<h2>Events</h2><p class="none">no events on this day</p>', 0
    by_type = events.group_by("event_type").agg(pl.len().alias("events")).sort("event_type")
    per_hour = hourly(events)
    return ("<h2>Events</h2>" + html_table(by_type)
            + bar_plot([str(h) for h in per_hour["hour"]], per_hour["n"].to_list(), "events per hour (UTC)")
            ), events.height


def deadletter_section(dead: pl.DataFrame, store: EventStore) -> tuple[str, int]:
    total = store.scan("deadletter").select(pl.len()).collect().item() if store.files("deadletter") else 0
    text = (f"<h2>Dead letters</h2><p>By reason, ingested on this day (the store holds {total:,} "
            "dead letters in all).</p>")
    if dead.height == 0:
        return text + '<p class="none">no dead letters ingested on this day</p>', 0
    by_reason = dead.group_by("reason").agg(pl.len().alias("dead_letters")).sort(
        "dead_letters", "reason", descending=[True, False])
    return text + html_table(by_reason) + bar_plot(
        by_reason["reason"].to_list(), by_reason["dead_letters"].to_list(), "dead letters by reason",
        horizontal=True), dead.height


def alerts_section(alerts: pl.DataFrame) -> tuple[str, int]:
    if alerts.height == 0:
        return '<h2>Alerts</h2><p class="none">no alerts on this day</p>', 0
    import matplotlib.pyplot as plt

    by_step = alerts.group_by("step", "event_type").agg(
        pl.len().alias("alerts"), pl.col("score").mean().alias("mean_score"),
        pl.col("threshold").first()).sort("step", "event_type")
    top = alerts.group_by("key").agg(pl.len().alias("alerts")).sort(
        "alerts", "key", descending=[True, False]).head(10)
    figure, axes = plt.subplots(figsize=(8, 2.8))
    axes.hist(alerts["score"].to_numpy(), bins=20)
    axes.set_title("alert scores")
    per_hour = hourly(alerts)
    return ("<h2>Alerts</h2>" + html_table(by_step)
            + bar_plot([str(h) for h in per_hour["hour"]], per_hour["n"].to_list(), "alerts per hour (UTC)")
            + png(figure) + "<h3>Keys with the most alerts</h3>" + html_table(top)), alerts.height


def models_section(scores: pl.DataFrame) -> tuple[str, list[str]]:
    if scores.height == 0 or "model" not in scores.columns:
        return '<h2>Models in use</h2><p class="none">nothing was scored on this day</p>', []
    models = scores.group_by("step", "model").agg(
        pl.len().alias("rows"), pl.col("score").mean().alias("mean_score")).sort("step", "model")
    return ("<h2>Models in use</h2><p>Each model as <code>name:version</code>, from the "
            "<code>scores</code> rows of the day (<code>none</code>: features only, no model).</p>"
            + html_table(models)), sorted(set(models["model"].to_list()))


def actions_section(store: EventStore, day: dt.date) -> tuple[str, int | None]:
    if not store.files("actions"):
        return '<h2>Action delivery</h2><p class="none">none: the store has no actions table</p>', None
    actions = day_rows(store, "actions", day)
    if actions.height == 0:
        return '<h2>Action delivery</h2><p class="none">no actions on this day</p>', 0
    group = [c for c in ("event_type", "status") if c in actions.columns]
    by_status = actions.group_by(group).agg(pl.len().alias("actions")).sort(group)
    plot = bar_plot([str(s) for s in by_status["status"]], by_status["actions"].to_list(),
                    "actions by status") if "status" in by_status.columns else ""
    return "<h2>Action delivery</h2>" + html_table(by_status) + plot, actions.height


def write_report(store_root: str | Path, day: dt.date, out: Path | None) -> dict[str, Any]:
    """Write the report of ``day`` to ``out`` (default ``STORE/_reports/<day>.html``);
    returns its summary (the command's JSON line)."""
    store = EventStore(store_root)
    events_html, events = events_section(day_rows(store, "events", day))
    dead_html, dead = deadletter_section(day_rows(store, "deadletter", day), store)
    alerts_html, alerts = alerts_section(day_rows(store, "alerts", day))
    models_html, models = models_section(day_rows(store, "scores", day))
    actions_html, actions = actions_section(store, day)
    path = Path(out) if out is not None else store.root / "_reports" / f"{day.isoformat()}.html"
    title = f"eventray compliance report: {day.isoformat()}"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Store <code>{html.escape(str(store.root))}</code>; event times in UTC.</p>"
            + events_html + dead_html + alerts_html + models_html + actions_html + "</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return {"report": str(path), "day": day.isoformat(), "store": str(store.root), "events": events,
            "dead_letters": dead, "alerts": alerts, "models": models, "actions": actions}
