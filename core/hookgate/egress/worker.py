"""An endpoint's worker: pulls its deliveries and runs each attempt through to its outcome.

An attempt goes in named steps: admitted (rate limit plugins, flow control), built and signed
(`hookgate.egress.request`), sent (`hookgate.egress.send`), then settled and observed
(`hookgate.egress.outcome`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

import msgspec
import trio

from hookgate.broker import Commit, InMsg, OutMsg, PullConsumer
from hookgate.broker.records import DeliveryMarker, entry_decoder
from hookgate.egress.context import WorkerContext
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.flow import CircuitState
from hookgate.egress.outcome import log_context
from hookgate.egress.parts import EndpointParts
from hookgate.egress.request import authorize_and_sign, build_request
from hookgate.egress.send import Result
from hookgate.egress.watching import cancel_when_set
from hookgate.observe.redact import redact_headers, redact_text
from hookgate.observe.tracing import NO_SPAN, Span
from hookgate.types import Attempt, Delivery, Event

# The dispatcher's logger: its workers' lines have always been logged under it.
log = logging.getLogger("hookgate.dispatcher")

FETCH_WAIT = 1.0
# Longest a worker waits in place for the rate limiter or a closing circuit before deferring.
FLOW_MAX_WAIT = 5.0
KEEPALIVE = 10.0
STATE_POLL = 1.0  # how soon every replica sees an endpoint disabled or enabled elsewhere
# An attempt in flight this long is marked `delivering` in the delivery log; shorter ones are not,
# so the hot path does not pay for a record that would be stale before anyone could read it.
MARK_DELIVERING_AFTER = 1.0
# A delivery that failed unexpectedly outside an attempt is redelivered after BASE, doubling per
# redelivery up to MAX seconds.
UNEXPECTED_RETRY_BASE = 1.0
UNEXPECTED_RETRY_MAX = 60.0

_delivery_decoder = msgspec.msgpack.Decoder(Delivery)
_encode_json = msgspec.json.Encoder().encode


class EndpointWorker:
    """Pulls deliveries for one endpoint and runs `concurrency` of them at once.

    A delivery holds its worker only for the HTTP attempt: acks, retry schedules and attempt
    records are handed to the broker's batching without waiting, so the next delivery starts.
    """

    def __init__(
        self,
        context: WorkerContext,
        endpoint: Endpoint,
        consumer: PullConsumer,
        parts: EndpointParts | None = None,
        park: Callable[[InMsg], None] | None = None,
    ):
        self.context = context
        self.broker = context.broker
        self.hooks = context.hooks
        self.metrics = context.metrics
        self.states = context.states
        self.endpoint = endpoint
        self.consumer = consumer  # where its deliveries come from: its own consumer, or its shard's
        # Set for a lane (see hookgate.egress.lanes): a disabled endpoint's deliveries leave the
        # shard, rather than wait in it in front of other endpoints' deliveries.
        self.park = park
        self.concurrency = 1 if endpoint.config.ordered else endpoint.config.concurrency
        self.stopping = False
        parts = parts or EndpointParts.build(context, endpoint)
        self.sender = parts.sender
        self.outcomes = parts.outcomes
        self.flow = parts.flow
        self.held: dict[int, InMsg] = {}  # fetched and not yet settled, by stream sequence
        # Attempts in flight: delivery id -> (delivery, trio time started, marked delivering yet).
        self.in_flight: dict[str, tuple[Delivery, float, bool]] = {}
        self.handed_back: set[int] = set()  # stream sequences settled as cut off by a shutdown

    async def run(self, stopping: trio.Event) -> None:
        send, receive = trio.open_memory_channel[InMsg](0)
        # Keep-alives run while anything is held, and end with the workers: a worker restarted for
        # a changed config must not wait out the whole grace period.
        async with trio.open_nursery() as keeping:
            keeping.start_soon(self._keep_alive)
            async with trio.open_nursery() as workers:
                for _ in range(self.concurrency):
                    workers.start_soon(self._work, receive.clone())
                receive.close()
                with trio.CancelScope() as fetching:
                    workers.start_soon(cancel_when_set, stopping, fetching)
                    async with send:
                        await self._fetch_loop(send)
                # Stopping: no new fetches; in-flight deliveries get the grace period, then are nak'ed.
                self.stopping = True
                workers.cancel_scope.deadline = trio.current_time() + self.context.grace
                # Stop pulling first, so what is nak'ed from here on goes to another replica (or to
                # this endpoint's next worker), not back into this one's outstanding pull requests.
                with trio.CancelScope(shield=True):
                    await self.broker.release_consumer(self.consumer)
            keeping.cancel_scope.cancel()

    async def _fetch_loop(self, send: trio.MemorySendChannel[InMsg]) -> None:
        backoff = 0.5
        breaker = self.flow.breaker
        while True:
            if self.states.disabled(self.endpoint.name):
                # Disabled: its deliveries wait in JetStream until it is enabled again.
                await trio.sleep(STATE_POLL)
                continue
            if breaker is not None and breaker.state is CircuitState.OPEN:
                # Leave the backlog in JetStream while the circuit is open: one sleep, no churn.
                await trio.sleep(breaker.retry_in())
            try:
                msgs = await self.broker.fetch(self.consumer, self.concurrency, FETCH_WAIT)
                backoff = 0.5
            except Exception as exc:
                log.warning(
                    "endpoint %s: fetch failed: %s; retrying in %.1fs", self.endpoint.name, exc, backoff
                )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for msg in msgs:
                self.held[msg.stream_seq] = msg
            for i, msg in enumerate(msgs):
                try:
                    await send.send(msg)  # waits until a worker is free
                except trio.Cancelled:
                    for unsent in msgs[i:]:
                        self.held.pop(unsent.stream_seq, None)  # no keep-alive for it once given back
                    self.broker.give_back(self.consumer, msgs[i:])
                    raise

    async def _keep_alive(self) -> None:
        """Tell the server every held message is still being worked on, so only a crash lets
        ack_wait run out (and redelivery then comes within ACK_WAIT, not after a long attempt).
        Also marks long attempts `delivering` in the delivery log."""
        last_keep_alive = trio.current_time()
        while True:
            await trio.sleep(MARK_DELIVERING_AFTER)
            self.mark_long_attempts()
            if trio.current_time() - last_keep_alive >= KEEPALIVE:
                last_keep_alive = trio.current_time()
                self.broker.commit_later(
                    Commit(in_progress=list(self.held.values()), keep_queued=self.consumer)
                )

    def mark_long_attempts(self) -> None:
        now = trio.current_time()
        marks = []
        for key, (delivery, started, marked) in self.in_flight.items():
            if not marked and now - started >= MARK_DELIVERING_AFTER:
                self.in_flight[key] = (delivery, started, True)
                marker = DeliveryMarker(
                    delivery_id=delivery.id,
                    endpoint=delivery.endpoint,
                    state="delivering",
                    at=time.time(),
                    attempts=delivery.attempt,
                )
                subject = self.broker.topology.marker_subject(self.endpoint.name, delivery.id)
                marks.append(OutMsg(subject, _encode_json(marker)))
        if marks:
            self.broker.commit_later(Commit(marks))

    async def _work(self, receive: trio.MemoryReceiveChannel[InMsg]) -> None:
        async with receive:
            async for msg in receive:
                try:
                    await self.work_on(msg)
                finally:
                    self.held.pop(msg.stream_seq, None)

    async def work_on(self, msg: InMsg) -> None:
        if self.stopping:
            self.broker.give_back(self.consumer, [msg])  # not started: back in line
            return
        if self.states.disabled(self.endpoint.name):
            if self.park is not None:
                self.park(msg)
            else:
                self.broker.commit_later(Commit(nak=msg))  # not started: back in line
            return
        try:
            await self.deliver(msg)
        except trio.Cancelled:
            if msg.stream_seq not in self.handed_back:
                self.broker.give_back(self.consumer, [msg])  # shut down before or between attempts
            raise
        except Exception:
            # Outside an attempt (an attempt's own errors are recorded as `internal` attempts):
            # redelivered after a delay that grows with each try, never at once in a loop.
            delay = min(UNEXPECTED_RETRY_MAX, UNEXPECTED_RETRY_BASE * 2 ** min(msg.num_delivered - 1, 16))
            log.exception(
                "endpoint %s: delivery failed unexpectedly; it will be redelivered in %gs",
                self.endpoint.name,
                delay,
            )
            self.broker.commit_later(Commit(nak=msg, nak_delay=delay))

    async def deliver(self, msg: InMsg) -> None:
        endpoint = self.endpoint
        try:
            delivery = _delivery_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.error(
                "endpoint %s: dropping unreadable delivery seq %d: %s", endpoint.name, msg.stream_seq, exc
            )
            self.broker.commit_later(Commit(ack=msg))
            return
        if endpoint.config.ordered and msg.num_delivered > 1:
            delivery = await self._resume(delivery)
        current: Delivery | None = delivery
        while current is not None:
            current = await self._attempt_once(msg, current)

    async def _resume(self, delivery: Delivery) -> Delivery:
        """An ordered head redelivered after a restart or crash continues its retries where the
        delivery log says they were, instead of starting again from its first attempt.

        Its retries happen in place (the message is not republished per attempt), so the message
        still holds the attempt number it started with; the log holds the last one made."""
        topology = self.broker.topology
        subject = topology.delivery_log_subject(self.endpoint.name, delivery.id)
        try:
            stored = (await self.broker.last_msgs(topology.log_stream, [subject])).get(subject)
            last = entry_decoder.decode(stored.data) if stored is not None else None
        except Exception as exc:
            log.warning("delivery %s: could not read its log to resume it: %s", delivery.id, exc)
            return delivery
        if not isinstance(last, Attempt) or last.attempt < delivery.attempt or last.outcome != "retrying":
            return delivery
        if last.next_attempt_at is not None:
            await trio.sleep(max(0.0, last.next_attempt_at - time.time()))  # kept alive meanwhile
        log.info("delivery %s to %s resumes at attempt %d", delivery.id, delivery.endpoint, last.attempt + 1)
        # An attempt cut off by a shutdown does not use up a try of the schedule.
        series_start = delivery.series_start + (1 if last.error_kind == "shutdown" else 0)
        return msgspec.structs.replace(delivery, attempt=last.attempt + 1, series_start=series_start)

    async def _attempt_once(self, msg: InMsg, delivery: Delivery) -> Delivery | None:
        """One attempt and its outcome; for an ordered endpoint, the delivery to retry in place."""
        if not await self._admit(msg, delivery):
            return None
        started, result = await self._run_attempt(msg, delivery)
        self.flow.record(result.status, result.error_kind)
        if result.status == 410:
            return await self._gone(msg, delivery)
        retry_in = await self.outcomes.settle(msg, delivery, result, started)
        if self.endpoint.config.ordered and retry_in is not None:
            # The head of an ordered endpoint holds the line: it retries in place (kept alive by
            # _keep_alive) and everything behind it waits.
            await trio.sleep(retry_in)
            return msgspec.structs.replace(delivery, attempt=delivery.attempt + 1)
        return None

    async def _admit(self, msg: InMsg, delivery: Delivery) -> bool:
        """Whether to attempt now: asks the `hookgate_rate_limit` plugins, then the flow control.
        False once the delivery is rescheduled instead (not counted as an attempt)."""
        endpoint = self.endpoint
        ordered = endpoint.config.ordered
        defer = await self.hooks.call_first("hookgate_rate_limit", delivery=delivery, endpoint=endpoint.view)
        if defer and ordered:
            await trio.sleep(float(defer))  # nothing may overtake the head: wait in place
        elif defer:
            self.broker.commit_later(
                self.outcomes.schedule(msg, delivery, time.time() + float(defer), counted=False)
            )
            return False
        # Waiting for the limiter or the circuit holds a worker only briefly; a longer wait
        # reschedules the delivery (not counted as an attempt). Ordered endpoints wait in place.
        deferral = await self.flow.admit(max_wait=math.inf if ordered else FLOW_MAX_WAIT)
        if deferral is not None:
            spread = random.uniform(0, 1.0) if deferral.reason == "circuit_open" else 0.0
            self.metrics.deferrals.labels(endpoint.name, deferral.reason).inc()
            self.broker.commit_later(
                self.outcomes.schedule(msg, delivery, time.time() + deferral.delay + spread, counted=False)
            )
            return False
        return True

    async def _run_attempt(self, msg: InMsg, delivery: Delivery) -> tuple[float, Result]:
        """The attempt in its trace span, counted in flight while it runs: when it started and
        what it got. Cut off by a shutdown, it is recorded and handed back."""
        try:
            started = time.time()
            self.in_flight[delivery.id] = (delivery, trio.current_time(), False)
            with self.context.tracing.attempt(delivery, msg.headers) as span:
                try:
                    event = await self.hooks.chain(
                        "hookgate_transform", "event", delivery.event, endpoint=self.endpoint.view
                    )
                    result = await self._attempt(delivery, event, int(started), span)
                except Exception as exc:
                    # A bug of ours or a plugin's: still an attempt, recorded and retried on the
                    # schedule like any failure, never redelivered at once in a loop.
                    result = _internal_error(delivery, exc)
                span.done(result.status, result.error, result.error_kind)
        except BaseException as exc:
            self.flow.release()  # cancelled or crashed: do not hold the probe slot
            if isinstance(exc, trio.Cancelled) and self.stopping and delivery.id in self.in_flight:
                self.outcomes.cut_off(msg, delivery, started)
                self.handed_back.add(msg.stream_seq)
            raise
        finally:
            self.in_flight.pop(delivery.id, None)
        return started, result

    async def _attempt(self, delivery: Delivery, event: Event, ts: int, span: Span = NO_SPAN) -> Result:
        """Build, sign and send the request; the result keeps its headers, redacted, for the record."""
        request = build_request(delivery, event, self.endpoint, ts)
        span.inject_request(request)  # signatures cover the body only, so headers may be added
        await authorize_and_sign(request, self.endpoint, self.hooks)
        result = await self.sender.send(request)
        result.request_headers = redact_headers(request.headers)
        if result.error:
            result.error = redact_text(result.error, request.headers, request.url)
        return result

    async def _gone(self, msg: InMsg, delivery: Delivery) -> Delivery | None:
        """410 Gone: the receiver asks us to stop. Disable the endpoint and keep this delivery in
        line, unspent, for when it is enabled again."""
        await self.states.set(self.endpoint.name, True, f"the endpoint answered 410 Gone to {delivery.id}")
        if self.endpoint.config.ordered:
            # Rescheduling would put the head behind everything queued after it: it waits in
            # place instead, and goes first once the endpoint is enabled.
            return delivery if await self._hold_while_disabled(msg) else None
        self.broker.commit_later(self.outcomes.schedule(msg, delivery, time.time(), counted=False))
        return None

    async def _hold_while_disabled(self, msg: InMsg) -> bool:
        """Hold an ordered head while its endpoint is disabled (kept alive by `_keep_alive`).
        True once enabled again; False if this worker stops first, having handed the head back
        to the consumer, which redelivers it before anything behind it."""
        while self.states.disabled(self.endpoint.name):
            if self.stopping:
                self.broker.give_back(self.consumer, [msg])
                return False
            await trio.sleep(STATE_POLL)
        return True


def _internal_error(delivery: Delivery, exc: Exception) -> Result:
    """An attempt that failed inside the gateway (or a plugin), not at the endpoint. The record says
    only the exception's type: its message may hold what the attempt carried (a URL's password, a
    header's value); the gateway's log has the traceback."""
    log.error(
        "delivery %s to %s: attempt %d failed inside the gateway",
        delivery.id,
        delivery.endpoint,
        delivery.attempt,
        exc_info=exc,
        extra=log_context(delivery),
    )
    return Result(
        error_kind="internal",
        error=f"internal error ({type(exc).__name__}) in the gateway or a plugin; see the gateway's log",
    )
