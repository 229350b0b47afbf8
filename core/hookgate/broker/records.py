"""The delivery log's records, and how a delivery's status follows from them.

Everything is kept in the log stream, under subjects that make each question one lookup:

- `<p>.log.deliveries.<endpoint>.<delivery id>`: a `DeliveryCreated` record when the router fans an
  event out, then one `Attempt` record per attempt. Listing an endpoint's deliveries scans
  `<p>.log.deliveries.<endpoint>.*` for the creation records, in creation order, which never
  changes: a cursor (the next stream sequence) returns every row exactly once. nats-server keeps
  an index entry per subject (about 110 bytes of memory each), which is why attempts share the
  creation record's subject.
- `<p>.log.markers.<endpoint>.<delivery id>`: `DeliveryMarker`s (an attempt in flight for a while,
  a replay). Few deliveries have any.
- `<p>.log.routed.<event key>`: the router's `RoutingRecord` for an event (routes matched, where
  the event is in the events stream).

A delivery's status follows from its last marker and its last attempt (see `derive_status`), so it
takes two "last message on subject" reads and no scan: the last record on the delivery's subject is
its last attempt, or its creation record while it has none. Retention is the stream's `max_age`.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec

from hookgate.types import Attempt, Delivery

Status = Literal["pending", "delivering", "retrying", "succeeded", "failed", "dead", "held"]
STATUSES: tuple[Status, ...] = ("pending", "delivering", "retrying", "succeeded", "failed", "dead", "held")
# A delivery in one of these is still on its way: replaying it now would send it twice.
ACTIVE: frozenset[str] = frozenset({"pending", "delivering", "retrying", "held"})
# What a recover re-enqueues when the caller names no status.
RECOVERABLE: tuple[Status, ...] = ("failed", "dead")
# The statuses whose deliveries are in the dead-letter stream (and nowhere else, once replayed).
DEAD_LETTER_STATUSES: frozenset[str] = frozenset({"failed", "dead"})


class DeliveryCreated(msgspec.Struct, kw_only=True, tag="created", tag_field="record"):
    """Written by the router in the same commit as the delivery itself."""

    delivery_id: str
    event_id: str
    endpoint: str
    source: str
    type: str
    created_at: float
    routes: list[str] = []


class DeliveryMarker(msgspec.Struct, kw_only=True, tag="marker", tag_field="record"):
    """A change of state that is not an attempt's outcome.

    `delivering`: an attempt has been in flight for a while (short attempts are not marked, so the
    hot path does not pay for a record nobody could see). `requeued`: a replay put the delivery
    back in line; `attempts` is how many attempts it had made before.
    """

    delivery_id: str
    endpoint: str
    state: Literal["delivering", "requeued"]
    at: float
    attempts: int
    reason: str = ""


LogEntry = DeliveryCreated | Attempt
entry_decoder = msgspec.json.Decoder(LogEntry)
marker_decoder = msgspec.json.Decoder(DeliveryMarker)


class DeadLetter(msgspec.Struct, kw_only=True):
    """A delivery that used up its attempts or failed for good, kept for inspection and redrive."""

    delivery: Delivery
    last_attempt: Attempt


dead_letter_decoder = msgspec.msgpack.Decoder(DeadLetter)


def event_key(event_id: str) -> str:
    """A subject token for an event id (ids may hold '.', which separates subject tokens)."""
    return hashlib.blake2b(event_id.encode(), digest_size=12).hexdigest()


class DerivedStatus(msgspec.Struct, kw_only=True):
    status: Status
    attempts: int
    next_attempt_at: float | None = None
    updated_at: float | None = None


def derive_status(
    marker: DeliveryMarker | None,
    attempt: Attempt | None,
    *,
    disabled: bool,
) -> DerivedStatus:
    """The status from the last marker and the last attempt."""
    if attempt is not None and (marker is None or _supersedes(attempt, marker)):
        last = attempt
        status: Status
        if last.outcome == "succeeded":
            status = "succeeded"
        elif last.outcome == "retrying":
            status = "retrying"
        elif last.outcome == "failed":
            status = "failed"
        else:
            status = "dead"
        derived = DerivedStatus(
            status=status,
            attempts=last.attempt,
            next_attempt_at=last.next_attempt_at if status == "retrying" else None,
            updated_at=last.started_at + last.latency,
        )
    elif marker is not None:
        m = marker
        derived = DerivedStatus(
            status="delivering" if m.state == "delivering" else "pending",
            attempts=m.attempts,
            updated_at=m.at,
        )
    else:
        derived = DerivedStatus(status="pending", attempts=0)
    if disabled and derived.status in ("pending", "retrying"):
        derived.status = "held"  # waiting in JetStream until the endpoint is enabled
    return derived


def _supersedes(attempt: Attempt, marker: DeliveryMarker) -> bool:
    """Whether the attempt record is newer than the marker.

    Markers are written without waiting, so one may be stored just after the attempt it announced;
    so the attempt numbers decide, not the stream order. `delivering` announces attempt number
    `attempts`; `requeued` follows attempt number `attempts`.
    """
    number, m = attempt.attempt, marker
    return number >= m.attempts if m.state == "delivering" else number > m.attempts


class RoutingRecord(msgspec.Struct, kw_only=True):
    """What the router decided for one event (kept in the log stream)."""

    event_id: str
    source: str
    type: str
    received_at: float
    routes: list[str]
    endpoints: list[str]
    error: str | None = None
    events_seq: int = 0  # where the event is in the events stream
