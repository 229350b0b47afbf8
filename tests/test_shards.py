"""Endpoints on shared shard consumers: the consumer count stays bounded, each endpoint keeps its
own lane, and deliveries left by an earlier config or release are moved, not stranded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import pytest
import trio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from hookgate.api import endpoints as endpoints_api
from hookgate.broker import Topology
from hookgate.config import ConfigError, checks, loads
from hookgate.egress import lanes
from hookgate.egress.dispatcher import SHARD_MAX_ACK_PENDING
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import Delivery, Event
from tests.support import NatsServer, Received, base_config, receiver, run_gateway

T = TypeVar("T")
TOPOLOGY = Topology()
STREAM = TOPOLOGY.deliveries_stream


async def _with_js(url: str, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(jsm)` with a plain nats-py client, as an operator's tool would."""

    async def go() -> T:
        nc = await nats.connect(url)
        try:
            return await work(nc)
        finally:
            await nc.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(go()))


async def _consumers(url: str) -> dict[str, int]:
    async def go(nc: Any) -> dict[str, int]:
        return {c.name: c.config.max_ack_pending for c in await nc.jsm().consumers_info(STREAM)}

    return await _with_js(url, go)


def _delivery(endpoint: str, n: int) -> bytes:
    body = b'{"n":%d}' % n
    event = Event(id=f"ev-{endpoint}-{n}", source="internal", type="t", received_at=time.time(), body=body)
    return msgspec.msgpack.encode(
        Delivery(id=f"dl-{endpoint}-{n}", endpoint=endpoint, attempt=1, event=event, created_at=time.time())
    )


async def _publish(url: str, subject: str, payloads: list[bytes]) -> None:
    async def go(nc: Any) -> None:
        js = nc.jetstream()
        for data in payloads:
            await js.publish(subject, data)

    await _with_js(url, go)


def _same_shard_names(count: int) -> list[str]:
    names = [f"ep{i}" for i in range(200)]
    shard = TOPOLOGY.shard_of(names[0])
    return [n for n in names if TOPOLOGY.shard_of(n) == shard][:count]


async def test_twelve_hundred_endpoints_share_the_shard_consumers_and_each_gets_its_events(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # Past the 1,000 consumers a stream may have: one consumer per endpoint could not serve them.
    count = 1200
    async with receiver() as rx:
        endpoints = "".join(f"  e{i}: {{url: {rx.url}/e{i}, signing: null}}\n" for i in range(count))
        names = ", ".join(f"e{i}" for i in range(count))
        text = base_config(
            nats_server.url, f"endpoints:\n{endpoints}routes:\n  - {{from: [internal], to: [{names}]}}\n"
        )
        async with run_gateway(tmp_path, text) as gw:
            assert (await gw.publish("fan.out", {"n": 1})).status_code == 202
            got = await rx.wait_for(count, timeout=60)
            consumers = await _consumers(nats_server.url)
    assert sorted(r.path for r in got) == sorted(f"/e{i}" for i in range(count))
    shards = {f"shard-{k}" for k in range(TOPOLOGY.shards)}
    assert set(consumers) == shards
    assert {consumers[s] for s in shards} == {SHARD_MAX_ACK_PENDING}


async def test_an_endpoint_with_a_full_lane_defers_without_holding_up_its_shard(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: Any
) -> None:
    monkeypatch.setattr(lanes, "OVERFLOW_DELAY", 0.2)
    slow, fast = _same_shard_names(2)
    events = 80  # the slow endpoint's lane holds 64 (concurrency 1)

    def respond(request: Received, n: int) -> float | int:
        return 0.05 if request.path == "/slow" else 200

    async with receiver(respond) as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              {slow}: {{url: "{rx.url}/slow", concurrency: 1, signing: null}}
              {fast}: {{url: "{rx.url}/fast", signing: null}}
            routes:
              - {{from: [internal], types: [slow], to: [{slow}]}}
              - {{from: [internal], types: [fast], to: [{fast}]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            async with trio.open_nursery() as nursery:
                for n in range(events):
                    nursery.start_soon(gw.publish, "slow", {"n": n})
            await gw.publish("fast", {"n": 0})
            (quick,) = await rx.wait_for(1, predicate=lambda r: r.path == "/fast")
            slow_done = [r for r in rx.requests if r.path == "/slow"]
            got = await rx.wait_for(events, timeout=30, predicate=lambda r: r.path == "/slow")
            metrics = (await gw.http.get(f"{gw.url}/metrics")).text
    # The fast endpoint did not wait behind the slow one's backlog.
    assert len(slow_done) < events
    assert sorted(r.json()["data"]["n"] for r in got) == list(range(events))
    # A deferral for a full lane does not use up an attempt.
    assert {r.headers["hookgate-attempt"] for r in got} == {"1"}
    assert f'hookgate_delivery_deferrals_total{{endpoint="{slow}",reason="lane_full"}}' in metrics
    assert quick.path == "/fast"


async def test_an_endpoint_no_longer_ordered_gets_what_waited_in_its_ordered_line(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    def config(url: str, ordered: bool) -> str:
        return base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{url}/in", ordered: {str(ordered).lower()}, signing: null}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )

    # Ordered, with nothing listening: the head retries in place and the rest wait behind it.
    async with run_gateway(tmp_path, config("http://127.0.0.1:9", True)) as gw:
        for n in range(3):
            await gw.publish("work", {"n": n})
        with trio.fail_after(10):
            while "ordered-svc" not in await _consumers(nats_server.url):
                await trio.sleep(0.05)
    async with receiver() as rx, run_gateway(tmp_path, config(rx.url, False)):
        got = await rx.wait_for(3, timeout=20)
        with trio.fail_after(10):
            while "ordered-svc" in await _consumers(nats_server.url):
                await trio.sleep(0.1)
    assert sorted(r.json()["data"]["n"] for r in got) == [0, 1, 2]


async def test_deliveries_of_the_per_endpoint_layout_are_moved_and_delivered(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # What a release before the shards left: deliveries on hookgate.deliveries.<endpoint>, read by
    # a consumer endpoint-<endpoint>, one of them already delivered (acked).
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in", signing: null}}
            """,
        )
        async with run_gateway(tmp_path, text):
            pass  # creates the streams

        async def legacy(nc: Any) -> None:
            js = nc.jetstream()
            for n in range(4):
                await js.publish("hookgate.deliveries.svc", _delivery("svc", n))
            await nc.jsm().add_consumer(
                STREAM,
                ConsumerConfig(
                    durable_name="endpoint-svc",
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    filter_subject="hookgate.deliveries.svc",
                ),
            )
            sub = await js.pull_subscribe_bind("endpoint-svc", STREAM)
            (first,) = await sub.fetch(1)
            await first.ack_sync()

        await _with_js(nats_server.url, legacy)
        async with run_gateway(tmp_path, text):
            got = await rx.wait_for(3, timeout=20)
            # A retry the older release scheduled fires onto the old subject later.
            await _publish(nats_server.url, "hookgate.deliveries.svc", [_delivery("svc", 9)])
            late = await rx.wait_for(4, timeout=20)
            with trio.fail_after(10):
                while "endpoint-svc" in await _consumers(nats_server.url):
                    await trio.sleep(0.1)
    assert sorted(r.json()["data"]["n"] for r in got[:3]) == [1, 2, 3]
    assert late[3].json()["data"]["n"] == 9


async def test_a_delivery_for_an_endpoint_created_a_moment_later_waits_for_it(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx, run_gateway(tmp_path, base_config(nats_server.url)) as gw:
        await _publish(nats_server.url, TOPOLOGY.delivery_subject("late"), [_delivery("late", 1)])
        with trio.fail_after(10):  # offered to a lane, no endpoint found, and offered again
            while not await _with_js(nats_server.url, _redelivered("late")):
                await trio.sleep(0.05)
        created = await gw.http.post(
            f"{gw.url}/api/v1/endpoints",
            json={"name": "late", "url": f"{rx.url}/in", "signing": None},
            headers={"Authorization": "Bearer test-token"},
        )
        (got,) = await rx.wait_for(1, timeout=10)
    assert created.status_code == 201
    assert got.json()["data"]["n"] == 1


def _redelivered(endpoint: str) -> Callable[[Any], Awaitable[int]]:
    async def go(nc: Any) -> int:
        info = await nc.jsm().consumer_info(STREAM, TOPOLOGY.shard_consumer(TOPOLOGY.shard_of(endpoint)))
        return int(info.num_redelivered)

    return go


async def test_a_delivery_for_an_endpoint_that_never_comes_is_dropped_after_its_retries(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: Any, caplog: Any
) -> None:
    monkeypatch.setattr(lanes, "UNKNOWN_RETRY_DELAY", 0.1)
    monkeypatch.setattr(lanes, "UNKNOWN_GIVE_UP", 3)
    async with run_gateway(tmp_path, base_config(nats_server.url)):
        await _publish(nats_server.url, TOPOLOGY.delivery_subject("gone"), [_delivery("gone", 1)])
        with trio.fail_after(10):
            while "no such endpoint" not in caplog.text:
                await trio.sleep(0.05)

        async def pending(nc: Any) -> int:
            info = await nc.jsm().consumer_info(STREAM, TOPOLOGY.shard_consumer(TOPOLOGY.shard_of("gone")))
            return int(info.num_pending + info.num_ack_pending)

        with trio.fail_after(10):
            while await _with_js(nats_server.url, pending):
                await trio.sleep(0.05)


def test_more_ordered_endpoints_than_a_stream_has_consumers_for_are_refused_by_the_check(
    monkeypatch: Any,
) -> None:
    # Each ordered endpoint has a consumer of its own; every other endpoint shares the shards.
    monkeypatch.setattr(checks, "MAX_ORDERED_ENDPOINTS", 2)
    text = "endpoints:\n" + "".join(
        f"  o{i}: {{url: 'http://127.0.0.1:9/', ordered: true}}\n" for i in range(3)
    )
    registry = Hooks(load_entry_points=False).registry
    with pytest.raises(ConfigError) as info:
        loads(text, registry, file="hookgate.yaml", env={})
    assert [str(p) for p in info.value.problems] == [
        "hookgate.yaml:1: $.endpoints: 3 endpoints have ordered: true, and at most 2 may: each has a "
        "JetStream consumer of its own, and a stream allows 1,000"
    ]
    many = "endpoints:\n" + "".join(f"  e{i}: {{url: 'http://127.0.0.1:9/'}}\n" for i in range(3))
    assert len(loads(many, registry, file="hookgate.yaml", env={}).config.endpoints) == 3


async def test_the_api_refuses_an_ordered_endpoint_past_the_limit(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: Any
) -> None:
    monkeypatch.setattr(endpoints_api, "MAX_ORDERED_ENDPOINTS", 1)
    auth = {"Authorization": "Bearer test-token"}
    async with run_gateway(tmp_path, base_config(nats_server.url)) as gw:
        url = f"{gw.url}/api/v1/endpoints"
        first = await gw.http.post(
            url, json={"name": "a", "url": "http://127.0.0.1:9/", "ordered": True}, headers=auth
        )
        second = await gw.http.post(
            url, json={"name": "b", "url": "http://127.0.0.1:9/", "ordered": True}, headers=auth
        )
        unordered = await gw.http.post(url, json={"name": "c", "url": "http://127.0.0.1:9/"}, headers=auth)
        made_ordered = await gw.http.patch(f"{url}/c", json={"ordered": True}, headers=auth)
        still_ordered = await gw.http.patch(f"{url}/a", json={"concurrency": 3}, headers=auth)
    assert (first.status_code, unordered.status_code, still_ordered.status_code) == (201, 201, 200)
    for refused in (second, made_ordered):
        assert refused.status_code == 422
        assert refused.json()["error"] == "invalid_endpoint"
        assert refused.json()["message"].startswith(
            "$.ordered: 2 endpoints have ordered: true, and at most 1 may"
        )
