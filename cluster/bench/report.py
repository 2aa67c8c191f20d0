"""The bench's results: one JSON document, a text table and a PNG figure.

``ratio`` is eventray's events/s divided by the system's (how many times faster eventray
is on the same input in the same run); the goals of the project's issue are checked
against it. Latency is the run summary's ingestion-to-stored percentiles (see
:mod:`cluster.bench.eventray_run`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: eventray / system events/s the issue asks for, and the p99 latency goal at 20% load.
GOALS = {"batch": 3.0, "bytewax": 5.0, "per_event": 100.0}
P99_GOAL_MS = 10.0
LABELS = {"eventray": "eventray (Ray)", "batch": "Polars/sklearn batch", "per_event": "per-event design",
          "bytewax": "Bytewax 0.21"}


def _ratios(results: dict[str, dict[str, Any]]) -> None:
    base = results["eventray"].get("events_per_s") if results["eventray"].get("available") else None
    for name, result in results.items():
        rate = result.get("events_per_s") if result.get("available") else None
        result["ratio"] = round(base / rate, 2) if base and rate else None
        if name in GOALS:
            result["goal_ratio"] = GOALS[name]
            result["goal_met"] = None if result["ratio"] is None else result["ratio"] >= GOALS[name]


def summarise(options: Any, machine: dict[str, Any], workload: Any, model: dict[str, Any],
              results: dict[str, dict[str, Any]], latency: dict[str, Any] | None, elapsed: float,
              scoring: bool) -> dict[str, Any]:
    """The bench's result document; writes ``bench.json`` and ``bench.png`` in the work dir."""
    _ratios(results)
    points = (latency or {}).get("latency", [])
    low = next((p for p in points if p.get("load") == min(options.loads)), None)
    doc = {
        "machine": machine,
        "input": {"files": [str(f) for f in workload.files], "transactions": workload.rows,
                  "origin": workload.origin},
        "model": model,
        "eventray_pipeline": {"config": str(options.config), "scores": scoring,
                              "note": None if scoring else
                              "the config has no scoring step yet: eventray ran ingest + store only"},
        "systems": results,
        "latency": {"definition": "ingestion (paced release) to stored, per batch weighted by rows; "
                                  "the run summary's percentiles",
                    "points": points, "p99_goal_ms": P99_GOAL_MS,
                    "p99_goal_met": None if low is None else low["latency_ms"]["p99"] <= P99_GOAL_MS,
                    **({} if latency is None or latency.get("available") else
                       {"unavailable": latency.get("reason")})},
        "elapsed_s": round(elapsed, 1),
    }
    out = Path(options.work)
    (out / "bench.json").write_text(json.dumps(doc, indent=2, default=str))
    doc["json"], doc["png"] = str(out / "bench.json"), str(out / "bench.png")
    plot(doc, out / "bench.png")
    return doc


def table(doc: dict[str, Any]) -> str:
    """The results as a fixed-width text table (throughput, then latency)."""
    lines = [f"{'system':<22} {'events':>10} {'events/s':>12} {'eventray x':>10} {'goal':>6} "
             f"{'peak MB (PSS)':>13}  note"]
    for name, r in doc["systems"].items():
        if not r.get("available"):
            lines.append(f"{LABELS.get(name, name):<22} {'-':>10} {'-':>12} {'-':>10} {'':>6} {'-':>13}  "
                         f"unavailable: {r.get('reason')}")
            continue
        goal = f"{r['goal_ratio']:g}x" if "goal_ratio" in r else ""
        note = "" if r.get("complete", True) else f"time-boxed prefix ({r['elapsed_s']} s)"
        lines.append(f"{LABELS.get(name, name):<22} {r['events']:>10} {r['events_per_s']:>12,.0f} "
                     f"{r['ratio'] if r['ratio'] is not None else '-':>10} {goal:>6} "
                     f"{r['peak_pss_mb']:>13,.0f}  {note}")
    points = doc["latency"]["points"]
    if points:
        lines += ["", f"{'load':>6} {'offered ev/s':>13} {'achieved ev/s':>14} {'p50 ms':>8} {'p99 ms':>8}"]
        for p in points:
            lines.append(f"{p['load']:>6.0%} {p['offered_events_per_s']:>13,.0f} "
                         f"{p['achieved_events_per_s'] or 0:>14,.0f} {p['latency_ms']['p50']:>8.2f} "
                         f"{p['latency_ms']['p99']:>8.2f}")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Throughput bars (log scale, ratio on each bar) and latency against offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    shown = [(n, r) for n, r in doc["systems"].items() if r.get("available")]
    names = [LABELS.get(n, n) for n, _ in shown]
    rates = [r["events_per_s"] for _, r in shown]
    drawn = bars.bar(names, rates, color=["#1f77b4" if n == "eventray" else "#999999" for n, _ in shown])
    for rect, (_, r) in zip(drawn, shown, strict=True):
        label = "" if r["ratio"] in (None, 1) else f"eventray {r['ratio']}x"
        bars.annotate(label, (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                      ha="center", va="bottom", fontsize=8)
    bars.set_yscale("log")
    bars.set_ylabel("events/s (log)")
    bars.set_title(f"Throughput, {doc['input']['transactions']:,} transactions ({doc['input']['origin']})",
                   fontsize=9)
    bars.tick_params(axis="x", labelsize=8)
    points = doc["latency"]["points"]
    if points:
        offered = [p["offered_events_per_s"] for p in points]
        for q, style in (("p50", "o-"), ("p99", "s--")):
            lat.plot(offered, [p["latency_ms"][q] for p in points], style, label=q)
        lat.axhline(P99_GOAL_MS, color="red", linewidth=0.8, linestyle=":", label="p99 goal at 20%")
        lat.legend(fontsize=8)
    lat.set_xlabel("offered rate (events/s)")
    lat.set_ylabel("ingestion to stored (ms)")
    lat.set_title("eventray latency under paced replay", fontsize=9)
    m = doc["machine"]
    fig.suptitle(f"eventray bench on {m['cores']} cores, {m['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compact(doc: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON summary the CLI prints last: figures, goals, where the files are."""
    keep = ("available", "events", "events_per_s", "ratio", "goal_met", "peak_pss_mb", "complete", "reason")
    return {
        "input": {"transactions": doc["input"]["transactions"], "origin": doc["input"]["origin"]},
        "eventray_scores": doc["eventray_pipeline"]["scores"],
        "systems": {name: {k: r[k] for k in keep if k in r} for name, r in doc["systems"].items()},
        "latency": [{"load": p["load"], "offered_events_per_s": p["offered_events_per_s"], **p["latency_ms"]}
                    for p in doc["latency"]["points"]],
        "p99_goal_met": doc["latency"]["p99_goal_met"],
        "machine": {k: doc["machine"][k] for k in ("cpu", "cores", "memory_gb")},
        "elapsed_s": doc["elapsed_s"], "json": doc["json"], "png": doc["png"],
    }
