"""The bench's results: one JSON document, a text table and a PNG figure.

``ratio`` is eventray's events/s divided by the system's (how many times faster eventray
is on the same input in the same run), each system timed by its own clock from its first
read to its last write; the goals of the project's issue are checked against it.
``end_to_end_ratio`` is the same over each process's whole wall time (interpreter, imports,
Ray and actor start-up included), the number a user waiting for the job sees. Latency is
per event, read back from the store (see :mod:`cluster.bench.eventray_run`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: eventray / system events/s the issue asks for, and the p99 latency goal at 20% load.
GOALS = {"batch": 3.0, "bytewax": 5.0, "per_event": 100.0}
P99_GOAL_MS = 10.0
LATENCY_DEFINITION = ("per event, from its arrival in the paced replay (its due time, metadata.ingested_at, "
                      "so time spent waiting in the source's linger or behind a busy driver counts) to the "
                      "write of the store file holding its score (alerts are written in the same apply); "
                      "read back from the store, warm-up excluded; run_summary_latency_ms is the run "
                      "summary's per-batch ingestion-to-stored percentiles")
LABELS = {"eventray": "eventray (Ray)", "batch": "Polars/sklearn batch", "per_event": "per-event design",
          "bytewax": "Bytewax 0.21"}


def _ratios(results: dict[str, dict[str, Any]]) -> None:
    for result in results.values():
        if result.get("available") and result.get("wall_s"):
            result["end_to_end_events_per_s"] = round(result["events"] / result["wall_s"], 1)
    eventray = results["eventray"] if results["eventray"].get("available") else {}
    base, base_e2e = eventray.get("events_per_s"), eventray.get("end_to_end_events_per_s")
    for name, result in results.items():
        rate = result.get("events_per_s") if result.get("available") else None
        e2e = result.get("end_to_end_events_per_s") if result.get("available") else None
        result["ratio"] = round(base / rate, 2) if base and rate else None
        result["end_to_end_ratio"] = round(base_e2e / e2e, 2) if base_e2e and e2e else None
        if name in GOALS:
            result["goal_ratio"] = GOALS[name]
            result["goal_met"] = None if result["ratio"] is None else result["ratio"] >= GOALS[name]


def summarise(options: Any, machine: dict[str, Any], workload: Any, model: dict[str, Any],
              results: dict[str, dict[str, Any]], latency: dict[str, Any] | None, elapsed: float,
              scoring: bool) -> dict[str, Any]:
    """The bench's result document; writes ``bench.json`` and ``bench.png`` in the work dir."""
    _ratios(results)
    machine = {**machine, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    every = (latency or {}).get("latency", [])
    # a paced replay whose events all came in its warm-up measured nothing: listed apart
    points = [p for p in every if "p99" in p["latency_ms"]]
    unmeasured = [p for p in every if "p99" not in p["latency_ms"]]
    low = next((p for p in points if p.get("load") == min(options.loads)), None)
    doc = {
        "machine": machine,
        "input": {"files": [str(f) for f in workload.files], "transactions": workload.rows,
                  "origin": workload.origin},
        "model": model,
        "eventray_pipeline": {"config": str(options.config), "scores": scoring,
                              "alerts_table_only": options.alerts_table_only,
                              "note": None if scoring else
                              "the config has no scoring step yet: eventray ran ingest + store only"},
        "systems": results,
        "latency": {"definition": LATENCY_DEFINITION,
                    "points": points, "p99_goal_ms": P99_GOAL_MS,
                    "p99_goal_met": None if low is None else low["latency_ms"]["p99"] <= P99_GOAL_MS,
                    **({"unmeasured": unmeasured} if unmeasured else {}),
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
             f"{'e2e ev/s':>10} {'e2e x':>7} {'peak MB (PSS)':>13}  note"]
    for name, r in doc["systems"].items():
        if not r.get("available"):
            lines.append(f"{LABELS.get(name, name):<22} {'-':>10} {'-':>12} {'-':>10} {'':>6} {'-':>10} "
                         f"{'-':>7} {'-':>13}  unavailable: {r.get('reason')}")
            continue
        goal = f"{r['goal_ratio']:g}x" if "goal_ratio" in r else ""
        note = "" if r.get("complete", True) else f"time-boxed prefix ({r['elapsed_s']} s)"
        lines.append(f"{LABELS.get(name, name):<22} {r['events']:>10} {r['events_per_s']:>12,.0f} "
                     f"{_x(r['ratio']):>10} {goal:>6} {r['end_to_end_events_per_s']:>10,.0f} "
                     f"{_x(r['end_to_end_ratio']):>7} {r['peak_pss_mb']:>13,.0f}  {note}")
    points = doc["latency"]["points"]
    if points:
        lines += ["", "latency: arrival (paced due time) to the event's score and alerts written, per event",
                  f"{'load':>6} {'offered ev/s':>13} {'arrived ev/s':>14} {'achieved ev/s':>14} "
                  f"{'p50 ms':>8} {'p99 ms':>8}  note"]
        for p in points:
            lines.append(f"{p['load']:>6.0%} {p['offered_events_per_s']:>13,.0f} "
                         f"{p.get('arrived_events_per_s') or 0:>14,.0f} "
                         f"{p['achieved_events_per_s'] or 0:>14,.0f} {p['latency_ms']['p50']:>8.2f} "
                         f"{p['latency_ms']['p99']:>8.2f}  {_pacing_note(p)}")
    return "\n".join(lines)


def _pacing_note(point: dict[str, Any]) -> str:
    """Why a point's latency keeps growing: the pipeline handled less than arrived."""
    achieved, arrived = point.get("achieved_events_per_s"), point.get("arrived_events_per_s")
    if achieved and arrived and achieved < 0.8 * arrived:
        return "fell behind: handled slower than events arrived"
    return ""


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:g}"


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
        lat.set_yscale("log")
        lat.legend(fontsize=8)
    lat.set_xlabel("offered rate (events/s)")
    lat.set_ylabel("ingestion to score/alert written (ms)")
    lat.set_title("eventray latency under paced replay", fontsize=9)
    m = doc["machine"]
    load = m.get("load_average_at_start", ["?"])[0], m.get("load_average_at_end", ["?"])[0]
    fig.suptitle(f"eventray bench on {m['cores']} cores, {m['cpu']} (load average {load[0]} at start, "
                 f"{load[1]} at end)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compact(doc: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON summary the CLI prints last: figures, goals, where the files are."""
    keep = ("available", "events", "events_per_s", "ratio", "goal_met", "end_to_end_events_per_s",
            "end_to_end_ratio", "peak_pss_mb", "complete", "reason")
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
