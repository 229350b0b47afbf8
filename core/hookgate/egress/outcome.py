"""Settling an attempt: its record in the delivery log with the ack, the next attempt or the dead
letter (handed to the broker's batching, not waited for), then metrics, operational events and the
`hookgate_delivery_outcome` plugins."""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from hookgate.broker import Commit, InMsg, OutMsg
from hookgate.egress.context import WorkerContext
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.failures import FailureTracker
from hookgate.egress.retry import dead_letter, parse_retry_after, schedule_next
from hookgate.egress.send import RESPONSE_EXCERPT, Result
from hookgate.plugin_kit.units import format_duration, plural, rfc3339, seconds
from hookgate.types import Attempt, Delivery

# The dispatcher's logger: delivery outcomes have always been logged under it.
log = logging.getLogger("hookgate.dispatcher")

_encode_json = msgspec.json.Encoder().encode


class Outcomes:
    """Settles the attempts of one endpoint's worker."""

    def __init__(self, context: WorkerContext, endpoint: Endpoint):
        self.context = context
        self.broker = context.broker
        self.metrics = context.metrics
        self.endpoint = endpoint
        config = endpoint.config
        disable_after = seconds(config.disable_after) if config.disable_after else None
        self.failures = FailureTracker(context.states, endpoint.name, disable_after)

    async def settle(self, msg: InMsg, delivery: Delivery, result: Result, started: float) -> float | None:
        """Record the attempt and commit what follows from it: the ack, the next attempt, or the
        dead letter. Returns the delay before the next attempt, if there is one."""
        endpoint = self.endpoint
        latency = time.time() - started
        final = endpoint.is_final(result)
        attempt = _attempt_record(endpoint, delivery, result, started, latency)
        retry_in: float | None = None
        if result.ok:
            self.broker.commit_later(Commit([self.record(attempt)], ack=msg))
            self.metrics.deliveries.labels(endpoint.name, "succeeded").inc()
        elif delivery.attempt_in_series < endpoint.max_attempts and not final:
            retry_in = self._retry_later(msg, delivery, result, attempt)
        else:
            self._give_up(msg, delivery, result, attempt, final)
        await self._observe(delivery, result, attempt, latency)
        return retry_in

    def _retry_later(self, msg: InMsg, delivery: Delivery, result: Result, attempt: Attempt) -> float:
        """Schedule the next attempt (an ordered head only records it: it retries in place).
        Returns the delay before it."""
        endpoint = self.endpoint
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
            extra=log_context(delivery),
        )
        if endpoint.config.ordered:
            self.broker.commit_later(Commit([self.record(attempt)]))
        else:
            commit = self.schedule(msg, delivery, attempt.next_attempt_at, counted=True)
            commit.publishes.append(self.record(attempt))
            self.broker.commit_later(commit)
        return retry_in

    def _give_up(self, msg: InMsg, delivery: Delivery, result: Result, attempt: Attempt, final: bool) -> None:
        """No attempt follows: the delivery is dead-lettered, `failed` if retrying could not help."""
        endpoint = self.endpoint
        attempt.outcome = "failed" if final else "dead"
        log.warning(
            "delivery %s to %s is %s after %s (last: %s)",
            delivery.id,
            endpoint.name,
            attempt.outcome,
            plural(delivery.attempt, "attempt"),
            result.error or result.status,
            extra=log_context(delivery),
        )
        self.broker.commit_later(dead_letter(self.broker.topology, endpoint.name, msg, delivery, attempt))
        self.metrics.deliveries.labels(endpoint.name, attempt.outcome).inc()
        self.metrics.dead_letters.labels(endpoint.name).inc()

    async def _observe(self, delivery: Delivery, result: Result, attempt: Attempt, latency: float) -> None:
        """After the outcome is settled: operational events, metrics and the outcome plugins."""
        await self.failures.track(result, attempt)
        self.metrics.attempts.labels(self.endpoint.name, attempt.outcome).inc()
        self.metrics.attempt_latency.labels(self.endpoint.name).observe(latency)
        try:
            await self.context.hooks.call("hookgate_delivery_outcome", attempt=attempt)
        except Exception:
            # Observers must not change what happened to the delivery, which is settled already.
            log.exception("a hookgate_delivery_outcome plugin failed for %s", delivery.id)

    def cut_off(self, msg: InMsg, delivery: Delivery, started: float) -> None:
        """Shutdown cut this attempt off: record it, and hand the delivery back due now as its next
        attempt. A cut-off does not use up a try of its retry schedule. An ordered head is nak'ed
        instead, to stay first in line, and resumes from this record."""
        now = time.time()
        grace = format_duration(self.context.grace)
        attempt = Attempt(
            delivery_id=delivery.id,
            event_id=delivery.event.id,
            endpoint=self.endpoint.name,
            attempt=delivery.attempt,
            started_at=started,
            latency=now - started,
            outcome="retrying",
            error_kind="shutdown",
            error=f"cut off when the gateway stopped, after the {grace} grace period",
            next_attempt_at=now,
        )
        record = self.record(attempt)
        if self.endpoint.config.ordered:
            commit = Commit([record], nak=msg)
        else:
            unspent = msgspec.structs.replace(delivery, series_start=delivery.series_start + 1)
            commit = self.schedule(msg, unspent, now, counted=True)
            commit.publishes.append(record)
        self.broker.commit_later(commit)

    def record(self, attempt: Attempt) -> OutMsg:
        """The attempt as the latest record of its delivery in the delivery log."""
        subject = self.broker.topology.delivery_log_subject(self.endpoint.name, attempt.delivery_id)
        return OutMsg(subject, _encode_json(attempt))

    def schedule(self, msg: InMsg, delivery: Delivery, at: float, *, counted: bool) -> Commit:
        """Put the delivery back on the endpoint's subject at `at`; ack the current one once stored."""
        return schedule_next(self.broker.topology, self.endpoint.name, msg, delivery, at, counted=counted)


def _attempt_record(
    endpoint: Endpoint, delivery: Delivery, result: Result, started: float, latency: float
) -> Attempt:
    """The attempt as the delivery log keeps it, `succeeded` until its outcome says otherwise."""
    return Attempt(
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


def log_context(delivery: Delivery) -> dict[str, Any]:
    """Ids for structured logs (see hookgate.observe.logs)."""
    return {
        "delivery_id": delivery.id,
        "event_id": delivery.event.id,
        "endpoint": delivery.endpoint,
        "attempt": delivery.attempt,
    }
