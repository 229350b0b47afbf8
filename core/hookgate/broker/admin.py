"""Streams and consumers: creating and updating them at startup, deleting, purging, and the
backlog of each. Coroutines here run on the nats loop (see NatsBridge)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.manager import JetStreamManager

from hookgate.broker.messages import BrokerRefused, BrokerUnavailable, ConsumerSpec, StreamSpec
from hookgate.broker.pull import PullConsumer

log = logging.getLogger("hookgate.broker")


# JetStream's own answers that no retry can change: it is off for hookgate's account or server.
_NOT_ENABLED = {10039: "for hookgate's account", 10076: "on the NATS server"}


@contextlib.contextmanager
def jetstream_errors(what: str, violations: Sequence[str]) -> Iterator[None]:
    """Setup failures as BrokerRefused (settings or permissions to fix) or BrokerUnavailable
    (JetStream not ready yet: the gateway tries again). `violations`: the permission violations
    the server reported lately, oldest first, which explain a request nobody answered."""
    try:
        yield
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
        # nats-py reports "no responders" as a 503 without a code. Both come while a node's
        # JetStream starts or a cluster elects its leader, so they pass; only JetStream's own
        # "not enabled" answer is final.
        where = _NOT_ENABLED.get(getattr(exc, "err_code", None) or 0)
        if where is not None:
            raise BrokerRefused(f"{what}: JetStream is not enabled {where}") from None
        raise BrokerUnavailable(
            f"{what}: JetStream is not available yet (if this persists, enable JetStream on the "
            "NATS server and for hookgate's account)"
        ) from None
    except nats.js.errors.APIError as exc:
        if exc.code == 503:  # a 503 of another kind: no JetStream leader yet
            raise BrokerUnavailable(f"{what}: JetStream is not available yet: {exc.description}") from None
        raise BrokerRefused(
            f"{what}: JetStream refused it: {exc.description} (error {exc.err_code})"
        ) from None
    except TimeoutError:
        if violations:
            violation = violations[-1].removeprefix("nats: ")
            raise BrokerRefused(
                f"{what}: the NATS server refused hookgate's user: {violation} (the NATS client "
                "reports it in lower case); grant it the permissions in docs/external-nats.md"
            ) from None
        raise BrokerUnavailable(f"{what}: JetStream did not answer in time") from None


async def ensure_stream(jsm: JetStreamManager, spec: StreamSpec) -> None:
    config = StreamConfig(
        name=spec.name,
        subjects=spec.subjects,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=spec.max_age,
        duplicate_window=spec.duplicate_window,
        num_replicas=spec.replicas,
        allow_msg_schedules=spec.allow_msg_schedules or None,
    )
    try:
        info = await jsm.stream_info(spec.name)
    except nats.js.errors.NotFoundError:
        await jsm.add_stream(config)
        log.info("created stream %s", spec.name)
        return
    # Only a change is sent: on a new cluster an update that meets another replica's create of
    # the same stream goes unanswered (both wait out their timeout), and every restart would
    # otherwise propose a no-op to the cluster.
    if not _holds(info.config, config):
        await jsm.update_stream(config)


_SETTINGS = ("subjects", "retention", "storage", "discard", "max_age", "duplicate_window", "num_replicas")


def _holds(current: StreamConfig, wanted: StreamConfig) -> bool:
    """Whether a stream's current config has every setting hookgate sets as `wanted` has it."""
    if bool(current.allow_msg_schedules) != bool(wanted.allow_msg_schedules):
        return False
    return all(getattr(current, name) == getattr(wanted, name) for name in _SETTINGS)


async def ensure_consumer(nc: Client, jsm: JetStreamManager, spec: ConsumerSpec) -> PullConsumer:
    """Create or update a durable consumer, and start pulling for it."""
    config = ConsumerConfig(
        durable_name=spec.durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.NEW if spec.new_only else DeliverPolicy.ALL,
        ack_wait=spec.ack_wait,
        max_ack_pending=spec.max_ack_pending,
        max_deliver=-1,
        filter_subject=spec.filter_subject,
    )
    # The server treats a create of an existing durable as an update of its settings.
    await jsm.add_consumer(spec.stream, config)
    # A worker that stops releases its pull (see NatsBridge.release_consumer), so a worker started
    # for a changed config always pulls afresh.
    consumer = PullConsumer(nc, spec, buffer=spec.buffer)
    await consumer.start()
    return consumer


async def delete_consumer(jsm: JetStreamManager, stream: str, durable: str) -> bool:
    try:
        return bool(await jsm.delete_consumer(stream, durable))
    except nats.js.errors.NotFoundError:
        return False


async def purge_subject(
    jsm: JetStreamManager, stream: str, subject: str, before_seq: int | None = None
) -> None:
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await jsm.purge_stream(stream, subject=subject, seq=before_seq)


async def subject_counts(jsm: JetStreamManager, stream: str, subjects_filter: str) -> dict[str, int]:
    info = await jsm.stream_info(stream, subjects_filter=subjects_filter)
    return dict(info.state.subjects or {})


async def consumer_filters(jsm: JetStreamManager, stream: str) -> dict[str, str | None]:
    """Every durable consumer of a stream, with its filter subject."""
    out: dict[str, str | None] = {}
    for info in await jsm.consumers_info(stream):
        if info.config.durable_name:
            out[info.config.durable_name] = info.config.filter_subject
    return out


async def streams_present(jsm: JetStreamManager, names: list[str]) -> bool:
    for name in names:
        await asyncio.wait_for(jsm.stream_info(name), 2)
    return True


async def consumer_backlog(jsm: JetStreamManager, stream: str, durable: str) -> int | None:
    """A consumer's backlog read by name, by a process that does not pull for it; None if absent."""
    try:
        info = await jsm.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        return None
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def pending_counts(jsm: JetStreamManager, consumers: list[PullConsumer]) -> dict[str, int]:
    out = {}
    for consumer in consumers:
        try:
            info = await jsm.consumer_info(consumer.spec.stream, consumer.spec.durable)
        except nats.js.errors.NotFoundError:
            continue  # an endpoint deleted through another replica: gone before we stopped
        out[consumer.spec.durable] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    return out
