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
    """One terminal's count and fraud share over the 1, 7 and 30 days ending 7 days before."""

    __slots__ = ("times", "frauds", "high", "starts")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.frauds: list[int] = [0]  # frauds[i]: frauds among rows before row i
        self.high = 0  # first row newer than the delayed windows' end
        self.starts = [0, 0, 0]

    def update(self, t_us: int, fraud: int) -> tuple[float | int, ...]:
        """Add the event at ``t_us``; return (count, risk) per delayed window."""
        times, frauds, starts = self.times, self.frauds, self.starts
        end, hi = t_us - LABEL_DELAY_US, self.high
        while hi < len(times) and times[hi] <= end:
            hi += 1
        self.high = hi
        out: list[float | int] = []
        for w, days in enumerate(WINDOW_DAYS):
            edge, lo = end - days * DAY_US, starts[w]
            while lo < hi and times[lo] <= edge:
                lo += 1
            starts[w] = lo
            n = hi - lo
            out += (n, (frauds[hi] - frauds[lo]) / n if n else 0.0)
        times.append(t_us)
        frauds.append(frauds[-1] + fraud)
        if starts[2] > _TRIM:
            cut = starts[2]
            del times[:cut], frauds[:cut]
            self.high -= cut
            self.starts = [s - cut for s in starts]
        return tuple(out)


def calendar(t_us: int) -> tuple[int, int]:
    """``TX_DURING_WEEKEND`` and ``TX_DURING_NIGHT`` of a naive UTC time in microseconds."""
    when = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=t_us)
    return int(when.weekday() >= 5), int(when.hour <= 6)
