"""Following a KV bucket from trio with one watch for the whole process, watched again after a failure."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from hookgate.broker import Broker, KvUpdate

WATCH_RETRY_MAX = 5.0  # the longest wait before watching a bucket again after the watch failed

# apply(batch, snapshot): a snapshot holds every current value and replaces what was known (a watch
# started again may have missed deletes); other batches hold the changes that arrived together.
Apply = Callable[[list[KvUpdate], bool], None]


async def follow_bucket(
    broker: Broker,
    bucket: str,
    apply: Apply,
    log: logging.Logger,
    what: str,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hand every batch of `bucket`'s watch to `apply`, for ever; started once the current values
    were applied. A failing watch is started again (the last values known stay in force meanwhile);
    before the start, its failure is raised."""
    started = False
    backoff = 0.5
    while True:
        try:
            async with broker.watch_kv(bucket) as batches:
                snapshot = True
                async for batch in batches:
                    apply(batch, snapshot)
                    snapshot = False
                    backoff = 0.5
                    if not started:
                        started = True
                        task_status.started()
        except Exception as exc:
            if not started:
                raise
            log.warning("watching %s failed: %s; again in %.1fs", what, exc, backoff)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, WATCH_RETRY_MAX)


async def cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
