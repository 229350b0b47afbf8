"""The dispatcher: one durable consumer and one connection pool per endpoint, retries by schedule.

A failed attempt is not nak'ed with a delay: that would keep the message counted against the
consumer's max_ack_pending for the whole delay, and a recovered endpoint would wait hours for fresh
events. Instead the next attempt is published as a JetStream scheduled message (`Nats-Schedule:
@at ...`) that lands back on the endpoint's subject when due, and the current message is acked.
"""

from __future__ import annotations

import contextlib
import email.utils
import inspect
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import trio

from hookgate.broker import Broker, Commit, ConsumerSpec, InMsg, OutMsg, PullConsumer
from hookgate.broker.records import DeadLetter, DeliveryMarker, entry_decoder
from hookgate.config import EndpointConfig
from hookgate.egress.flow import CircuitState, FlowControl
from hookgate.egress.state import EndpointStates
from hookgate.observe.metrics import Metrics
from hookgate.observe.redact import redact_headers, redact_text
from hookgate.observe.tracing import NO_SPAN, OFF, Span, Tracing, carried
from hookgate.plugin_host.hooks import Hooks
from hookgate.plugin_kit.units import format_duration, plural, rfc3339, seconds
from hookgate.transport.fields import sendable
from hookgate.transport.pool import PooledTransport
from hookgate.transport.ssrf import EgressGuard, SsrfRefused
from hookgate.transport.url import Target
from hookgate.types import Attempt, Delivery, EndpointView, ErrorKind, Event, Headers, OutgoingRequest

log = logging.getLogger("hookgate.dispatcher")

FETCH_WAIT = 1.0
# Longest a worker waits in place for the rate limiter or a closing circuit before deferring.
FLOW_MAX_WAIT = 5.0
ACK_WAIT = 30.0
KEEPALIVE = 10.0
STATE_POLL = 1.0  # how soon every replica sees an endpoint disabled or enabled elsewhere
BACKLOG_POLL = 5.0
RESPONSE_EXCERPT = 4096
# An attempt in flight this long is marked `delivering` in the delivery log; shorter ones are not,
# so the hot path does not pay for a record that would be stale before anyone could read it.
MARK_DELIVERING_AFTER = 1.0
# A delivery that failed unexpectedly outside an attempt is redelivered after BASE, doubling per
# redelivery up to MAX seconds.
UNEXPECTED_RETRY_BASE = 1.0
UNEXPECTED_RETRY_MAX = 60.0

# Not forwarded from the provider's request: they describe the hop, not the event.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
# Set by us on every request; a provider's own values of these are replaced.
OURS = frozenset(
    {"webhook-id", "webhook-timestamp", "webhook-signature", "hookgate-delivery-id", "hookgate-attempt"}
)

_delivery_decoder = msgspec.msgpack.Decoder(Delivery)
_encode = msgspec.msgpack.Encoder().encode
_encode_json = msgspec.json.Encoder().encode


@dataclass
class Endpoint:
    """A configured endpoint, ready to deliver to."""

    name: str
    config: EndpointConfig
    view: EndpointView
    timeout: float
    schedule: list[float]
    jitter: float
    final_statuses: frozenset[int] = frozenset()
    transport: PooledTransport | None = field(default=None, repr=False)
    guard: EgressGuard = field(default_factory=EgressGuard, repr=False)

    @classmethod
    def build(
        cls,
        name: str,
        config: EndpointConfig,
        signer: Any = None,
        guard: EgressGuard | None = None,
        auth: Any = None,
        proxy: str | None = None,
    ) -> Endpoint:
        guard = guard or EgressGuard()
        ssl_context = auth.ssl_context() if auth is not None else None
        # The guard resolves the host and vets every address; the transport connects to exactly
        # those addresses, so a DNS answer cannot change between the check and the connection.
        transport = (
            PooledTransport(
                max_connections=config.concurrency,
                resolve=guard.resolve,
                ssl_context=ssl_context,
                proxy=proxy,
            )
            if config.url
            else None
        )
        return cls(
            name=name,
            config=config,
            view=EndpointView(name=name, url=config.url, subject=config.subject, signer=signer, auth=auth),
            timeout=seconds(config.timeout),
            schedule=config.retry.delays(),
            final_statuses=frozenset(config.retry.final_statuses),
            jitter=config.retry.jitter,
            transport=transport,
            guard=guard,
        )

    @property
    def max_attempts(self) -> int:
        return len(self.schedule) + 1

    def retry_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The delay before attempt `attempt + 1`, with jitter (so retries of a burst spread out).

        A `Retry-After` from the endpoint lengthens it, but never past the policy's longest delay.
        """
        base = self.schedule[attempt - 1]
        delay = max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))
        if retry_after is not None:
            delay = min(max(delay, retry_after), max(self.schedule))
        return delay

    def is_final(self, result: Result) -> bool:
        """Failures that retrying cannot fix: refused by the SSRF guard, or a configured status."""
        return result.error_kind == "ssrf_refused" or result.status in self.final_statuses


@dataclass
class Result:
    status: int | None = None
    error_kind: ErrorKind | None = None
    error: str | None = None
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    request_headers: Headers = field(default_factory=list)  # redacted, for the attempt record

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


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


def request_body(event: Event) -> tuple[bytes, str]:
    """Ingress events keep their bytes; internal events become a Standard Webhooks payload."""
    if not event.internal:
        return event.body, event.content_type
    head = (
        b'{"type":' + _encode_json(event.type) + b',"timestamp":' + _encode_json(rfc3339(event.received_at))
    )
    return head + b',"data":' + event.body + b"}", "application/json"


def request_headers(
    delivery: Delivery, event: Event, endpoint: Endpoint, content_type: str, ts: int
) -> Headers:
    headers: Headers = []
    if not event.internal:
        headers.extend(
            (k, v)
            for k, v in event.headers
            if k.lower() not in HOP_BY_HOP and k.lower() not in OURS and sendable(k, v)
        )
        headers.append(("hookgate-source", event.source))
        headers.append(("hookgate-event-id", event.id))
    else:
        headers.append(("content-type", content_type))
    headers.extend(endpoint.config.headers.items())
    headers.append(("webhook-id", event.id))
    headers.append(("webhook-timestamp", str(ts)))
    headers.append(("hookgate-delivery-id", delivery.id))
    headers.append(("hookgate-attempt", str(delivery.attempt)))
    if not any(name.lower() == "user-agent" for name, _ in headers):
        headers.append(("user-agent", "hookgate"))  # a provider's own is forwarded as it came
    return headers


class Dispatcher:
    def __init__(
        self,
        broker: Broker,
        hooks: Hooks,
        endpoints: dict[str, Endpoint],
        grace: float,
        metrics: Metrics,
        states: EndpointStates | None = None,
        tracing: Tracing = OFF,
    ):
        self.broker = broker
        self.hooks = hooks
        self.endpoints = endpoints
        self.grace = grace
        self.metrics = metrics
        self.states = states or EndpointStates(broker)
        self.tracing = tracing
        self._slots: dict[str, _Slot] = {}
        self._nursery: trio.Nursery | None = None
        self._stopping: trio.Event | None = None

    def consumer_spec(self, endpoint: Endpoint) -> ConsumerSpec:
        t = self.broker.topology
        return ConsumerSpec(
            t.deliveries_stream,
            t.endpoint_consumer(endpoint.name),
            t.delivery_subject(endpoint.name),
            # Messages held here are kept alive every KEEPALIVE seconds however long they wait or
            # take; after a crash the server redelivers them once this passes.
            ack_wait=ACK_WAIT,
            # Ordered: the server hands out the next message only once the head is acked.
            max_ack_pending=1 if endpoint.config.ordered else max(64, endpoint.config.concurrency * 4),
            buffer=1 if endpoint.config.ordered else endpoint.config.concurrency,
        )

    async def run(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # The consumers of the endpoints known at start are created (or updated) in one crossing,
        # before the gateway reports itself started.
        initial = dict(self.endpoints)
        consumers = await self.broker.consumers([self.consumer_spec(e) for e in initial.values()])
        await self.states.refresh()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._stopping = stopping
                for endpoint, consumer in zip(initial.values(), consumers, strict=True):
                    self._start(endpoint, consumer)
                task_status.started()
                self._reconcile()  # endpoints that changed while the consumers were being created
                nursery.start_soon(self._follow_states, stopping)
                nursery.start_soon(self._measure_backlog, stopping)
                await stopping.wait()
                for slot in self._slots.values():
                    slot.stop.set()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for endpoint in self.endpoints.values():
                    if endpoint.transport is not None:
                        await endpoint.transport.aclose()

    def update(self, endpoints: dict[str, Endpoint]) -> None:
        """Serve these endpoints from now on: start new ones, restart changed ones, stop removed ones."""
        self.endpoints = dict(endpoints)
        self._reconcile()

    def _reconcile(self) -> None:
        if self._nursery is None or self._stopping is None or self._stopping.is_set():
            return  # not running yet (run() starts what is current), or shutting down
        for name, slot in self._slots.items():
            wanted = self.endpoints.get(name)
            if wanted is not slot.endpoint:
                slot.wanted = wanted
                slot.stop.set()
        for name, endpoint in self.endpoints.items():
            if name not in self._slots:
                self._start(endpoint, None)

    def _start(self, endpoint: Endpoint, consumer: PullConsumer | None) -> None:
        assert self._nursery is not None and self._stopping is not None
        slot = _Slot(endpoint)
        self._slots[endpoint.name] = slot
        self._nursery.start_soon(self._serve, slot, consumer, self._stopping)

    async def _serve(self, slot: _Slot, consumer: PullConsumer | None, stopping: trio.Event) -> None:
        """One endpoint's worker, restarted with the new config whenever the endpoint changes.

        A change stops the worker the way shutdown does: no new fetches, and in-flight deliveries
        finish within the grace period. The worker releases its pull as it stops (what it had
        buffered is nak'ed for the next worker), and the durable consumer stays.
        """
        name = slot.endpoint.name
        try:
            while True:
                endpoint = slot.endpoint
                if consumer is None:
                    consumer = await self._consumer(endpoint, slot.stop)
                slot.consumer = consumer
                if consumer is not None:
                    await EndpointWorker(self, endpoint, consumer).run(slot.stop)
                if endpoint.transport is not None and all(e is not endpoint for e in self.endpoints.values()):
                    with trio.CancelScope(shield=True):
                        await endpoint.transport.aclose()
                if stopping.is_set():
                    return
                if slot.wanted is None:  # removed (the worker released its pull as it stopped)
                    self._forget_metrics(name)
                    log.info("endpoint %s: stopped delivering (removed)", name)
                    return
                log.info("endpoint %s: restarting with its new config", name)
                slot.endpoint, slot.stop = slot.wanted, trio.Event()
                consumer = None  # created again: its settings follow the new config
        finally:
            if self._slots.get(name) is slot:
                del self._slots[name]
        # Re-added while this one was stopping: serve it again. Not from a `finally`: when the
        # gateway is cancelled from outside, each new worker would be cancelled at once and would
        # start the next, without end.
        self._reconcile()

    async def _consumer(self, endpoint: Endpoint, stop: trio.Event) -> PullConsumer | None:
        """Create or update the endpoint's durable consumer, retrying until it exists or `stop`."""
        backoff = 0.5
        while not stop.is_set():
            try:
                (consumer,) = await self.broker.consumers([self.consumer_spec(endpoint)])
                return consumer
            except Exception as exc:
                log.warning("endpoint %s: cannot create its consumer: %s; retrying", endpoint.name, exc)
            with trio.move_on_after(backoff):
                await stop.wait()
            backoff = min(backoff * 2, 5.0)
        return None

    def _forget_metrics(self, name: str) -> None:
        for gauge in (self.metrics.backlog, self.metrics.circuit_open, self.metrics.endpoint_disabled):
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    async def _measure_backlog(self, stopping: trio.Event) -> None:
        """Backlog gauges from consumer info: what each endpoint still has to take."""
        while not stopping.is_set():
            consumers = {
                slot.consumer.spec.durable: name
                for name, slot in self._slots.items()
                if slot.consumer is not None
            }
            try:
                counts = await self.broker.bridge.pending_counts(
                    [s.consumer for s in self._slots.values() if s.consumer is not None]
                )
            except Exception as exc:
                log.debug("could not read consumer info: %s", exc)
            else:
                for durable, count in counts.items():
                    name = consumers.get(durable)
                    if name is not None and name in self._slots:
                        self.metrics.backlog.labels(name).set(count)
            for name in list(self._slots):
                self.metrics.endpoint_disabled.labels(name).set(1 if self.states.disabled(name) else 0)
            with trio.move_on_after(BACKLOG_POLL):
                await stopping.wait()

    async def _follow_states(self, stopping: trio.Event) -> None:
        """Re-read endpoint states, so a disable or enable by any replica or the API applies here."""
        while not stopping.is_set():
            with trio.move_on_after(STATE_POLL):
                await stopping.wait()
            try:
                await self.states.refresh()
            except Exception as exc:
                log.warning("could not read endpoint states: %s", exc)


@dataclass(eq=False)
class _Slot:
    """One endpoint served by this dispatcher: its running config, and the one it should run."""

    endpoint: Endpoint
    wanted: Endpoint | None = None  # set with `stop`: the next config, or None once removed
    stop: trio.Event = field(default_factory=trio.Event)
    consumer: PullConsumer | None = None


class EndpointWorker:
    """Pulls deliveries for one endpoint and runs `concurrency` of them at once.

    A delivery holds its worker only for the HTTP attempt: acks, retry schedules and attempt
    records are handed to the broker's batching without waiting, so the next delivery starts.
    """

    def __init__(self, dispatcher: Dispatcher, endpoint: Endpoint, consumer: PullConsumer):
        self.d = dispatcher
        self.broker = dispatcher.broker
        self.hooks = dispatcher.hooks
        self.endpoint = endpoint
        self.consumer = consumer
        self.concurrency = 1 if endpoint.config.ordered else endpoint.config.concurrency
        self.stopping = False
        self._parsed: tuple[str, Target] | None = None  # see _target
        self.held: dict[int, InMsg] = {}  # fetched and not yet settled, by stream sequence
        # Attempts in flight: delivery id -> (delivery, trio time started, marked delivering yet).
        self.in_flight: dict[str, tuple[Delivery, float, bool]] = {}
        self.handed_back: set[int] = set()  # stream sequences settled as cut off by a shutdown
        self.failing_since: float | None = None  # start of the current run of failed attempts
        self.disable_after = seconds(endpoint.config.disable_after) if endpoint.config.disable_after else None
        config = endpoint.config
        self.flow = FlowControl(
            config.rate_limit,
            config.circuit_breaker,
            on_change=self._circuit_changed,
            probe_timeout=2 * endpoint.timeout + 5,  # a probe may be sent twice (401 token refresh)
        )

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
                workers.cancel_scope.deadline = trio.current_time() + self.d.grace
                # Stop pulling first, so what is nak'ed from here on goes to another replica (or to
                # this endpoint's next worker), not back into this one's outstanding pull requests.
                with trio.CancelScope(shield=True):
                    await self.broker.release_consumer(self.consumer)
            keeping.cancel_scope.cancel()

    async def _fetch_loop(self, send: trio.MemorySendChannel[InMsg]) -> None:
        backoff = 0.5
        breaker = self.flow.breaker
        while True:
            if self.d.states.disabled(self.endpoint.name):
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
                        self.held.pop(unsent.stream_seq, None)  # no keep-alive for it after the nak
                        self.broker.commit_later(Commit(nak=unsent))
                    raise

    def _circuit_changed(self, old: CircuitState, new: CircuitState) -> None:
        log.warning("endpoint %s: circuit %s -> %s", self.endpoint.name, old, new)
        self.d.metrics.circuit_open.labels(self.endpoint.name).set(0 if new is CircuitState.CLOSED else 1)

    async def _keep_alive(self) -> None:
        """Tell the server every held message is still being worked on, so only a crash lets
        ack_wait run out (and redelivery then comes within ACK_WAIT, not after a long attempt).
        Also marks long attempts `delivering` in the delivery log."""
        last_keep_alive = trio.current_time()
        while True:
            await trio.sleep(MARK_DELIVERING_AFTER)
            self._mark_long_attempts()
            if trio.current_time() - last_keep_alive >= KEEPALIVE:
                last_keep_alive = trio.current_time()
                self.broker.commit_later(
                    Commit(in_progress=list(self.held.values()), keep_queued=self.consumer)
                )

    def _mark_long_attempts(self) -> None:
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
                    await self._work_on(msg)
                finally:
                    self.held.pop(msg.stream_seq, None)

    async def _work_on(self, msg: InMsg) -> None:
        if self.stopping or self.d.states.disabled(self.endpoint.name):
            self.broker.commit_later(Commit(nak=msg))  # not started: back in line
            return
        try:
            await self.deliver(msg)
        except trio.Cancelled:
            if msg.stream_seq not in self.handed_back:
                self.broker.commit_later(Commit(nak=msg))  # shut down before or between attempts
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
        endpoint = self.endpoint
        ordered = endpoint.config.ordered
        defer = await self.hooks.call_first("hookgate_rate_limit", delivery=delivery, endpoint=endpoint.view)
        if defer and ordered:
            await trio.sleep(float(defer))  # nothing may overtake the head: wait in place
        elif defer:
            self.broker.commit_later(self._schedule(msg, delivery, time.time() + float(defer), counted=False))
            return None
        # Waiting for the limiter or the circuit holds a worker only briefly; a longer wait
        # reschedules the delivery (not counted as an attempt). Ordered endpoints wait in place.
        deferral = await self.flow.admit(max_wait=math.inf if ordered else FLOW_MAX_WAIT)
        if deferral is not None:
            spread = random.uniform(0, 1.0) if deferral.reason == "circuit_open" else 0.0
            self.d.metrics.deferrals.labels(endpoint.name, deferral.reason).inc()
            self.broker.commit_later(
                self._schedule(msg, delivery, time.time() + deferral.delay + spread, counted=False)
            )
            return None
        try:
            started = time.time()
            self.in_flight[delivery.id] = (delivery, trio.current_time(), False)
            with self.d.tracing.attempt(delivery, msg.headers) as span:
                try:
                    event = await self.hooks.chain(
                        "hookgate_transform", "event", delivery.event, endpoint=endpoint.view
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
                self._hand_back_cut_off(msg, delivery, started)
            raise
        finally:
            self.in_flight.pop(delivery.id, None)
        self.flow.record(result.status, result.error_kind)
        if result.status == 410:
            # Gone: the receiver asks us to stop. Disable the endpoint and keep this delivery in
            # line, unspent, for when it is enabled again.
            await self.d.states.set(endpoint.name, True, f"the endpoint answered 410 Gone to {delivery.id}")
            if ordered:
                # Rescheduling would put the head behind everything queued after it: it waits in
                # place instead, and goes first once the endpoint is enabled.
                return delivery if await self._hold_while_disabled(msg) else None
            self.broker.commit_later(self._schedule(msg, delivery, time.time(), counted=False))
            return None
        latency = time.time() - started
        final = endpoint.is_final(result)
        attempt = Attempt(
            delivery_id=delivery.id,
            event_id=delivery.event.id,
            endpoint=endpoint.name,
            attempt=delivery.attempt,
            started_at=started,
            latency=latency,
            outcome="succeeded",
            status=result.status,
            error_kind=result.error_kind,
            error=result.error,
            request_headers=result.request_headers,
            response_headers=result.headers,
            response_body=result.body[:RESPONSE_EXCERPT],
        )
        record_subject = self.broker.topology.delivery_log_subject(endpoint.name, delivery.id)
        retry_in: float | None = None
        if result.ok:
            self.broker.commit_later(Commit([OutMsg(record_subject, _encode_json(attempt))], ack=msg))
            self.d.metrics.deliveries.labels(endpoint.name, "succeeded").inc()
        elif delivery.attempt_in_series < endpoint.max_attempts and not final:
            attempt.outcome = "retrying"
            retry_after = parse_retry_after(result) if result.status in (429, 503) else None
            retry_in = endpoint.retry_delay(delivery.attempt_in_series, retry_after)
            attempt.next_attempt_at = time.time() + retry_in
            log.info(
                "delivery %s to %s failed (attempt %d: %s); next attempt at %s",
                delivery.id,
                endpoint.name,
                delivery.attempt,
                result.error or result.status,
                rfc3339(attempt.next_attempt_at),
                extra=_context(delivery),
            )
            if ordered:
                self.broker.commit_later(Commit([OutMsg(record_subject, _encode_json(attempt))]))
            else:
                commit = self._schedule(msg, delivery, attempt.next_attempt_at, counted=True)
                commit.publishes.append(OutMsg(record_subject, _encode_json(attempt)))
                self.broker.commit_later(commit)
        else:
            attempt.outcome = "failed" if final else "dead"
            log.warning(
                "delivery %s to %s is %s after %s (last: %s)",
                delivery.id,
                endpoint.name,
                attempt.outcome,
                plural(delivery.attempt, "attempt"),
                result.error or result.status,
                extra=_context(delivery),
            )
            self.broker.commit_later(self._dead_letter(msg, delivery, attempt))
            self.d.metrics.deliveries.labels(endpoint.name, attempt.outcome).inc()
            self.d.metrics.dead_letters.labels(endpoint.name).inc()
        await self._track_failures(result, attempt)
        self.d.metrics.attempts.labels(endpoint.name, attempt.outcome).inc()
        self.d.metrics.attempt_latency.labels(endpoint.name).observe(latency)
        try:
            await self.hooks.call("hookgate_delivery_outcome", attempt=attempt)
        except Exception:
            # Observers must not change what happened to the delivery, which is settled already.
            log.exception("a hookgate_delivery_outcome plugin failed for %s", delivery.id)
        if ordered and retry_in is not None:
            # The head of an ordered endpoint holds the line: it retries in place (kept alive by
            # _keep_alive) and everything behind it waits.
            await trio.sleep(retry_in)
            return msgspec.structs.replace(delivery, attempt=delivery.attempt + 1)
        return None

    def _hand_back_cut_off(self, msg: InMsg, delivery: Delivery, started: float) -> None:
        """Shutdown cut this attempt off: record it, and hand the delivery back due now as its next
        attempt. A cut-off does not use up a try of its retry schedule. An ordered head is nak'ed
        instead, to stay first in line, and resumes from this record."""
        now = time.time()
        attempt = Attempt(
            delivery_id=delivery.id,
            event_id=delivery.event.id,
            endpoint=self.endpoint.name,
            attempt=delivery.attempt,
            started_at=started,
            latency=now - started,
            outcome="retrying",
            error_kind="shutdown",
            error=f"cut off when the gateway stopped, after the {format_duration(self.d.grace)} grace period",
            next_attempt_at=now,
        )
        topology = self.broker.topology
        record = OutMsg(topology.delivery_log_subject(self.endpoint.name, delivery.id), _encode_json(attempt))
        if self.endpoint.config.ordered:
            commit = Commit([record], nak=msg)
        else:
            unspent = msgspec.structs.replace(delivery, series_start=delivery.series_start + 1)
            commit = self._schedule(msg, unspent, now, counted=True)
            commit.publishes.append(record)
        self.broker.commit_later(commit)
        self.handed_back.add(msg.stream_seq)

    async def _hold_while_disabled(self, msg: InMsg) -> bool:
        """Hold an ordered head while its endpoint is disabled (kept alive by `_keep_alive`).
        True once enabled again; False if this worker stops first, having handed the head back
        to the consumer, which redelivers it before anything behind it."""
        while self.d.states.disabled(self.endpoint.name):
            if self.stopping:
                self.broker.commit_later(Commit(nak=msg))
                return False
            await trio.sleep(STATE_POLL)
        return True

    async def _track_failures(self, result: Result, attempt: Attempt) -> None:
        """Operational events, and disabling after `disable_after` of continuous failure."""
        states = self.d.states
        name = self.endpoint.name
        if attempt.outcome in ("dead", "failed"):
            states.emit(
                "delivery.exhausted", name, delivery_id=attempt.delivery_id, event_id=attempt.event_id
            )
        if result.ok:
            self.failing_since = None
            return
        now = time.time()
        if self.failing_since is None:
            self.failing_since = now
            states.emit(
                "delivery.failing",
                name,
                delivery_id=attempt.delivery_id,
                event_id=attempt.event_id,
                reason=attempt.error or "",
            )
        elif (
            self.disable_after is not None
            and now - self.failing_since >= self.disable_after
            and not states.disabled(name)
        ):
            await states.set(
                name, True, f"failing continuously since {rfc3339(self.failing_since)} ({attempt.error})"
            )

    async def _attempt(self, delivery: Delivery, event: Event, ts: int, span: Span = NO_SPAN) -> Result:
        endpoint = self.endpoint
        body, content_type = request_body(event)
        request = OutgoingRequest(
            method="POST",
            url=endpoint.config.url or endpoint.config.subject or "",
            headers=request_headers(delivery, event, endpoint, content_type, ts),
            body=body,
            delivery_id=delivery.id,
            event_id=event.id,
            attempt=delivery.attempt,
            timestamp=ts,
        )
        span.inject_request(request)  # signatures cover the body only, so headers may be added
        auth = endpoint.view.auth
        if auth is not None:
            await _maybe_await(auth.apply(request))
        await self.hooks.call("hookgate_sign", request=request, endpoint=endpoint.view)
        if endpoint.transport is None:
            result = await self._publish_to_subject(request)
        else:
            result = await self._post(endpoint.transport, request)
            if result.status == 401 and auth is not None and await _maybe_await(auth.unauthorized()):
                # Credentials went stale (an expired OAuth2 token): refresh once and resend now.
                await _maybe_await(auth.apply(request))
                await self.hooks.call("hookgate_sign", request=request, endpoint=endpoint.view)
                result = await self._post(endpoint.transport, request)
        result.request_headers = redact_headers(request.headers)
        if result.error:
            result.error = redact_text(result.error, request.headers, request.url)
        return result

    def _target(self, url: str) -> Target:
        """`url` parsed and SSRF-checked once; a signing plugin may rewrite it, hence the key."""
        cached = self._parsed
        if cached is None or cached[0] != url:
            cached = self._parsed = (url, self.endpoint.guard.check_url(url))
        return cached[1]

    async def _post(self, transport: PooledTransport, request: OutgoingRequest) -> Result:
        timeout = self.endpoint.timeout
        try:
            target = self._target(request.url)
            # One timeout covers all of it: waiting for a connection, connecting, sending, reading.
            response = await transport.send(
                target, request.headers, request.body, timeout, method=request.method
            )
        except SsrfRefused as exc:
            # Final: retrying cannot make a refused address acceptable.
            return Result(error_kind="ssrf_refused", error=str(exc))
        except httpx.TimeoutException:
            return Result(error_kind="timeout", error=f"no response within {timeout:g}s")
        except httpx.ConnectError as exc:
            kind: ErrorKind = "tls" if "TLS" in str(exc) or "SSL" in str(exc) else "connect"
            return Result(error_kind=kind, error=str(exc) or "connection failed")
        except httpx.HTTPError as exc:
            return Result(error_kind="protocol", error=str(exc) or type(exc).__name__)
        result = Result(
            status=response.status_code,
            headers=response.headers,
            body=response.content[:RESPONSE_EXCERPT],
        )
        if not result.ok:
            result.error_kind = "http_status"
            result.error = f"HTTP {response.status_code}"
        return result

    async def _publish_to_subject(self, request: OutgoingRequest) -> Result:
        headers = {k: v for k, v in request.headers}
        published = await self.broker.publish(OutMsg(request.url, request.body, headers))
        if published.ok:
            return Result(status=200)
        return Result(error_kind="destination", error=published.error)

    def _schedule(self, msg: InMsg, delivery: Delivery, at: float, *, counted: bool) -> Commit:
        """Put the delivery back on the endpoint's subject at `at`; ack the current one once stored."""
        topology = self.broker.topology
        next_delivery = msgspec.structs.replace(delivery, attempt=delivery.attempt + (1 if counted else 0))
        scheduled = OutMsg(
            topology.schedule_subject(self.endpoint.name, delivery.id, next_delivery.attempt),
            _encode(next_delivery),
            {
                "Nats-Schedule": f"@at {rfc3339(math.ceil(at * 1000) / 1000)}",
                "Nats-Schedule-Target": topology.delivery_subject(self.endpoint.name),
                **carried(msg.headers),  # the retry stays in the event's trace
            },
        )
        # If the schedule cannot be stored, the message is left for redelivery after ack_wait.
        return Commit([scheduled], ack=msg, required=1)

    def _dead_letter(self, msg: InMsg, delivery: Delivery, attempt: Attempt) -> Commit:
        record = DeadLetter(delivery=delivery, last_attempt=attempt)
        dead = OutMsg(
            self.broker.topology.dead_subject(self.endpoint.name, delivery.id),
            _encode(record),
            {"Nats-Msg-Id": f"dead:{delivery.id}:{delivery.attempt}"},
        )
        attempt_record = OutMsg(
            self.broker.topology.delivery_log_subject(self.endpoint.name, delivery.id), _encode_json(attempt)
        )
        return Commit([dead, attempt_record], ack=msg, required=1)


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
        extra=_context(delivery),
    )
    return Result(
        error_kind="internal",
        error=f"internal error ({type(exc).__name__}) in the gateway or a plugin; see the gateway's log",
    )


def _context(delivery: Delivery) -> dict[str, Any]:
    """Ids for structured logs (see hookgate.observe.logs)."""
    return {
        "delivery_id": delivery.id,
        "event_id": delivery.event.id,
        "endpoint": delivery.endpoint,
        "attempt": delivery.attempt,
    }


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
