"""Key-value buckets (endpoint states and configs, shared limits): reads, writes with revisions, a
read-modify-write with compare-and-set, and a watch that follows a bucket from trio. Coroutines here
run on the nats loop (see NatsBridge)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import nats.js.errors
import trio
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from hookgate.broker.loop import NatsLoop
from hookgate.broker.messages import KvUpdate
from hookgate.broker.transient import SETUP_ATTEMPTS, SETUP_BUDGET, retrying


def subject(bucket: str, key: str) -> str:
    """The subject a key's values are stored on: the KV protocol's (ADR-8), which nats-py follows."""
    return f"$KV.{bucket}.{key}"


async def ensure(js: JetStreamContext, bucket: str, replicas: int) -> None:
    _handles.pop(js, None)  # a bucket made again gets a fresh handle
    try:
        await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        await js.create_key_value(bucket=bucket, history=1, replicas=replicas)


@dataclass(frozen=True, slots=True)
class Swapped:
    """What `swap` left in a key: its value (None: absent or deleted), its revision, whether this
    call wrote it, and how many compare-and-set tries that took."""

    value: bytes | None
    revision: int
    written: bool
    tries: int


# A change that another writer beat to the key is tried again on the value that won, this often.
SWAP_TRIES = 8

# KeyValue handles by JetStream context and bucket: `js.key_value()` asks the server for the
# bucket's stream info, a round trip that a swap on the hot path must not pay every time.
_handles: weakref.WeakKeyDictionary[JetStreamContext, dict[str, KeyValue]] = weakref.WeakKeyDictionary()


async def _handle(js: JetStreamContext, bucket: str) -> KeyValue:
    by_bucket = _handles.setdefault(js, {})
    handle = by_bucket.get(bucket)
    if handle is None:
        handle = by_bucket[bucket] = await js.key_value(bucket)
    return handle


async def swap(
    js: JetStreamContext, bucket: str, key: str, change: Callable[[bytes | None], bytes | None]
) -> Swapped:
    """Replace a key's value by `change(current)` with compare-and-set, all in one crossing.

    `change` gets the current value (None: no key) and returns the new one, or None to leave the
    key as it is. When another writer stored a value in between, the server refuses the write and
    `change` is called again on the value that won: it runs on the nats loop, so it must be a pure
    function of its argument (and the clock). Each try is two requests: a get and a conditional put.
    """
    kv = await _handle(js, bucket)
    for tries in range(1, SWAP_TRIES + 1):
        try:
            entry = await kv.get(key)
            current, revision = entry.value or b"", entry.revision or 0
        except nats.js.errors.KeyNotFoundError as exc:
            # A deleted key's marker still has a revision, which the next write must name.
            current, revision = None, (exc.entry.revision or 0) if exc.entry is not None else 0
        new = change(current)
        if new is None:
            return Swapped(current, revision, False, tries)
        try:
            stored = await kv.update(key, new, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
        return Swapped(new, int(stored), True, tries)
    raise nats.js.errors.KeyWrongLastSequenceError(description=f"{key}: {SWAP_TRIES} writers in a row won")


async def get_all(js: JetStreamContext, bucket: str) -> dict[str, bytes]:
    """Every key's current value (a small bucket: endpoint states)."""
    kv = await js.key_value(bucket)
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return {}
    out = {}
    for key in keys:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            entry = await kv.get(key)
            out[key] = entry.value or b""
    return out


async def put(js: JetStreamContext, bucket: str, key: str, value: bytes) -> None:
    kv = await js.key_value(bucket)
    await kv.put(key, value)


async def get(js: JetStreamContext, bucket: str, key: str) -> KvUpdate | None:
    """A key's current value and revision; None when it does not exist or was deleted."""
    kv = await js.key_value(bucket)
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    return KvUpdate(key, entry.value or b"", entry.revision or 0)


async def create(js: JetStreamContext, bucket: str, key: str, value: bytes) -> int | None:
    """Store a new key and return its revision; None when the key exists (checked by the server,
    so two replicas creating the same key at once cannot both succeed)."""
    kv = await js.key_value(bucket)
    try:
        return int(await kv.create(key, value))
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


async def update(js: JetStreamContext, bucket: str, key: str, value: bytes, revision: int) -> int | None:
    """Replace a key's value if it is still at `revision`; the new revision, or None if it moved."""
    kv = await js.key_value(bucket)
    try:
        return int(await kv.update(key, value, last=revision))
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


async def delete(js: JetStreamContext, bucket: str, key: str, revision: int | None = None) -> int | None:
    """Delete a key (at `revision`, if given); the revision of the delete marker, or None if
    the key moved on meanwhile."""
    await js.key_value(bucket)  # a missing bucket fails here, as kv.delete() would
    headers = {"KV-Operation": "DEL"}
    if revision is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(revision)
    try:
        # nats-py's kv.delete() hides the marker's revision, which a caller waits for.
        ack = await js.publish(subject(bucket, key), b"", headers=headers)
    except nats.js.errors.APIError as exc:
        if exc.err_code in (10071, 10164):  # wrong last sequence
            return None
        raise
    return int(ack.seq)


@contextlib.asynccontextmanager
async def watch(
    loop: NatsLoop, js: JetStreamContext, bucket: str
) -> AsyncIterator[trio.MemoryReceiveChannel[list[KvUpdate]]]:
    """Follow a bucket from trio: the first batch holds every current value (possibly none),
    then each batch holds the puts and deletes that arrived together, in order.

    The watcher runs on the nats loop, and each batch crosses into trio once. The channel is
    unbounded because updates are rare and small (endpoint configs) and the nats loop must
    never block on trio.
    """
    send, receive = trio.open_memory_channel[list[KvUpdate]](math.inf)

    def hand_over(batch: list[KvUpdate]) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            send.send_nowait(batch)

    def cross(batch: list[KvUpdate]) -> None:
        loop.call_in_trio(hand_over, batch)

    async def watch() -> KeyValue.KeyWatcher:
        kv = await js.key_value(bucket)
        return await kv.watchall()

    async def start() -> tuple[KeyValue.KeyWatcher, asyncio.Task[None]]:
        # At startup on a cluster electing leaders, the watch's consumer may time out a while.
        what = f"watching bucket {bucket}"
        watcher = await retrying(what, watch, attempts=SETUP_ATTEMPTS, budget=SETUP_BUDGET)
        task = asyncio.get_running_loop().create_task(_pump(watcher, cross))
        # However the pump ends, the trio side's iteration ends too (and its owner may watch
        # again), rather than waiting for batches that will never come.
        task.add_done_callback(lambda _: loop.call_in_trio(send.close))
        return watcher, task

    watcher, task = await loop.run(start)
    try:
        async with receive:
            yield receive
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await loop.run(_stop, watcher, task)
        send.close()


async def _pump(watcher: KeyValue.KeyWatcher, cross: Callable[[list[KvUpdate]], None]) -> None:
    """Hand the watcher's entries to `cross` in batches, until the watcher is stopped.

    The watcher's iteration takes what is already queued without yielding to the loop, so a batch
    is sent once the queue ran dry (call_soon): it holds what arrived together.
    """
    initial: list[KvUpdate] | None = []  # None once the current values were handed over
    batch: list[KvUpdate] = []

    def flush() -> None:
        nonlocal batch
        if batch:
            cross(batch)
            batch = []

    async for entry in watcher:  # ends when the watcher is stopped
        if entry is None:  # the end of the current values
            if initial is not None:
                cross(initial)
                initial = None
            continue
        deleted = entry.operation in ("DEL", "PURGE")
        kv_update = KvUpdate(entry.key, None if deleted else (entry.value or b""), entry.revision or 0)
        if initial is not None:
            initial.append(kv_update)
        else:
            if not batch:
                asyncio.get_running_loop().call_soon(flush)
            batch.append(kv_update)


async def _stop(watcher: KeyValue.KeyWatcher, task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(Exception):
        await watcher.stop()
