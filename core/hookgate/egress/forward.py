"""Moving stored deliveries to another subject (parking, unparking, spilling, the older layout's
migration), and creating the consumers egress creates as it goes.

A move publishes a copy and acks the original once the copy is stored, so a crash between the two
leaves a duplicate, never a loss. The copy keeps the message's own headers (its trace) but none of
the server's: a `Nats-Msg-Id` of its own, as the original's would make the stream drop the copy
as a duplicate within its dedup window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from hookgate.broker import Broker, Commit, ConsumerSpec, InMsg, OutMsg, PullConsumer

log = logging.getLogger("hookgate.dispatcher")

MOVE_BATCH = 256
FETCH_WAIT = 1.0
MOVE_RETRY_DELAY = 1.0  # a copy that could not be stored: the original comes back after this


def moved(msg: InMsg, subject: str) -> Commit:
    """Copy `msg` to `subject`, and ack it once the copy is stored."""
    headers = {k: v for k, v in msg.headers.items() if not k.startswith("Nats-")}
    headers["Nats-Msg-Id"] = f"moved:{msg.stream_seq}"
    return Commit([OutMsg(subject, msg.data, headers)], ack=msg, required=1, nak_delay=MOVE_RETRY_DELAY)


async def move_all(
    broker: Broker,
    spec: ConsumerSpec,
    destination: Callable[[InMsg], str],
    keep_going: Callable[[], bool],
    *,
    purge: bool,
    until_empty: bool = True,
) -> bool:
    """Move everything `spec`'s consumer has to `destination(msg)`, in order, while `keep_going()`.

    True once nothing is left (unless not `until_empty`: then it keeps moving what comes): the
    consumer is deleted then and, with `purge`, the moved messages are removed from the stream
    (only those stored up to the last one moved, so a message that arrived meanwhile stays for
    the next move).
    """
    (consumer,) = await broker.consumers([spec])
    last_moved = 0
    empty = False
    try:
        while keep_going():
            msgs = await broker.fetch(consumer, MOVE_BATCH, FETCH_WAIT)
            if msgs:
                results = await broker.commit_many([moved(m, destination(m)) for m in msgs])
                if any(r.error for rs in results for r in rs):
                    log.warning("moving deliveries from %s: a copy was not stored", spec.filter_subject)
                    await trio.sleep(MOVE_RETRY_DELAY)
                last_moved = max(last_moved, *(m.stream_seq for m in msgs))
                continue
            if until_empty and (await broker.pending_counts([consumer])).get(spec.durable, 1) == 0:
                empty = True
                break
    finally:
        with trio.CancelScope(shield=True):
            await broker.release_consumer(consumer)
    if empty:
        await broker.delete_consumer(spec.stream, spec.durable)
        if purge and last_moved and spec.filter_subject is not None:
            await broker.purge_subject(spec.stream, spec.filter_subject, last_moved + 1)
    return empty


async def consumer_until(
    broker: Broker, spec: ConsumerSpec, stop: trio.Event, max_backoff: float = 5.0
) -> PullConsumer | None:
    """Create or update a durable consumer, retrying (at the stream's consumer limit, say) until
    it exists; None if `stop` is set first. What it would read waits in the stream meanwhile."""
    backoff = 0.5
    while not stop.is_set():
        try:
            (consumer,) = await broker.consumers([spec])
            return consumer
        except Exception as exc:
            log.warning("cannot create consumer %s: %s; retrying", spec.durable, exc)
        with trio.move_on_after(backoff):
            await stop.wait()
        backoff = min(backoff * 2, max_backoff)
    return None
