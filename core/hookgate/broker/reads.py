"""Reading streams back without consuming them (the delivery log): scans in bulk, the last message
per subject, one message by sequence. Coroutines here run on the nats loop (see NatsBridge)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.manager import JetStreamManager

from hookgate.broker.messages import StoredMsg


async def scan(
    js: JetStreamContext,
    stream: str,
    subjects: list[str],
    *,
    start_seq: int = 0,
    start_time: float | None = None,
    limit: int = 256,
) -> tuple[list[StoredMsg], bool]:
    """Up to `limit` stored messages on `subjects` from `start_seq` (or `start_time`) on, in
    stream order, and whether more follow. An ephemeral consumer without acks reads them in
    bulk; it is deleted at once (and expires by itself if we crash)."""
    info = await js.add_consumer(stream, _reader(subjects, start_seq, start_time))
    name = info.name
    try:
        pending = int(info.num_pending or 0)
        want = min(limit, pending)
        if want == 0:
            return [], False
        sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
        try:
            out: list[StoredMsg] = []
            while len(out) < want:
                msgs = await sub.fetch(min(want - len(out), 256), timeout=5)
                out.extend(_stored(m) for m in msgs)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out, pending > want
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)


def _reader(subjects: list[str], start_seq: int, start_time: float | None) -> ConsumerConfig:
    """An ephemeral consumer's settings: no acks, in memory, gone 30 s after its last use."""
    extra: dict[str, Any] = {}
    if start_seq > 0:
        policy, extra["opt_start_seq"] = DeliverPolicy.BY_START_SEQUENCE, start_seq
    elif start_time is not None:
        policy = DeliverPolicy.BY_START_TIME
        extra["opt_start_time"] = datetime.fromtimestamp(start_time, UTC)
    else:
        policy = DeliverPolicy.ALL
    return ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=policy,
        filter_subjects=subjects if len(subjects) > 1 else None,
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
        **extra,
    )


async def last_msgs(jsm: JetStreamManager, stream: str, subjects: list[str]) -> dict[str, StoredMsg]:
    """The last message stored on each subject (absent when there is none), read concurrently."""

    async def one(subject: str) -> tuple[str, StoredMsg | None]:
        try:
            raw = await jsm.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return subject, None
        return subject, _raw_stored(raw)

    found = await asyncio.gather(*(one(s) for s in subjects))
    return {s: m for s, m in found if m is not None}


async def get_msg(jsm: JetStreamManager, stream: str, seq: int) -> StoredMsg | None:
    try:
        return _raw_stored(await jsm.get_msg(stream, seq))
    except nats.js.errors.NotFoundError:
        return None


def _stored(msg: Msg) -> StoredMsg:
    meta = msg.metadata
    return StoredMsg(
        subject=msg.subject,
        data=msg.data,
        headers=dict(msg.headers or {}),
        seq=meta.sequence.stream,
        timestamp=meta.timestamp.timestamp(),
    )


def _raw_stored(raw: RawStreamMsg) -> StoredMsg:
    return StoredMsg(
        subject=raw.subject or "",
        data=raw.data or b"",
        headers=dict(raw.headers or {}),
        seq=int(raw.seq or 0),
        timestamp=raw.time.timestamp() if raw.time is not None else 0.0,
    )
