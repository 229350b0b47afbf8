"""Pull consumers at a trickle: few pull requests, and an expired request renewed at once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator

import nats
import pytest
import trio
import trio.testing

from hookgate import config as config_mod
from hookgate.broker import Broker, Commit, ConsumerSpec, OutMsg
from hookgate.broker.pull import PullConsumer
from hookgate.plugin_host.hooks import Hooks
from tests.support import NatsServer, base_config

SOURCE = "pulltest"


@contextlib.asynccontextmanager
async def _counting(url: str, subject: str) -> AsyncIterator[list[int]]:
    """Count the messages published on `subject`, seen by a client of its own."""
    count = [0]
    ready, stop = threading.Event(), threading.Event()

    async def listen() -> None:
        nc = await nats.connect(url)

        async def seen(_: object) -> None:
            count[0] += 1

        await nc.subscribe(subject, cb=seen)
        await nc.flush()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await nc.flush()
        await nc.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(trio.to_thread.run_sync, lambda: asyncio.run(listen())))
        assert await trio.to_thread.run_sync(ready.wait, 10)
        try:
            yield count
        finally:
            stop.set()


@contextlib.asynccontextmanager
async def _broker(url: str) -> AsyncIterator[Broker]:
    loaded = config_mod.loads(base_config(url), Hooks(()).registry)
    async with Broker.connect(loaded.config.broker, url) as broker:
        yield broker


def _spec(broker: Broker, buffer: int) -> ConsumerSpec:
    t = broker.topology
    return ConsumerSpec(t.events_stream, "pull-test", t.event_subject(SOURCE), 30.0, 1000, buffer=buffer)


async def test_a_trickle_costs_a_pull_request_per_half_buffer_not_per_message(
    nats_server: NatsServer,
) -> None:
    buffer, n = 16, 48
    async with _broker(nats_server.url) as broker:
        (consumer,) = await broker.consumers([_spec(broker, buffer)])
        api = f"$JS.API.CONSUMER.MSG.NEXT.{consumer.spec.stream}.{consumer.spec.durable}"
        async with _counting(nats_server.url, api) as requests:
            for i in range(n):
                assert (await broker.publish(OutMsg(broker.topology.event_subject(SOURCE), b"%d" % i))).ok
                (msg,) = await broker.fetch(consumer, 10, 5.0)
                assert msg.data == b"%d" % i
                await broker.commit(Commit(ack=msg))
        await broker.release_consumer(consumer)
    # The first request, then one each time half the buffer has been taken: 1 + 48 / 8 = 7.
    assert requests[0] <= 1 + n // (buffer // 2) + 1, requests[0]


async def test_an_expired_pull_request_is_renewed_at_once(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message stored after the pull request expired arrives at once, not at the end of the
    fetch's wait."""
    monkeypatch.setattr(PullConsumer, "PULL_EXPIRES", 1.0)
    async with _broker(nats_server.url) as broker:
        (consumer,) = await broker.consumers([_spec(broker, 8)])
        assert await broker.fetch(consumer, 1, 0.2) == []  # pulls, and finds nothing
        await trio.sleep(2.0)  # the request expires after 1 s: this is the case under test
        got = []
        async with trio.open_nursery() as nursery:

            async def fetch() -> None:
                got.extend(await broker.fetch(consumer, 1, 20.0))

            nursery.start_soon(fetch)
            await trio.testing.wait_all_tasks_blocked()
            started = trio.current_time()
            assert (await broker.publish(OutMsg(broker.topology.event_subject(SOURCE), b"late"))).ok
        waited = trio.current_time() - started
        await broker.commit(Commit(ack=got[0]))
        await broker.release_consumer(consumer)
    assert [m.data for m in got] == [b"late"]
    assert waited < 3.0, waited
