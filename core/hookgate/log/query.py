"""Reading the delivery log back: events, deliveries and their attempts, with cursor pagination.

Pages follow stream order. A cursor is the stream sequence to continue from, so rows written while
someone pages appear once, on a later page, and no row appears twice. A page may hold fewer rows
than asked (even none) with a cursor when a status filter skipped many rows: each request reads
at most `SCAN_BUDGET` records, so one call never scans the whole retention window.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import msgspec

from hookgate.broker import Broker, StoredMsg
from hookgate.broker.events import event_from_stream
from hookgate.broker.ids import delivery_id
from hookgate.broker.records import (
    DEAD_LETTER_STATUSES,
    DeadLetter,
    DeliveryCreated,
    DeliveryMarker,
    RoutingRecord,
    Status,
    dead_letter_decoder,
    derive_status,
    entry_decoder,
    event_key,
    marker_decoder,
)
from hookgate.egress.state import EndpointStates
from hookgate.observe.redact import redact_headers
from hookgate.plugin_kit.units import rfc3339
from hookgate.types import INTERNAL_SOURCE, Attempt, Event

log = logging.getLogger("hookgate.log")

SCAN_BUDGET = 5000
CHUNK = 256
MAX_LIMIT = 500

T = TypeVar("T")


class Page(msgspec.Struct, Generic[T]):
    data: list[T]
    next: str | None  # pass as `cursor` for the next page; null: nothing more


class EventSummary(msgspec.Struct, kw_only=True):
    id: str
    source: str
    type: str
    received_at: str
    routed: bool  # false until the router has handled it
    routes: list[str] = []
    endpoints: list[str] = []
    routing_error: str | None = None


class EventDetail(EventSummary, kw_only=True):
    content_type: str
    headers: list[tuple[str, str]]
    size: int
    body: str | None  # the body as text, up to the configured excerpt size
    body_base64: str | None  # instead of `body` when it is not UTF-8
    body_truncated: bool


class AttemptView(msgspec.Struct, kw_only=True):
    attempt: int
    started_at: str
    latency_ms: float
    outcome: str
    status: int | None
    error_kind: str | None
    error: str | None
    request_headers: list[tuple[str, str]]
    response_headers: list[tuple[str, str]]
    response_body: str
    next_attempt_at: str | None


class DeliveryView(msgspec.Struct, kw_only=True):
    id: str
    event_id: str
    endpoint: str
    source: str
    type: str
    status: Status
    attempts: int
    created_at: str
    updated_at: str | None
    next_attempt_at: str | None
    last_status: int | None = None
    last_error: str | None = None


class DeliveryDetail(DeliveryView, kw_only=True):
    attempt_log: list[AttemptView]


class DeliveryState(msgspec.Struct, kw_only=True):
    """What replays need to know of one delivery."""

    created: DeliveryCreated
    view: DeliveryView


# The router stamps a delivery's creation just before storing its record; a record stored more
# than this after `until` cannot hold a delivery created by then (a scan of creations ends there).
STORE_DELAY = 60.0


def created_within(created_at: float, since: float | None, until: float | None) -> bool:
    """`since` and `until` select deliveries by when they were created, in every query and job."""
    return (since is None or created_at >= since) and (until is None or created_at <= until)


def stored_by(until: float | None) -> float | None:
    """Where a scan of creation records in stream order can stop for `until`."""
    return None if until is None else until + STORE_DELAY


class BadQuery(ValueError):
    """A query parameter the caller must fix (answered 422)."""


def encode_cursor(seq: int, kind: str = "seq") -> str:
    """`kind` names the stream the sequence is in, so a cursor is not used against another."""
    return base64.urlsafe_b64encode(f"{kind}:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, expected_kind: str = "seq") -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind == expected_kind and value.isascii() and value.isdigit() and len(value) < 19:
            return int(value)  # a stream sequence: fewer than 19 digits fits in 63 bits
    except (ValueError, UnicodeDecodeError):
        pass
    raise BadQuery(f"not a cursor from this API: {cursor!r}")


class DeliveryLog:
    def __init__(self, broker: Broker, states: EndpointStates, body_excerpt: int):
        self.broker = broker
        self.t = broker.topology
        self.states = states
        self.body_excerpt = body_excerpt

    # --- events --------------------------------------------------------------------------------

    async def list_events(
        self,
        *,
        source: str | None = None,
        since: float | None = None,
        until: float | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page[EventSummary]:
        if source is None:
            subjects = self.t.event_subjects
        else:
            subjects = [self.t.event_subject(source)]
            if source == INTERNAL_SOURCE:
                subjects.append(self.t.publish_prefix + ">")

        async def keep(msgs: list[StoredMsg], room: int) -> list[tuple[int, EventSummary]]:
            events = [(m.seq, self._event(m)) for m in msgs]
            readable = [(seq, e) for seq, e in events if e is not None][:room]
            routing = await self._routing([e.id for _, e in readable])
            return [(seq, self._summary(e, routing.get(e.id))) for seq, e in readable]

        return await self._paged(self.t.events_stream, subjects, since, until, cursor, limit, keep)

    async def get_event(self, event_id: str) -> EventDetail | None:
        found = await self._stored(event_id)
        if found is None:
            return None
        record, event = found
        summary = self._summary(event, record)
        excerpt = event.body[: self.body_excerpt]
        try:
            body, body_b64 = excerpt.decode(), None
        except UnicodeDecodeError:
            body, body_b64 = None, base64.b64encode(excerpt).decode()
        return EventDetail(
            **msgspec.structs.asdict(summary),
            content_type=event.content_type,
            headers=redact_headers(event.headers),
            size=len(event.body),
            body=body,
            body_base64=body_b64,
            body_truncated=len(event.body) > len(excerpt),
        )

    async def stored_event(self, event_id: str) -> Event | None:
        """The event as stored, for replays (None once retention removed it)."""
        found = await self._stored(event_id)
        return found[1] if found is not None else None

    async def _stored(self, event_id: str) -> tuple[RoutingRecord, Event] | None:
        """The event's routing record and the event it points at in the events stream."""
        record = (await self._routing([event_id])).get(event_id)
        if record is None:
            return None
        msg = await self.broker.get_msg(self.t.events_stream, record.events_seq)
        event = self._event(msg) if msg is not None else None
        return (record, event) if event is not None else None

    def _event(self, msg: StoredMsg) -> Event | None:
        try:
            return event_from_stream(
                self.t.publish_prefix, msg.subject, msg.data, msg.headers, msg.seq, msg.timestamp
            )
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def _routing(self, event_ids: Sequence[str]) -> dict[str, RoutingRecord]:
        subjects = {self.t.routed_subject(event_key(i)): i for i in event_ids}
        found = await self.broker.last_msgs(self.t.log_stream, list(subjects))
        out = {}
        for subject, msg in found.items():
            try:
                out[subjects[subject]] = msgspec.json.decode(msg.data, type=RoutingRecord)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("unreadable routing record at %s", subject)
        return out

    @staticmethod
    def _summary(event: Event, record: RoutingRecord | None) -> EventSummary:
        return EventSummary(
            id=event.id,
            source=event.source,
            type=event.type,
            received_at=rfc3339(event.received_at),
            routed=record is not None,
            routes=record.routes if record else [],
            endpoints=record.endpoints if record else [],
            routing_error=record.error if record else None,
        )

    # --- deliveries ----------------------------------------------------------------------------

    async def list_deliveries(
        self,
        *,
        endpoint: str | None = None,
        statuses: frozenset[str] | None = None,
        event_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page[DeliveryView]:
        if event_id is not None:
            return await self._deliveries_of_event(event_id, endpoint, statuses)

        async def keep(msgs: list[StoredMsg], room: int) -> list[tuple[int, DeliveryView]]:
            created = []
            for m in msgs:
                entry = _decode_entry(m)
                if isinstance(entry, DeliveryCreated) and created_within(entry.created_at, since, until):
                    created.append((m.seq, entry))
            if statuses is None:
                created = created[:room]  # no status to filter by: look up only the rows returned
            views = await self.delivery_views([c for _, c in created])
            return [
                (seq, view)
                for (seq, _), view in zip(created, views, strict=True)
                if statuses is None or view.status in statuses
            ]

        if statuses is not None and statuses <= DEAD_LETTER_STATUSES:
            return await self._dead_deliveries(endpoint, statuses, since, until, cursor, limit)
        subjects = [self.t.delivery_log_subject(endpoint or "*", "*")]
        return await self._paged(
            self.t.log_stream,
            subjects,
            since,
            stored_by(until),
            cursor,
            limit,
            keep,
        )

    async def _dead_deliveries(
        self,
        endpoint: str | None,
        statuses: frozenset[str],
        since: float | None,
        until: float | None,
        cursor: str | None,
        limit: int,
    ) -> Page[DeliveryView]:
        """Failed and dead deliveries, read from the dead-letter stream: it holds exactly those (a
        replay removes its dead letter), so a sparse status is found without reading the whole log.
        Rows come in the order they died; `since` and `until` still apply to creation."""

        async def keep(msgs: list[StoredMsg], room: int) -> list[tuple[int, DeliveryView]]:
            rows = []
            for m in msgs:
                letter = _decode_dead_letter(m)
                if letter is None:
                    continue
                if not created_within(letter.delivery.created_at, since, until):
                    continue
                view = self._dead_view(letter)
                if view.status in statuses:
                    rows.append((m.seq, view))
            return rows

        subjects = [self.t.dead_subject(endpoint or "*", "*")]
        # A delivery dies after it was created, so nothing stored before `since` can match; `until`
        # cannot end the scan early (a delivery created in time may die later).
        return await self._paged(
            self.t.dead_stream, subjects, since, None, cursor, limit, keep, cursor_kind="dead"
        )

    def _dead_view(self, letter: DeadLetter) -> DeliveryView:
        delivery, last = letter.delivery, letter.last_attempt
        return DeliveryView(
            id=delivery.id,
            event_id=delivery.event.id,
            endpoint=delivery.endpoint,
            source=delivery.event.source,
            type=delivery.event.type,
            status="failed" if last.outcome == "failed" else "dead",
            attempts=last.attempt,
            created_at=rfc3339(delivery.created_at),
            updated_at=rfc3339(last.started_at + last.latency),
            next_attempt_at=None,
            last_status=last.status,
            last_error=last.error,
        )

    async def _deliveries_of_event(
        self, event_id: str, endpoint: str | None, statuses: frozenset[str] | None
    ) -> Page[DeliveryView]:
        record = (await self._routing([event_id])).get(event_id)
        if record is None:
            return Page([], None)
        out = []
        for name in record.endpoints:
            if endpoint is not None and name != endpoint:
                continue
            state = await self.delivery_state(delivery_id(event_id, name))
            if state is not None and (statuses is None or state.view.status in statuses):
                out.append(state.view)
        return Page(out, None)

    async def get_delivery(self, delivery_id: str) -> DeliveryDetail | None:
        found = await self._history(delivery_id)
        if found is None:
            return None
        state, attempts = found
        return DeliveryDetail(
            **msgspec.structs.asdict(state.view), attempt_log=[_attempt_view(a) for a in attempts]
        )

    async def delivery_state(self, delivery_id: str) -> DeliveryState | None:
        found = await self._history(delivery_id)
        return found[0] if found is not None else None

    async def _history(self, delivery_id: str) -> tuple[DeliveryState, list[Attempt]] | None:
        """A delivery's state and every attempt, oldest first."""
        # One filter per scan: with two, nats-server walks the whole stream to count what matches,
        # while one subject with a wildcard for the endpoint is found through its subject index.
        entries, _ = await self.broker.scan(
            self.t.log_stream, [self.t.delivery_log_subject("*", delivery_id)], limit=10_000
        )
        if not entries:
            return None
        markers, _ = await self.broker.scan(
            self.t.log_stream, [self.t.marker_subject("*", delivery_id)], limit=10_000
        )
        created: DeliveryCreated | None = None
        attempts: list[Attempt] = []
        for m in entries:
            entry = _decode_entry(m)
            if isinstance(entry, DeliveryCreated):
                created = entry
            elif isinstance(entry, Attempt):
                attempts.append(entry)
        if created is None:
            return None
        marker = _decode_marker(markers[-1]) if markers else None
        attempts.sort(key=lambda a: a.attempt)
        view = self._view(created, marker, attempts[-1] if attempts else None)
        return DeliveryState(created=created, view=view), attempts

    async def delivery_views(self, created: list[DeliveryCreated]) -> list[DeliveryView]:
        """Each delivery's current view: two last-message reads per delivery, in one crossing."""
        record_subjects = [self.t.delivery_log_subject(c.endpoint, c.delivery_id) for c in created]
        marker_subjects = [self.t.marker_subject(c.endpoint, c.delivery_id) for c in created]
        last = await self.broker.last_msgs(self.t.log_stream, record_subjects + marker_subjects)
        views = []
        for c, rs, ms in zip(created, record_subjects, marker_subjects, strict=True):
            record = _decode_entry(last[rs]) if rs in last else None
            marker = _decode_marker(last[ms]) if ms in last else None
            views.append(self._view(c, marker, record if isinstance(record, Attempt) else None))
        return views

    def _view(
        self, created: DeliveryCreated, marker: DeliveryMarker | None, attempt: Attempt | None
    ) -> DeliveryView:
        derived = derive_status(marker, attempt, disabled=self.states.disabled(created.endpoint))
        return DeliveryView(
            id=created.delivery_id,
            event_id=created.event_id,
            endpoint=created.endpoint,
            source=created.source,
            type=created.type,
            status=derived.status,
            attempts=derived.attempts,
            created_at=rfc3339(created.created_at),
            updated_at=rfc3339(derived.updated_at) if derived.updated_at else None,
            next_attempt_at=rfc3339(derived.next_attempt_at) if derived.next_attempt_at else None,
            last_status=attempt.status if attempt else None,
            last_error=attempt.error if attempt else None,
        )

    # --- dead letters --------------------------------------------------------------------------

    async def dead_letter(self, endpoint: str, delivery_id: str) -> DeadLetter | None:
        subject = self.t.dead_subject(endpoint, delivery_id)
        msg = (await self.broker.last_msgs(self.t.dead_stream, [subject])).get(subject)
        return _decode_dead_letter(msg) if msg is not None else None

    # --- paging --------------------------------------------------------------------------------

    async def _paged(
        self,
        stream: str,
        subjects: list[str],
        since: float | None,
        until: float | None,
        cursor: str | None,
        limit: int,
        keep: Callable[[list[StoredMsg], int], Awaitable[list[tuple[int, T]]]],
        *,
        cursor_kind: str = "seq",
    ) -> Page[T]:
        """Read in chunks (each read is a consumer created on the server, the costly part) and let
        `keep(records, room)` turn records into rows: it may drop records by a condition, and need
        not build more than `room` rows (building one costs lookups)."""
        if not 1 <= limit <= MAX_LIMIT:
            raise BadQuery(f"limit must be between 1 and {MAX_LIMIT}")
        seq = decode_cursor(cursor, cursor_kind) if cursor else 0
        out: list[T] = []
        budget = SCAN_BUDGET
        while budget > 0:
            msgs, more = await self.broker.scan(
                stream,
                subjects,
                start_seq=seq,
                start_time=since if seq == 0 else None,
                limit=min(CHUNK, budget),
            )
            budget -= len(msgs)
            in_range = [m for m in msgs if until is None or m.timestamp <= until]
            for row_seq, row in await keep(in_range, limit - len(out)):
                out.append(row)
                if len(out) == limit:
                    return Page(out, encode_cursor(row_seq + 1, cursor_kind))
            if not msgs or len(in_range) < len(msgs) or not more:
                return Page(out, None)
            seq = msgs[-1].seq + 1
        return Page(out, encode_cursor(seq, cursor_kind))


def _decode_entry(msg: StoredMsg) -> DeliveryCreated | Attempt | None:
    try:
        return entry_decoder.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("unreadable delivery log record at %s", msg.subject)
        return None


def _decode_dead_letter(msg: StoredMsg) -> DeadLetter | None:
    try:
        return dead_letter_decoder.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("unreadable dead letter at %s", msg.subject)
        return None


def _decode_marker(msg: StoredMsg) -> DeliveryMarker | None:
    try:
        return marker_decoder.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("unreadable delivery marker at %s", msg.subject)
        return None


def _attempt_view(a: Attempt) -> AttemptView:
    return AttemptView(
        attempt=a.attempt,
        started_at=rfc3339(a.started_at),
        latency_ms=round(a.latency * 1000, 3),
        outcome=a.outcome,
        status=a.status,
        error_kind=a.error_kind,
        error=a.error,
        request_headers=redact_headers(a.request_headers),
        response_headers=a.response_headers,
        response_body=a.response_body.decode(errors="replace"),
        next_attempt_at=rfc3339(a.next_attempt_at) if a.next_attempt_at else None,
    )
