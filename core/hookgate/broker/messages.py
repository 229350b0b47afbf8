"""The broker-neutral types that cross between trio and the nats loop: what is published, what is
delivered or read back, what a KV bucket reports, the specs of streams and consumers, and the
errors. Nothing here talks to NATS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

if TYPE_CHECKING:
    from hookgate.broker.pull import PullConsumer

# How long a PubAck that came too late is still listened for (see Commit.late).
LATE_WINDOW = 600.0


class BrokerUnavailable(Exception):
    """The broker could not be reached or did not answer in time."""


class BrokerRefused(BrokerUnavailable):
    """The broker answered and refused us: credentials, TLS, permissions, its version. Retrying the
    same settings cannot help, so the gateway stops with this message instead."""


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    max_age: float  # seconds
    duplicate_window: float = 120.0
    replicas: int = 1
    allow_msg_schedules: bool = False


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str | None
    ack_wait: float
    max_ack_pending: int
    buffer: int = 64  # messages pulled ahead of the caller
    new_only: bool = False  # starts with what is stored after its creation, not with all there is


@dataclass(frozen=True)
class OutMsg:
    subject: str
    data: bytes
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class PubResult:
    seq: int | None = None
    duplicate: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class KvUpdate:
    """One change in a KV bucket: a key's new value, or None once it was deleted or purged."""

    key: str
    value: bytes | None
    revision: int


@dataclass
class InMsg:
    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int
    num_delivered: int
    timestamp: float  # unix seconds when the stream stored it
    raw: Msg = field(repr=False)


@dataclass(frozen=True)
class StoredMsg:
    """A message read back from a stream (the delivery log), not consumed."""

    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int
    timestamp: float  # unix seconds when the stream stored it


@dataclass
class Commit:
    """Messages to publish and a message to settle once they are stored.

    `ack` is acked when the first `required` publishes succeeded; otherwise it is nak'ed after
    `nak_delay` seconds (0: at once), or left for redelivery after ack_wait when that is None.
    """

    publishes: list[OutMsg] = field(default_factory=list)
    ack: InMsg | None = None
    required: int = 0
    nak_delay: float | None = None
    nak: InMsg | None = None  # nak'ed unconditionally: redelivered after `nak_delay`, or at once
    # Still being worked on: restart their ack_wait timers (with every message still queued in
    # `keep_queued`'s pull buffer), so a crash is noticed after ack_wait, not after the longest job.
    in_progress: list[InMsg] = field(default_factory=list)
    keep_queued: PullConsumer | None = None
    # Told of a publish whose PubAck arrives after the wait for it timed out (within LATE_WINDOW):
    # the message may be stored after all. Called on the nats thread, so it must be quick and
    # thread-safe (a metric's inc).
    late: Callable[[PubResult], None] | None = None
    abandoned: bool = False  # the caller stopped waiting: results that come are late (see Broker)
