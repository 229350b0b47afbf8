"""Retries: the delay before the next attempt, `Retry-After`, and how a retry or a give-up is stored.

A failed attempt is not nak'ed with a delay: that would keep the message counted against the
consumer's max_ack_pending for the whole delay, and a recovered endpoint would wait hours for fresh
events. Instead the next attempt is published as a JetStream scheduled message (`Nats-Schedule:
@at ...`) that lands back on the endpoint's subject when due, and the current message is acked.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from typing import TYPE_CHECKING

import msgspec

from hookgate.broker import Commit, InMsg, OutMsg, Topology
from hookgate.broker.records import DeadLetter
from hookgate.observe.tracing import carried
from hookgate.plugin_kit.units import rfc3339
from hookgate.types import Attempt, Delivery

if TYPE_CHECKING:
    from hookgate.egress.send import Result

_encode = msgspec.msgpack.Encoder().encode
_encode_json = msgspec.json.Encoder().encode


def retry_delay(schedule: list[float], jitter: float, attempt: int, retry_after: float | None) -> float:
    """The scheduled delay before attempt `attempt + 1`, with jitter; see `Endpoint.retry_delay`."""
    base = schedule[attempt - 1]
    delay = max(0.0, base * (1 + random.uniform(-jitter, jitter)))
    if retry_after is not None:
        delay = min(max(delay, retry_after), max(schedule))
    return delay


def parse_retry_after(result: Result) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), if there is one."""
    value = next((v for k, v in result.headers if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def schedule_next(
    topology: Topology, endpoint: str, msg: InMsg, delivery: Delivery, at: float, *, counted: bool
) -> Commit:
    """Put the delivery back on the endpoint's subject at `at`; ack the current one once stored."""
    next_delivery = msgspec.structs.replace(delivery, attempt=delivery.attempt + (1 if counted else 0))
    scheduled = OutMsg(
        topology.schedule_subject(endpoint, delivery.id, next_delivery.attempt),
        _encode(next_delivery),
        {
            "Nats-Schedule": f"@at {rfc3339(math.ceil(at * 1000) / 1000)}",
            "Nats-Schedule-Target": topology.delivery_subject(endpoint),
            **carried(msg.headers),  # the retry stays in the event's trace
        },
    )
    # If the schedule cannot be stored, the message is left for redelivery after ack_wait.
    return Commit([scheduled], ack=msg, required=1)


def dead_letter(
    topology: Topology, endpoint: str, msg: InMsg, delivery: Delivery, attempt: Attempt
) -> Commit:
    """The delivery and its last attempt to the dead-letter stream, the attempt to the delivery log,
    and the message acked once the dead letter is stored."""
    record = DeadLetter(delivery=delivery, last_attempt=attempt)
    dead = OutMsg(
        topology.dead_subject(endpoint, delivery.id),
        _encode(record),
        {"Nats-Msg-Id": f"dead:{delivery.id}:{delivery.attempt}"},
    )
    attempt_record = OutMsg(topology.delivery_log_subject(endpoint, delivery.id), _encode_json(attempt))
    return Commit([dead, attempt_record], ack=msg, required=1)
