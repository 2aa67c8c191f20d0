"""The fraud handbook's 15 inputs, one event at a time, in plain Python (standard library only).

Used by the per-event reference design (:mod:`cluster.bench.per_event`) and by the Bytewax
flow (:mod:`cluster.bench.bytewax_flow`, which runs in its own virtual environment and so
imports this file by path, never our packages). Both are per-event systems; this is the
state they keep per key, written the way a careful streaming engineer would: each key's
recent rows in lists with one read pointer per window and running sums, so an event costs
O(1) amortised work whatever the window's length.

Semantics are the handbook's (see ``pipelines.features``): the customer windows are the
1, 7 and 30 days ending at the event, the event itself included; the terminal windows are
the 1, 7 and 30 days ending 7 days (the label delay) before it, and only those windows read
the fraud label, so no label younger than its delay is used.

Example:
    >>> c, t = CustomerWindows(), TerminalWindows()
    >>> c.update(0, 10.0), c.update(DAY_US, 30.0)
    ((1, 10.0, 1, 10.0, 1, 10.0), (1, 30.0, 2, 20.0, 2, 20.0))
    >>> t.update(0, 1), t.update(7 * DAY_US + 1, 0)
    ((0, 0.0, 0, 0.0, 0, 0.0), (1, 1.0, 1, 1.0, 1, 1.0))
"""

from __future__ import annotations

import bisect
import datetime as dt

DAY_US = 86_400 * 1_000_000
WINDOW_DAYS = (1, 7, 30)
LABEL_DELAY_US = 7 * DAY_US
#: The 15 model inputs in the order of ``models.fraud.HANDBOOK_FEATURES``.
FEATURES = (
    "TX_AMOUNT", "TX_DURING_WEEKEND", "TX_DURING_NIGHT",
    *(f"CUSTOMER_ID_{kind}_{n}DAY_WINDOW" for n in WINDOW_DAYS for kind in ("NB_TX", "AVG_AMOUNT")),
    *(f"TERMINAL_ID_{kind}_{n}DAY_WINDOW" for n in WINDOW_DAYS for kind in ("NB_TX", "RISK")),
)
_TRIM = 256  # drop a key's expired rows once this many have piled up at the front


class CustomerWindows:
    """One customer's count and mean amount over the 1, 7 and 30 days ending at each event."""

    __slots__ = ("times", "amounts", "starts", "sums")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.amounts: list[float] = []
        self.starts = [0, 0, 0]
        self.sums = [0.0, 0.0, 0.0]

    def update(self, t_us: int, amount: float) -> tuple[float | int, ...]:
        """Add the event at ``t_us`` (microseconds); return (count, mean) per window."""
        times, amounts, starts, sums = self.times, self.amounts, self.starts, self.sums
        times.append(t_us)
        amounts.append(amount)
        out: list[float | int] = []
        for w, days in enumerate(WINDOW_DAYS):
            edge, lo, total = t_us - days * DAY_US, starts[w], sums[w] + amount
            while times[lo] <= edge:
                total -= amounts[lo]
                lo += 1
            starts[w], sums[w] = lo, total
            n = len(times) - lo
            out += (n, total / n)
        if starts[2] > _TRIM:
            cut = starts[2]
            del times[:cut], amounts[:cut]
            self.starts = [s - cut for s in starts]
        return tuple(out)


class TerminalWindows:
    """One terminal's count and fraud share over the 1, 7 and 30 days ending 7 days before.

    Events may reach a terminal's state somewhat out of time order (in a dataflow, a
    terminal's events come from every upstream worker): each row is inserted at its place
    in time and each event's windows are found by bisection, so the result is the rows 7
    days and more before the event whatever the arrival order, as long as rows are not
    more than the label delay late. A prefix count of frauds makes a window's frauds a
    difference; a late row shifts only the prefix entries after it (the recent week's).
    """

    __slots__ = ("times", "frauds")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.frauds: list[int] = [0]  # frauds[i]: frauds among rows before row i

    def update(self, t_us: int, fraud: int) -> tuple[float | int, ...]:
        """Add the event at ``t_us``; return (count, risk) per delayed window."""
        times, frauds = self.times, self.frauds
        end = t_us - LABEL_DELAY_US
        hi = bisect.bisect_right(times, end)
        out: list[float | int] = []
        for days in WINDOW_DAYS:
            lo = bisect.bisect_right(times, end - days * DAY_US, 0, hi)
            n = hi - lo
            out += (n, (frauds[hi] - frauds[lo]) / n if n else 0.0)
        at = len(times) if not times or times[-1] <= t_us else bisect.bisect_right(times, t_us, hi)
        times.insert(at, t_us)
        frauds.insert(at + 1, frauds[at] + fraud)
        if fraud:
            for j in range(at + 2, len(frauds)):
                frauds[j] += fraud
        cut = bisect.bisect_left(times, end - WINDOW_DAYS[-1] * DAY_US - LABEL_DELAY_US)
        if cut > _TRIM:  # rows no window of a (possibly late) event can reach any more
            del times[:cut], frauds[:cut]
        return tuple(out)


def calendar(t_us: int) -> tuple[int, int]:
    """``TX_DURING_WEEKEND`` and ``TX_DURING_NIGHT`` of a naive UTC time in microseconds."""
    when = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=t_us)
    return int(when.weekday() >= 5), int(when.hour <= 6)
