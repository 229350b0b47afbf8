"""Storing events in the events stream: shared by webhook ingress and the internal publish API."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import trio

from hookgate.broker import Broker, Commit, OutMsg, PubResult
from hookgate.observe.tracing import NO_SPAN, Span
from hookgate.types import INTERNAL_SOURCE, Event

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Event)

RETRY_INTERVAL = 0.25


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    return _decoder.decode(data)


def event_from_stream(
    publish_prefix: str, subject: str, data: bytes, headers: dict[str, str], seq: int, timestamp: float
) -> Event:
    """The event a message in the events stream holds (raises msgspec errors if unreadable)."""
    if subject.startswith(publish_prefix):
        # Published by one of our services straight to JetStream: the body is the event data.
        try:
            msgspec.json.decode(data)  # must be JSON to be sent as Standard Webhooks `data`
        except RecursionError:
            raise msgspec.DecodeError("JSON nested too deeply") from None
        return Event(
            id=headers.get("Nats-Msg-Id") or f"evt_s{seq}",
            source=INTERNAL_SOURCE,
            type=subject[len(publish_prefix) :],
            received_at=timestamp,
            body=data,
        )
    return decode_event(data)


async def store_event(
    broker: Broker,
    event: Event,
    dedup_key: str,
    span: Span = NO_SPAN,
    stored_late: Callable[[], None] | None = None,
) -> PubResult:
    """Publish an event and wait until JetStream has stored it (or reports it as a duplicate).

    During a leader election or a reconnect publishes fail for a few seconds, so failures are
    retried until the publish timeout; only then does the caller answer 503. The message carries
    `span`'s trace context, which the router copies onto every delivery.

    A publish that timed out may still be stored: the broker may have it and not have answered
    yet. `stored_late` is called if it is (and was not a duplicate), so that events stored after
    a 503 can be counted; a client that retries with the same id makes no second event.
    """
    headers = {"Nats-Msg-Id": dedup_key}
    span.inject(headers)
    msg = OutMsg(broker.topology.event_subject(event.source), encode_event(event), headers)
    deadline = trio.current_time() + broker.publish_timeout
    late = (lambda result: _tell_if_stored(result, stored_late)) if stored_late is not None else None
    while True:
        commit = Commit([msg], late=late)
        with trio.move_on_at(deadline):
            (result,) = await broker.commit(commit)
            if result.ok or trio.current_time() + RETRY_INTERVAL >= deadline:
                return result
            await trio.sleep(RETRY_INTERVAL)
            continue
        commit.abandoned = True  # its PubAck may come yet, to the broker or to the bridge
        return PubResult(error="timed out waiting for JetStream")


def _tell_if_stored(result: PubResult, tell: Callable[[], None]) -> None:
    if result.ok and not result.duplicate:
        tell()
