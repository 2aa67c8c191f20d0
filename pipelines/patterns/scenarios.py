"""Synthetic event streams with planted pattern instances: the ground truth for the shipped
pattern configs (``configs/patterns/*.yaml``).

Each generator returns events in the seed's JSON Lines schema (``eventId``, ``eventType``,
``timestamp``, ``source``, ``correlationId``, ``data``, ``metadata``), sorted by time, and
the set of matches a correct engine must find: ``(pattern, key, event ids)``. Background
events are drawn so that they can never form a match on their own (amounts between the
small and the big ones, few terminals per card, rare errors far from the planted bursts),
so precision and recall on the planted instances are both measurable exactly.

- :func:`fraud_scenario`: card testing (three small amounts, then a big one, within 10
  minutes), one card at three terminals within an hour, and one card at two far-apart
  terminals within an hour (``configs/patterns/fraud.yaml``);
- :func:`supply_chain_scenario`: order -> payment -> shipment within 48 hours, and paid but
  not shipped (``configs/patterns/supply-chain.yaml``);
- :func:`customer_scenario`: a cart add not followed by checkout within 30 minutes
  (``configs/patterns/customer.yaml``);
- :func:`monitoring_scenario`: five or more errors, then a restart, within 10 minutes
  (``configs/patterns/monitoring.yaml``).

Example:
    >>> events, truth = supply_chain_scenario(orders=20, seed=1)
    >>> sorted({pattern for pattern, _, _ in truth})
    ['order-fulfilled', 'paid-not-shipped']
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

__all__ = ["customer_scenario", "fraud_scenario", "monitoring_scenario", "supply_chain_scenario"]

START = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
Truth = set[tuple[str, str, tuple[str, ...]]]
#: A scenario's events (seed schema) and its planted matches
Scenario = tuple[list[dict[str, Any]], Truth]


class _Events:
    """Events being written: ids in order of creation, sorted by time at the end."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.rows = prefix, []  # type: list[dict[str, Any]]

    def add(self, minute: float, event_type: str, correlation: str, data: dict[str, Any]) -> str:
        event_id = f"{self.prefix}-{len(self.rows):07d}"
        self.rows.append({
            "eventId": event_id, "eventType": event_type,
            "timestamp": (START + dt.timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"),
            "source": "scenario", "correlationId": correlation, "data": data,
            "metadata": {"version": "1"}})
        return event_id

    def sorted(self) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: (r["timestamp"], r["eventId"]))


def _tx(events: _Events, minute: float, customer: int, amount: float,
        terminal: tuple[int, float, float]) -> str:
    return events.add(minute, "transaction.created", f"tx-{len(events.rows)}", {
        "CUSTOMER_ID": str(customer), "TX_AMOUNT": round(amount, 2),
        "TERMINAL_ID": str(terminal[0]), "TERMINAL_X": terminal[1], "TERMINAL_Y": terminal[2]})


def fraud_scenario(customers: int = 60, days: int = 3, seed: int = 0) -> Scenario:
    """Card transactions; a quarter of the cards carry one planted instance each."""
    rng, events, truth = random.Random(seed), _Events("fraud"), set()
    for customer in range(customers):
        home = (rng.uniform(0, 100), rng.uniform(0, 100))
        # background: one or two terminals near home (within 10 units: never "far apart")
        terminals = [(customer * 10 + i, home[0] + rng.uniform(-5, 5), home[1] + rng.uniform(-5, 5))
                     for i in range(2 if customer % 4 == 1 else 1)]
        plant = customer % 4  # 0: card testing, 1: terminal hopping, 2: far terminals, 3: none
        minute = rng.uniform(0, 60)
        planted_at = rng.uniform(0.3, 0.7) * days * 1440
        planted = False
        while minute < days * 1440:
            if not planted and minute >= planted_at and plant < 3:
                # 70 quiet minutes first: no background purchase shares a planted window
                minute = _plant_fraud(events, truth, rng, plant, customer, minute + 70, terminals)
                planted = True
                continue
            _tx(events, minute, customer, rng.uniform(10, 150), rng.choice(terminals))
            minute += rng.expovariate(1 / 90)
    return events.sorted(), truth


def _plant_fraud(events: _Events, truth: Truth, rng: random.Random, plant: int, customer: int,
                 minute: float, terminals: list[tuple[int, float, float]]) -> float:
    """One planted instance; returns the minute the background resumes."""
    key, home = str(customer), terminals[0]
    if plant == 0:
        ids = [_tx(events, minute + i * 2, customer, rng.uniform(0.5, 4.9), home) for i in range(3)]
        ids.append(_tx(events, minute + 8, customer, rng.uniform(250, 900), home))
        truth.add(("card-testing", key, tuple(ids)))
        return minute + 90
    if plant == 1:
        near = (customer * 10 + 9, home[1] + 3, home[2] - 3)
        ids = [_tx(events, minute + i * 10, customer, rng.uniform(10, 150), t)
               for i, t in enumerate((terminals[0], terminals[-1], near))]
        truth.add(("terminal-hopping", key, tuple(ids)))
        return minute + 130  # the third terminal leaves the window before the next purchase
    far = (customer * 10 + 9, home[1] + 80, home[2])
    ids = [_tx(events, minute, customer, rng.uniform(10, 150), home),
           _tx(events, minute + 30, customer, rng.uniform(10, 150), far)]
    truth.add(("far-terminals", key, tuple(ids)))
    return minute + 150  # silent past the hour after the far purchase


def supply_chain_scenario(orders: int = 400, seed: int = 0) -> Scenario:
    """Orders over two weeks: most paid, most of those shipped, some too late or never."""
    rng, events, truth = random.Random(seed), _Events("order"), set()
    for order in range(orders):
        key = f"order-{order}"
        placed_at = rng.uniform(0, 14 * 1440)
        placed = events.add(placed_at, "order.placed", key, {"ORDER_ID": key})
        if rng.random() < 0.1:
            continue  # never paid
        paid_at = placed_at + rng.uniform(1, 600)
        paid = events.add(paid_at, "payment.received", key, {"ORDER_ID": key})
        if rng.random() < 0.15:
            truth.add(("paid-not-shipped", key, (paid,)))
            continue
        shipped_at = paid_at + rng.choice([rng.uniform(60, 40 * 60), rng.uniform(49 * 60, 90 * 60)])
        shipped = events.add(shipped_at, "shipment.sent", key, {"ORDER_ID": key})
        if shipped_at - paid_at > 48 * 60:
            truth.add(("paid-not-shipped", key, (paid,)))
        if shipped_at - placed_at <= 48 * 60:
            truth.add(("order-fulfilled", key, (placed, paid, shipped)))
    return events.sorted(), truth


def customer_scenario(sessions: int = 500, seed: int = 0) -> Scenario:
    """Shopping sessions: page views, one cart add, a checkout soon, late or never."""
    rng, events, truth = random.Random(seed), _Events("web"), set()
    for session in range(sessions):
        key = f"session-{session}"
        start = rng.uniform(0, 7 * 1440)
        for i in range(rng.randint(1, 6)):
            events.add(start + i, "page.viewed", key, {"PAGE": f"/p/{rng.randint(0, 50)}"})
        added = events.add(start + 7, "cart.item_added", key, {"SKU": f"sku-{rng.randint(0, 99)}"})
        outcome = rng.random()
        if outcome < 0.5:
            events.add(start + 7 + rng.uniform(1, 29), "checkout.completed", key, {})
            continue
        if outcome < 0.75:
            events.add(start + 7 + rng.uniform(31, 120), "checkout.completed", key, {})
        truth.add(("abandoned-cart", key, (added,)))
    return events.sorted(), truth


def monitoring_scenario(hosts: int = 40, hours: int = 48, seed: int = 0) -> Scenario:
    """Host logs: info and warnings, rare single errors, some planted error bursts that end
    in a restart (and some restarts after too few errors, or too late)."""
    rng, events, truth = random.Random(seed), _Events("ops"), set()
    for host in range(hosts):
        key = f"host-{host}"
        bursts = sorted(rng.uniform(60, hours * 60 - 60) for _ in range(rng.randint(0, 2)))
        bursts = [b for i, b in enumerate(bursts) if i == 0 or b - bursts[i - 1] > 90]
        minute = rng.uniform(0, 10)
        while minute < hours * 60:
            near_burst = any(-30 < minute - b < 30 for b in bursts)
            level = "error" if not near_burst and rng.random() < 0.03 else rng.choice(["info", "warn"])
            events.add(minute, "log.entry", key, {"level": level})
            minute += rng.uniform(2, 8)
        for burst in bursts:
            _plant_burst(events, truth, rng, key, burst)
    return events.sorted(), truth


def _plant_burst(events: _Events, truth: Truth, rng: random.Random, key: str, minute: float) -> None:
    errors = rng.choice([3, 5, 6, 8])
    ids = [events.add(minute + i * 0.7, "log.entry", key, {"level": "error"}) for i in range(errors)]
    late = rng.random() < 0.25
    restart = events.add(minute + (20 if late else errors * 0.7 + 1), "service.restarted", key, {})
    if errors >= 5 and not late:
        truth.add(("errors-then-restart", key, (*ids, restart)))
