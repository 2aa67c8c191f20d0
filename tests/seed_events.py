"""Events shaped like the seed's own example, for the unit and integration tests.

The seed's schema example, which producers copy::

    {"eventId": "6f1c…", "eventType": "user.login", "timestamp": "2024-05-01T10:00:00Z",
     "source": "web", "correlationId": "9a0e…", "data": {...},
     "metadata": {"version": "1.0", "region": "us-east"}}

``metadata.version`` is a JSON integer or a dotted string; the strategies draw versions a
type whose current version is 1 accepts (:data:`ACCEPTED_VERSIONS`) and values that are no
such version (:data:`NON_VERSIONS`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from typing import Any

from hypothesis import strategies as st

#: Dotted lower-case event types, as the seed names them.
EVENT_TYPES = st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z][a-z0-9_]{0,8}){0,2}", fullmatch=True)
#: Versions of schema version 1: the integer 1, or "1" with any dotted minor parts.
ACCEPTED_VERSIONS = st.just(1) | st.from_regex(r"1(\.[0-9]{1,4}){0,3}", fullmatch=True)
#: What a producer may write that is not a version 1.x (a newer major counts: it is refused).
NON_VERSIONS = (
    st.sampled_from(["abc", "1..2", "0", "0.9", "-1", "", " 1", "1.", ".1", "01", "1.0-beta",
                     "v1", "1,0", "2", "2.0", "1.0 ", "１", [1], ["1.0"], {"major": 1}, {},
                     True, False, 0, -1, 2, 1.0, 1.5, 2.0])
    | st.integers(max_value=0) | st.integers(min_value=2)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8).filter(lambda t: re.fullmatch(r"1(\.[0-9]+)*", t) is None)
    | st.lists(st.integers(0, 3), max_size=3) | st.booleans()
)
PAYLOADS = st.dictionaries(
    st.text(max_size=8),
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
    max_size=4)
#: Event times a producer sends: in the past (later than now + source.max_future is refused).
MOMENTS = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2025, 12, 31))
REGIONS = st.sampled_from(["us-east", "us-west", "eu-west", "ap-south"])


def seed_event(event_id: str, version: Any = "1.0", *, event_type: str = "user.login",
               moment: dt.datetime = dt.datetime(2024, 5, 1, 10), correlation_id: str = "c0",
               data: dict[str, Any] | None = None, region: str = "us-east") -> dict[str, Any]:
    """One event written exactly as the seed's example is."""
    return {"eventId": event_id, "eventType": event_type,
            "timestamp": moment.isoformat(timespec="seconds") + "Z", "source": "web",
            "correlationId": correlation_id, "data": {"n": 1} if data is None else data,
            "metadata": {"version": version, "region": region}}


@st.composite
def seed_events(draw: st.DrawFn, versions: st.SearchStrategy[Any] = ACCEPTED_VERSIONS
                ) -> dict[str, Any]:
    """An event valid by the seed's schema example, its version drawn from ``versions``."""
    return seed_event(str(draw(st.uuids())), draw(versions), event_type=draw(EVENT_TYPES),
                      moment=draw(MOMENTS), correlation_id=str(draw(st.uuids())),
                      data=draw(PAYLOADS), region=draw(REGIONS))


def stored_version(version: Any) -> str:
    """``metadata.version`` as the store keeps it: the producer's text."""
    return str(version) if isinstance(version, int) else version


def jsonl(events: list[dict[str, Any]]) -> bytes:
    """Events as JSON Lines (non-ASCII kept as UTF-8, as producers send it)."""
    return b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in events)


def seed_file_with_malformed(events: int, malformed: list[bytes], every: int) -> bytes:
    """``events`` seed-example events (version "1.0") with a malformed line every ``every``."""
    lines: list[bytes] = []
    for i in range(events):
        event = seed_event(str(uuid.UUID(int=i + 1)), "1.0",
                           event_type=("user.login", "order.placed", "iot.reading")[i % 3],
                           moment=dt.datetime(2024, 5, 1, 10) + dt.timedelta(seconds=i),
                           correlation_id=str(uuid.UUID(int=10**6 + i % 97)), data={"n": i})
        lines.append(json.dumps(event).encode())
        if (i + 1) % every == 0:
            lines.append(malformed[(i // every) % len(malformed)])
    return b"\n".join(lines) + b"\n"
