"""The pattern engine against a brute-force reference, over random streams and patterns.

The reference knows nothing of runs or NFAs: per key it enumerates every subsequence of
the key's events with every labelling by steps, keeps those that satisfy the semantics
stated in :mod:`pipelines.patterns.engine` as predicates over the whole subsequence, and
then applies the emission order and the skip strategy.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Any

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.patterns.batches import PatternSet, matches_frame
from pipelines.patterns.spec import PatternSpec

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
TYPES = ["a", "b", "c"]


@dataclass(frozen=True)
class Ev:
    event_id: str
    event_type: str
    minute: int
    key: str
    v: int


# -- conditions, as text for the engine and as Python for the reference ----------------------

#: (where text, predicate(event, bound)) with ``bound`` the last event of each earlier step
CONDITIONS = [
    (None, lambda e, b: True),
    ("data.v < 5", lambda e, b: e.v < 5),
    ("data.v >= 3", lambda e, b: e.v >= 3),
    ("data.v % 2 == 0", lambda e, b: e.v % 2 == 0),
    ("data.v in (1, 4, 7) or data.v > 8", lambda e, b: e.v in (1, 4, 7) or e.v > 8),
]


def _ref_condition(step: str) -> tuple[str, Any]:
    return (f"data.v > {step}.data.v", lambda e, b: e.v > b[step].v)


@dataclass
class StepPlan:
    name: str
    types: list[str]
    where: str | None
    test: Any
    low: int = 1
    high: int = 1
    contiguity: str = "followed_by"
    consecutive: bool = False
    negated: bool = False


@st.composite
def patterns(draw: Any, allow_negation: bool = True) -> tuple[list[StepPlan], int, str]:
    n_positive = draw(st.integers(1, 3))
    plans: list[StepPlan] = []
    budget = 6
    for index in range(n_positive):
        types = draw(st.sampled_from([["a"], ["a"], ["b"], ["a", "b"], ["b", "c"]]))
        choices = list(range(len(CONDITIONS)))
        positive = [p for p in plans if not p.negated]
        use_ref = bool(positive) and draw(st.booleans()) and draw(st.booleans())
        where, test = _ref_condition(positive[-1].name) if use_ref else \
            CONDITIONS[draw(st.sampled_from(choices))]
        low = draw(st.integers(1, 2))
        high = draw(st.sampled_from([low, low + 1, None]))
        if high is None or high > budget - (n_positive - index - 1):
            high = low
        budget -= high
        contiguity = draw(st.sampled_from(["followed_by", "next", "followed_by_any"])) \
            if index else "followed_by"
        plans.append(StepPlan(f"s{index}", types, where, test, low, high, contiguity,
                              consecutive=high > 1 and draw(st.booleans()) and draw(st.booleans())))
        last = index == n_positive - 1
        if allow_negation and low == high and draw(st.integers(0, 4)) == 0:
            neg_types = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=1))
            where, test = CONDITIONS[draw(st.sampled_from([0, 1, 2]))]
            strict = not last and draw(st.booleans())
            plans.append(StepPlan(f"n{index}", neg_types, where, test,
                                  contiguity="next" if strict else "followed_by", negated=True))
    within = draw(st.integers(3, 40))
    skip = draw(st.sampled_from(["no_skip", "skip_past_last_event", "skip_to_next"]))
    return plans, within, skip


def spec_of(plans: list[StepPlan], within: int, skip: str) -> PatternSpec:
    steps = []
    for p in plans:
        step: dict[str, Any] = {"name": p.name, "event_types": p.types,
                                "times": p.low if p.low == p.high else [p.low, p.high],
                                "contiguity": p.contiguity, "consecutive": p.consecutive,
                                "negated": p.negated}
        if p.where:
            step["where"] = p.where
        steps.append(step)
    return PatternSpec.model_validate({"name": "p", "key": "key", "within": f"{within}m",
                                       "skip": skip, "steps": steps, "emit": "p.matched",
                                       "max_partial": 10**6})


@st.composite
def streams(draw: Any) -> list[Ev]:
    n = draw(st.integers(4, 22))
    minute, events = 0, []
    for i in range(n):
        minute += draw(st.sampled_from([0, 1, 1, 2, 3, 7]))
        events.append(Ev(f"e{i:03d}", draw(st.sampled_from(["a", "a", "b", "c"])), minute,
                         draw(st.sampled_from(["k1", "k1", "k2"])), draw(st.integers(0, 9))))
    return events


# -- the reference ----------------------------------------------------------------------------


Labelled = list[tuple[tuple[int, ...], tuple[int, ...]]]


def _sequences(plans: list[StepPlan], stream: list[Ev], within: int) -> Labelled:
    """Every subsequence of the key's stream, labelled by positive steps (non-decreasing,
    starting at the first), that is a complete match of the positive steps: conditions,
    counts, contiguity, negations between steps and ``within``. Depth-first over
    subsequences, dropping a prefix as soon as it breaks a rule."""
    positive = [p for p in plans if not p.negated]
    guards = _guards(plans)
    last = len(positive) - 1
    found = []

    def extend(chosen: tuple[int, ...], labels: tuple[int, ...], bound: dict[str, Ev]) -> None:
        count = labels.count(labels[-1])
        if labels[-1] == last and count >= positive[last].low:
            found.append((chosen, labels))
        for index in range(chosen[-1] + 1, len(stream)):
            if stream[index].minute - stream[chosen[0]].minute > within:
                break
            for label in (labels[-1], labels[-1] + 1):
                if label > last or (label == labels[-1] and count >= positive[label].high):
                    continue
                if not _matches(positive[label], stream[index], bound):
                    continue
                if _transition_ok(positive, guards, stream, chosen[-1], labels[-1], count,
                                  index, label, bound):
                    extend(chosen + (index,), labels + (label,),
                           {**bound, positive[label].name: stream[index]})

    for start in range(len(stream)):
        if _matches(positive[0], stream[start], {}):
            extend((start,), (0,), {positive[0].name: stream[start]})
    return found


def _guards(plans: list[StepPlan]) -> dict[int, StepPlan]:
    """The negation before each positive step, by the positive step's index (the end: len)."""
    guards, positive = {}, 0
    for p in plans:
        if p.negated:
            guards[positive] = p
        else:
            positive += 1
    return guards


def _matches(step: StepPlan, e: Ev, bound: dict[str, Ev]) -> bool:
    return e.event_type in step.types and step.test(e, bound)


def _transition_ok(positive: list[StepPlan], guards: dict[int, StepPlan], stream: list[Ev],
                   before: int, label_before: int, count: int, index: int, label: int,
                   bound: dict[str, Ev]) -> bool:
    step = positive[label_before]
    between = range(before + 1, index)
    if label == label_before:  # another repetition of a loop
        if step.consecutive:
            return index == before + 1
        return not any(_matches(step, stream[q], bound) for q in between)
    if label != label_before + 1 or count < step.low:
        return False
    after, guard = positive[label], guards.get(label)
    if after.contiguity == "next" and index != before + 1:
        return False
    if guard is not None and guard.contiguity == "next" and \
            _matches(guard, stream[before + 1], bound) and before + 1 <= index:
        return False
    if guard is not None and guard.contiguity != "next" and \
            any(_matches(guard, stream[q], bound) for q in between):
        return False
    loop_open = count < step.high
    for q in between:
        if loop_open and not step.consecutive and not _matches(step, stream[q], bound):
            continue
        loop_open = False
        if after.contiguity == "followed_by_any":
            continue
        if after.contiguity == "next" or _matches(after, stream[q], bound):
            return False
    return True


Found = list[tuple[str, tuple[str, ...]]]


def reference(plans: list[StepPlan], within: int, skip: str, events: list[Ev]) -> Found:
    """(key, event ids) of every match, per key in emission order."""
    types = {t for p in plans for t in p.types}
    positive = [p for p in plans if not p.negated]
    absence = _guards(plans).get(len(positive))
    out = []
    for key in sorted({e.key for e in events}):
        stream = [e for e in events if e.key == key and e.event_type in types]
        found = _sequences(plans, stream, within)
        emissions = []
        for chosen, labels in found:
            if absence is None:
                emissions.append(((chosen[-1], 1), chosen, labels))
                continue
            bound = _bound(positive, stream, chosen, labels)
            deadline = stream[chosen[0]].minute + within
            later = [q for q in range(chosen[-1] + 1, len(stream)) if stream[q].minute <= deadline]
            if any(_matches(absence, stream[q], bound) for q in later):
                continue
            fire = next((q for q in range(len(stream)) if stream[q].minute > deadline), len(stream))
            emissions.append(((fire, 0), chosen, labels))
        emissions.sort(key=lambda e: (e[0], e[1][0], e[1], e[2]))
        emitted: list[tuple[int, ...]] = []
        for _, chosen, _labels in emissions:
            if any(_skipped(skip, m, chosen) for m in emitted):
                continue
            emitted.append(chosen)
            out.append((key, tuple(stream[i].event_id for i in chosen)))
    return out


def _bound(positive: list[StepPlan], stream: list[Ev], chosen: tuple[int, ...],
           labels: tuple[int, ...]) -> dict[str, Ev]:
    return {positive[label].name: stream[i] for i, label in zip(chosen, labels, strict=True)}


def _skipped(skip: str, emitted: tuple[int, ...], chosen: tuple[int, ...]) -> bool:
    if skip == "skip_past_last_event":
        return chosen[0] <= emitted[-1]
    if skip == "skip_to_next":
        return chosen[0] == emitted[0]
    return False


# -- the engine, fed in random batches --------------------------------------------------------


def frame_of(events: list[Ev]) -> pl.DataFrame:
    return pl.DataFrame({
        "event_id": [e.event_id for e in events], "event_type": [e.event_type for e in events],
        "timestamp": [T0 + dt.timedelta(minutes=e.minute) for e in events],
        "source": ["test"] * len(events), "correlation_id": [e.key for e in events],
        "key": [e.key for e in events], "data": [{"v": e.v} for e in events]},
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")})


def engine(spec: PatternSpec, events: list[Ev], seed: int) -> list[tuple[str, tuple[str, ...]]]:
    """The engine's matches, fed in random batches, with a snapshot and restore between."""
    rng = random.Random(seed)
    patterns, out, start = PatternSet([spec]), [], 0
    frame = frame_of(events)
    while start < len(events):
        size = rng.randint(1, 6)
        out += patterns.process(frame.slice(start, size))
        start += size
        if rng.random() < 0.3:
            state = patterns.snapshot()
            patterns = PatternSet([spec])
            patterns.restore(state)
    out += patterns.finish()
    rows = matches_frame(out)
    per_key: dict[str, list[tuple[str, ...]]] = {}
    for key, ids in zip(rows["key"].to_list(), rows["event_ids"].to_list(), strict=True):
        per_key.setdefault(key, []).append(tuple(ids))
    return [(k, ids) for k in sorted(per_key) for ids in per_key[k]]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(), events=streams(), seed=st.integers(0, 1000))
def test_engine_equals_brute_force_reference(pattern: tuple[list[StepPlan], int, str],
                                             events: list[Ev], seed: int) -> None:
    plans, within, skip = pattern
    spec = spec_of(plans, within, skip)
    assert engine(spec, events, seed) == reference(plans, within, skip, events)


def test_reference_finds_relaxed_loop_then_step() -> None:
    """A sanity check of the reference itself, by hand: small x2 (relaxed) then big."""
    plans = [StepPlan("s0", ["a"], "data.v < 5", lambda e, b: e.v < 5, 2, 2),
             StepPlan("s1", ["a"], "data.v > 7", lambda e, b: e.v > 7)]
    events = [Ev("e0", "a", 0, "k", 1), Ev("e1", "a", 1, "k", 6), Ev("e2", "a", 2, "k", 2),
              Ev("e3", "a", 3, "k", 3), Ev("e4", "a", 4, "k", 9)]
    expected = [("k", ("e0", "e2", "e4")), ("k", ("e2", "e3", "e4"))]
    assert reference(plans, 10, "no_skip", events) == expected
    assert engine(spec_of(plans, 10, "no_skip"), events, 0) == expected


# -- aggregates -------------------------------------------------------------------------------


def aggregate_reference(function: str, over: int, at_least: float,
                        events: list[Ev]) -> list[tuple[str, tuple[str, ...]]]:
    """At each ``a`` event, the aggregate of its key's ``a`` events so far within
    (t - over, t]; a match where it reaches ``at_least`` from below (or first)."""
    out, seen, above = [], {}, {}
    for e in events:
        if e.event_type != "a":
            continue
        window = [w for w in seen.get(e.key, []) if w.minute > e.minute - over] + [e]
        seen[e.key] = window
        value = {"count": len(window), "sum": sum(w.v for w in window),
                 "distinct": len({w.v for w in window})}[function]
        if value >= at_least and not above.get(e.key, False):
            out.append((e.key, tuple(w.event_id for w in window)))
        above[e.key] = value >= at_least
    return sorted(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(function=st.sampled_from(["count", "sum", "distinct"]), over=st.integers(1, 15),
       at_least=st.integers(1, 12), events=streams(), seed=st.integers(0, 1000))
def test_aggregates_equal_brute_force_reference(function: str, over: int, at_least: int,
                                                events: list[Ev], seed: int) -> None:
    aggregate: dict[str, Any] = {"event_types": ["a"], "over": f"{over}m", "at_least": at_least}
    aggregate.update({"count": True} if function == "count" else {function: "data.v"})
    spec = PatternSpec.model_validate({"name": "p", "emit": "p.found", "aggregate": aggregate})
    assert sorted(engine(spec, events, seed)) == aggregate_reference(function, over, at_least, events)
