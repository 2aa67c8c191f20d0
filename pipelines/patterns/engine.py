"""The per-key NFA of sequence patterns (aggregates: :mod:`pipelines.patterns.aggregates`).

Both take a key's *candidate* events in that key's order: events of the pattern's types
whose vectorised conditions (:mod:`pipelines.patterns.batches`) matched some step. Every
event of the pattern's types has a position in its key's stream, so a run can tell that
events it never saw lay between two candidates (they matched nothing: relaxed contiguity
skips them, strict contiguity dies on them).

Sequence semantics (FlinkCEP's where they overlap):

- Every candidate matching the first step starts a run (a partial match). On an event a
  run may *take* it into its current step's loop, *proceed* with it to the next step (once
  the current step has its least count), and *ignore* it: a relaxed step (``followed_by``)
  ignores only events that do not match it, ``followed_by_any`` ignores any, ``next`` and
  ``consecutive`` loops ignore none. A run that can neither take, proceed nor ignore dies.
- ``within`` bounds a run from its first event's time to its last's; past it the run
  ends (a timeout, emitted as ``on_timeout`` when given).
- Negations: ``not_next`` between A and B: the event right after A's last must not match;
  ``not_followed_by``: no matching event between A's last and B's first; an absence at
  the end: no matching event until the first event's time + ``within``, confirmed once
  the watermark passes that deadline (or the input ends).
- Runs completing on one event are emitted earliest-started first (then by their events'
  positions); after each, the skip strategy drops the partial matches it names.
- Each key holds at most ``max_partial`` partial matches: past it the oldest is dropped
  and counted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.patterns.expressions import Condition
from pipelines.patterns.spec import PatternSpec

__all__ = ["Candidate", "Match", "SequenceMatcher", "Stats"]

_NEVER = 2**62
#: (step name, the fields of the last event it matched), for conditions on earlier steps
_Bound = tuple[tuple[str, Any], ...]
_MICRO = dt.timedelta(microseconds=1)


@dataclass(frozen=True)
class Candidate:
    """One candidate event of a key: its position in the key's stream, time (epoch µs),
    id, which vectorised conditions it passed (``flags``, by condition slot), its envelope
    fields for conditions that refer to earlier steps, and its aggregated value."""

    pos: int
    time: int
    event_id: str
    correlation_id: str | None
    flags: tuple[bool, ...]
    event: dict[str, Any] = field(default_factory=dict)
    value: Any = None


@dataclass(frozen=True)
class Match:
    """A match (``kind`` ``match``) or a timed-out partial match (``timeout``)."""

    pattern: str
    kind: str
    key: str
    event_ids: tuple[str, ...]
    start: int
    end: int
    time: int  # the derived event's time: the last event's, or the deadline
    correlation_id: str | None


@dataclass
class Stats:
    """A matcher's counters: ``cap_hits`` partial matches dropped at the cap, and the most
    partial matches one key held."""

    cap_hits: int = 0
    max_partial: int = 0


@dataclass(frozen=True)
class _Step:
    """A positive step, compiled; ``guard`` is the negation before it (strict, slot)."""

    name: str
    slot: int
    low: int
    high: int
    consecutive: bool
    contiguity: str
    residual: Condition | None
    guard: tuple[bool, int, Condition | None] | None = None


class _Run:
    """A partial match. Mutable, and changed in place only where no other run shares it
    (a run that ignores an event stays itself; taking an event makes a new run): the NFA
    makes and drops these by the million, so they are slotted objects, not copies."""

    __slots__ = ("start_pos", "start", "step", "count", "last_pos", "seen_pos", "events",
                 "bound", "correlation_id", "closed", "blocked", "completed")

    def __init__(self, start_pos: int, start: int, step: int, count: int, last_pos: int,
                 seen_pos: int, events: tuple[tuple[int, int, str, int], ...],
                 bound: _Bound = (), correlation_id: str | None = None, closed: bool = False,
                 blocked: bool = False, completed: bool = False) -> None:
        self.start_pos, self.start, self.step, self.count = start_pos, start, step, count
        self.last_pos, self.seen_pos = last_pos, seen_pos
        self.events = events  # (pos, time, id, step) of each event taken
        self.bound = bound  # (step name, its last event's fields), for conditions on steps
        self.correlation_id = correlation_id
        self.closed, self.blocked, self.completed = closed, blocked, completed

    def taking(self, x: Candidate, step: int, count: int, bound: _Bound) -> _Run:
        """A new run: this one with ``x`` taken into ``step`` as its ``count``-th event."""
        return _Run(self.start_pos, self.start, step, count, x.pos, x.pos,
                    self.events + ((x.pos, x.time, x.event_id, step),), bound,
                    self.correlation_id)

    def sort_key(self) -> tuple[Any, ...]:
        return (self.start_pos, tuple(e[0] for e in self.events), tuple(e[3] for e in self.events))


def _residual(condition: Condition | None) -> Condition | None:
    return condition if condition is not None and condition.steps else None


class SequenceMatcher:
    """The NFA of one sequence pattern over every key's candidates.

    Args:
        spec: a sequence pattern (validated).
    """

    def __init__(self, spec: PatternSpec) -> None:
        assert spec.steps is not None
        self.spec, self.name = spec, spec.name
        self.within = None if spec.within is None else spec.within // _MICRO
        self.steps: list[_Step] = []
        self.absence: tuple[int, Condition | None] | None = None
        guard: tuple[bool, int, Condition | None] | None = None
        for slot, step in enumerate(spec.steps):
            residual = _residual(step.condition())
            if step.negated:
                guard = (step.contiguity == "next", slot, residual)
                continue
            low, high = step.bounds
            self.steps.append(_Step(step.name, slot, low, _NEVER if high is None else high,
                                    step.consecutive, step.contiguity, residual, guard))
            guard = None
        if guard is not None:
            self.absence = (guard[1], guard[2])
        self.skip, _, target = spec.skip.partition(":")
        self.skip_target = next((i for i, s in enumerate(self.steps) if s.name == target), None)
        self.referenced = {r for s in spec.steps if (c := s.condition()) for r in c.steps}
        self.keys: dict[str, _KeyRuns] = {}
        self.stats = Stats()

    # -- conditions -------------------------------------------------------------------------

    def _matches(self, step: _Step, x: Candidate, run: _Run | None) -> bool:
        if not x.flags[step.slot]:
            return False
        if step.residual is None:
            return True
        return step.residual.evaluate(x.event, dict(run.bound) if run else {})

    def _guard_matches(self, slot: int, residual: Condition | None, x: Candidate, run: _Run) -> bool:
        if not x.flags[slot]:
            return False
        return residual is None or residual.evaluate(x.event, dict(run.bound))

    # -- one event ----------------------------------------------------------------------------

    def on_event(self, key: str, x: Candidate, out: list[Match]) -> None:
        """Advance the key's runs by its candidate ``x`` (after everything due before it)."""
        state = self.keys.setdefault(key, _KeyRuns())
        self._due(key, state, x.time, out, last_pos=x.pos - 1)
        runs: list[_Run] = []
        completed: list[_Run] = []
        for run in state.runs:
            if x.pos > run.seen_pos + 1:
                gap = self._ignore(run, None)  # the events in between matched nothing
                if gap is None:
                    continue
                run = gap
            for child in self._advance(run, x):
                if child.completed and child.events[-1][0] == x.pos:
                    completed.append(child)
                    if child.count < self.steps[child.step].high and self.absence is None:
                        runs.append(child)
                else:
                    runs.append(child)
        first = self._start(x)
        if first is not None:
            if first.completed:
                completed.append(first)
                if first.count < self.steps[0].high and self.absence is None:
                    runs.append(first)
            else:
                runs.append(first)
        state.pending = [p for p in state.pending if not self._kills_absence(p, x)]
        state.runs = runs
        self._complete(key, state, completed, out)
        self._cap(state)

    def _start(self, x: Candidate) -> _Run | None:
        step = self.steps[0]
        if not self._matches(step, x, None):
            return None
        run = _Run(x.pos, x.time, 0, 1, x.pos, x.pos, ((x.pos, x.time, x.event_id, 0),),
                   self._bind((), 0, x), x.correlation_id)
        return self._mark(run)

    def _mark(self, run: _Run) -> _Run:
        last = len(self.steps) - 1
        if run.step == last and run.count >= self.steps[last].low:
            run.completed = True
        return run

    def _bind(self, bound: _Bound, step: int, x: Candidate) -> _Bound:
        name = self.steps[step].name
        if name not in self.referenced:
            return bound
        return tuple((n, e) for n, e in bound if n != name) + ((name, x.event),)

    def _within(self, run: _Run, x: Candidate) -> bool:
        return self.within is None or x.time - run.start <= self.within

    def _advance(self, run: _Run, x: Candidate) -> list[_Run]:
        """The runs ``run`` becomes on ``x``: ignoring it (if allowed), taking it into the
        loop, proceeding with it to the next step."""
        step = self.steps[run.step]
        adjacent = x.pos == run.last_pos + 1
        children: list[_Run] = []
        loop_open = not run.closed and run.count < step.high
        took = False
        if loop_open and self._within(run, x) and self._matches(step, x, run) \
                and (not step.consecutive or adjacent):
            took = True
            children.append(self._mark(run.taking(x, run.step, run.count + 1,
                                                  self._bind(run.bound, run.step, x))))
        blocked = run.blocked
        if run.count >= step.low and run.step + 1 < len(self.steps) and not blocked:
            after = self.steps[run.step + 1]
            guard = after.guard
            if guard is not None and guard[0] and adjacent \
                    and self._guard_matches(guard[1], guard[2], x, run):
                blocked = True  # not_next: the very next event matched the negation
            elif self._within(run, x) and self._matches(after, x, run) \
                    and (after.contiguity != "next" or adjacent):
                children.append(self._mark(run.taking(x, run.step + 1, 1,
                                                      self._bind(run.bound, run.step + 1, x))))
            if guard is not None and not guard[0] and self._guard_matches(guard[1], guard[2], x, run):
                blocked = True  # not_followed_by: a negated event came before the next step
        run.blocked = blocked
        stay = self._ignore(run, x, took)
        if stay is not None:
            children.insert(0, stay)
        return children

    def _ignore(self, run: _Run, x: Candidate | None, took: bool = False) -> _Run | None:
        """``run`` after ignoring ``x`` (``None``: an event that matched nothing), or
        ``None`` when it may not ignore it. A completed run only continues its loop."""
        step = self.steps[run.step]
        seen = run.seen_pos + 1 if x is None else x.pos
        loop_open = not run.closed and run.count < step.high
        proceed_open = run.count >= step.low and run.step + 1 < len(self.steps) and not run.blocked
        if loop_open:
            matches_loop = took or (x is not None and self._matches(step, x, run))
            if not step.consecutive and not matches_loop:
                run.seen_pos = seen
                return run
        if proceed_open and self._proceed_ignores(run, x):
            run.seen_pos, run.closed = seen, run.closed or loop_open
            return run
        return None

    def _proceed_ignores(self, run: _Run, x: Candidate | None) -> bool:
        after = self.steps[run.step + 1]
        if after.contiguity == "followed_by_any":
            return True
        if after.contiguity == "next":
            return False
        return x is None or not self._matches(after, x, run)

    # -- completions, deadlines, skips ----------------------------------------------------------

    def _complete(self, key: str, state: _KeyRuns, completed: list[_Run], out: list[Match]) -> None:
        state.emitted_now = []
        for run in sorted(completed, key=_Run.sort_key):
            if any(self._skips(emitted, run) for emitted in state.emitted_now):
                continue
            if self.absence is not None:
                state.pending.append(run)
                continue
            out.append(self._match(key, run, "match", run.events[-1][1]))
            self._apply_skip(state, run)

    def _apply_skip(self, state: _KeyRuns, emitted: _Run) -> None:
        if self.skip == "no_skip":
            return
        state.emitted_now.append(emitted)
        state.runs = [r for r in state.runs if not self._skips(emitted, r)]
        state.pending = [r for r in state.pending if not self._skips(emitted, r)]

    def _skips(self, emitted: _Run, run: _Run) -> bool:
        """Whether the skip strategy drops ``run`` after ``emitted`` was emitted."""
        if self.skip == "skip_to_next":
            return run.start_pos == emitted.start_pos
        if self.skip == "skip_past_last_event":
            return run.start_pos <= emitted.events[-1][0]
        if self.skip in ("skip_to_first", "skip_to_last"):
            positions = [e[0] for e in emitted.events if e[3] == self.skip_target]
            if not positions:
                return False
            bound = positions[0] if self.skip == "skip_to_first" else positions[-1]
            return run.start_pos < bound
        return False

    def _kills_absence(self, pending: _Run, x: Candidate) -> bool:
        assert self.absence is not None or not pending
        if self.absence is None or x.pos <= pending.last_pos:
            return False
        slot, residual = self.absence
        return self._guard_matches(slot, residual, x, pending)

    def _match(self, key: str, run: _Run, kind: str, time: int) -> Match:
        return Match(self.name, kind, key, tuple(e[2] for e in run.events), run.start,
                     run.events[-1][1], time, run.correlation_id)

    def _due(self, key: str, state: _KeyRuns, now: int, out: list[Match], last_pos: int) -> None:
        """Everything due before time ``now`` (exclusive): absences confirmed, runs past
        ``within`` ended. ``last_pos``: the key's last position seen before ``now``."""
        state.emitted_now = []
        if self.within is None:
            return
        within = self.within
        due = sorted((p for p in state.pending if p.start + within < now), key=_Run.sort_key)
        for pending in due:
            if any(p is pending for p in state.pending):
                state.pending = [p for p in state.pending if p is not pending]
                out.append(self._match(key, pending, "match", pending.start + within))
                self._apply_skip(state, pending)
        state.emitted_now = []
        expired = [r for r in state.runs if r.start + within < now]
        if not expired:
            return
        state.runs = [r for r in state.runs if r.start + within >= now]
        for run in expired:
            if run.completed or self.spec.on_timeout is None:
                continue
            if last_pos > run.seen_pos and self._ignore(run, None) is None:
                continue  # it died on an event that matched nothing
            out.append(self._match(key, run, "timeout", run.start + within))

    def advance(self, now: int, positions: dict[str, int], out: list[Match]) -> None:
        """The watermark passed ``now`` - 1: fire and end what is due before it, in every key.
        ``positions``: each key's next position (events seen)."""
        for key in list(self.keys):
            state = self.keys[key]
            if state.runs or state.pending:
                self._due(key, state, now, out, positions.get(key, 0) - 1)
            if not state.runs and not state.pending:
                del self.keys[key]

    def _cap(self, state: _KeyRuns) -> None:
        held = len(state.runs) + len(state.pending)
        while held > self.spec.max_partial:
            if state.pending and (not state.runs or state.pending[0].start_pos < state.runs[0].start_pos):
                state.pending.pop(0)
            else:
                state.runs.pop(0)
            held -= 1
            self.stats.cap_hits += 1
        self.stats.max_partial = max(self.stats.max_partial, held)

    def active(self) -> int:
        """Partial matches held in all keys."""
        return sum(len(s.runs) + len(s.pending) for s in self.keys.values())

    # -- state --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"keys": {k: [[_run_state(r) for r in s.runs], [_run_state(r) for r in s.pending]]
                         for k, s in self.keys.items()},
                "stats": [self.stats.cap_hits, self.stats.max_partial]}

    def restore(self, state: dict[str, Any] | None) -> None:
        self.keys, self.stats = {}, Stats()
        if not state:
            return
        for key, (runs, pending) in state["keys"].items():
            self.keys[key] = _KeyRuns([_run_of(r) for r in runs], [_run_of(r) for r in pending])
        self.stats = Stats(*state["stats"])




@dataclass
class _KeyRuns:
    runs: list[_Run] = field(default_factory=list)
    pending: list[_Run] = field(default_factory=list)  # absences waiting for their deadline
    emitted_now: list[_Run] = field(default_factory=list)


def _run_state(run: _Run) -> list[Any]:
    return [run.start_pos, run.start, run.step, run.count, run.last_pos, run.seen_pos,
            [list(e) for e in run.events], [[n, e] for n, e in run.bound], run.correlation_id,
            run.closed, run.blocked, run.completed]


def _run_of(state: Sequence[Any]) -> _Run:
    (start_pos, start, step, count, last_pos, seen_pos, events, bound, correlation_id,
     closed, blocked, completed) = state
    return _Run(start_pos, start, step, count, last_pos, seen_pos,
                tuple((int(e[0]), int(e[1]), str(e[2]), int(e[3])) for e in events),
                tuple((n, e) for n, e in bound), correlation_id, closed, blocked, completed)
