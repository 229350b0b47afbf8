"""Delivery: retries on schedule, dead letters, isolation between endpoints, recovery after failures."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest
import trio

from hookgate.broker.records import DeadLetter
from hookgate.egress.request import request_body
from hookgate.plugin_kit.units import rfc3339
from hookgate.types import Event
from tests.support import (
    NatsServer,
    Received,
    attempt_records,
    base_config,
    receiver,
    run_gateway,
    stream_messages,
)


def endpoint_config(nats_url: str, endpoints: str, routes: str) -> str:
    return base_config(nats_url, f"endpoints:\n{endpoints}\nroutes:\n{routes}")


async def test_receiver_failing_twice_gets_attempt_3_with_the_same_webhook_id(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver(lambda request, n: 500 if n < 2 else 200) as rx:
        text = endpoint_config(
            nats_server.url,
            f"""
  flaky:
    url: {rx.url}/in
    retry: {{schedule: [200ms, 200ms, 200ms], jitter: 0}}
""",
            "  - {from: [internal], to: [flaky]}",
        )
        async with run_gateway(tmp_path, text) as gw:
            published = await gw.publish("order.created", {"n": 1})
            requests = await rx.wait_for(3)
            attempts = await _attempt_records(nats_server.url, 3)
    assert published.status_code == 202
    event_id = published.json()["id"]
    assert [r.headers["hookgate-attempt"] for r in requests] == ["1", "2", "3"]
    assert {r.headers["webhook-id"] for r in requests} == {event_id}
    assert len({r.headers["hookgate-delivery-id"] for r in requests}) == 1
    # The retries waited for the schedule: at least ~200ms between attempts.
    assert requests[1].at - requests[0].at >= 0.15
    assert [a["outcome"] for a in attempts] == ["retrying", "retrying", "succeeded"]
    assert [a["status"] for a in attempts] == [500, 500, 200]


async def test_always_failing_receiver_ends_dead_lettered_after_configured_attempts(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver(lambda request, n: 503) as rx:
        text = endpoint_config(
            nats_server.url,
            f"""
  broken:
    url: {rx.url}/in
    retry: {{schedule: [100ms, 100ms], jitter: 0}}
""",
            "  - {from: [internal], to: [broken]}",
        )
        async with run_gateway(tmp_path, text) as gw:
            published = await gw.publish("order.created", {"n": 1})
            await rx.wait_for(3)
            dead = await _wait_for_stream(nats_server.url, "HOOKGATE_DEAD", 1)
            # No fourth attempt follows the last one.
            with trio.move_on_after(0.5):
                await rx.wait_for(4)
    assert len(rx.requests) == 3
    letter = msgspec.msgpack.decode(dead[0].data, type=DeadLetter)
    assert letter.delivery.event.id == published.json()["id"]
    assert letter.delivery.endpoint == "broken"
    assert letter.last_attempt.attempt == 3
    assert letter.last_attempt.status == 503
    assert letter.last_attempt.outcome == "dead"


async def test_hanging_endpoint_does_not_delay_another_endpoint(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver(lambda request, n: 5.0) as slow, receiver() as fast:
        text = endpoint_config(
            nats_server.url,
            f"""
  slow:
    url: {slow.url}/in
    timeout: 3s
    concurrency: 2
  fast:
    url: {fast.url}/in
""",
            "  - {from: [internal], to: [slow, fast]}",
        )
        async with run_gateway(tmp_path, text) as gw:
            for n in range(5):
                await gw.publish("tick", {"n": n})
            start = trio.current_time()
            got = await fast.wait_for(5, timeout=10)
            elapsed = trio.current_time() - start
            # The slow endpoint is hanging (it received requests and has not answered).
            assert slow.requests
    assert sorted(r.json()["data"]["n"] for r in got) == [0, 1, 2, 3, 4]
    assert elapsed < 2.0, f"fast endpoint took {elapsed:.2f}s while another endpoint hung"


async def test_new_event_is_delivered_promptly_while_many_wait_in_a_long_retry(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # More failing deliveries than the consumer's max_ack_pending (64): if waiting retries held
    # ack-pending slots, the fresh event below could not be fetched for an hour.
    failing = 80
    healthy = trio.Event()

    def respond(request: Received, n: int) -> int:
        return 200 if healthy.is_set() else 500

    async with receiver(respond) as rx:
        text = endpoint_config(
            nats_server.url,
            f"""
  recovering:
    url: {rx.url}/in
    concurrency: 8
    retry: {{schedule: [1h]}}
""",
            "  - {from: [internal], to: [recovering]}",
        )
        async with run_gateway(tmp_path, text) as gw:
            for n in range(failing):
                await gw.publish("order.created", {"n": n})
            await rx.wait_for(failing, timeout=20)
            await _attempt_records(nats_server.url, failing)
            healthy.set()
            fresh = await gw.publish("order.created", {"n": "fresh"})
            start = trio.current_time()
            (got,) = await rx.wait_for(1, timeout=10, predicate=lambda r: r.json()["data"]["n"] == "fresh")
            elapsed = trio.current_time() - start
    assert got.headers["webhook-id"] == fresh.json()["id"]
    assert elapsed < 5.0


async def test_subject_endpoint_publishes_to_a_nats_subject(tmp_path: Path, nats_server: NatsServer) -> None:
    import asyncio

    import nats

    async def make_stream() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(name="ORDERS", subjects=["orders.>"])
        await nc.close()

    await trio.to_thread.run_sync(lambda: asyncio.run(make_stream()))
    text = endpoint_config(
        nats_server.url,
        """
  orders:
    subject: orders.incoming
""",
        "  - {from: [internal], to: [orders]}",
    )
    async with run_gateway(tmp_path, text) as gw:
        published = await gw.publish("order.created", {"n": 7})
        (msg,) = await _wait_for_stream(nats_server.url, "ORDERS", 1)
    assert msg.subject == "orders.incoming"
    assert msg.headers["webhook-id"] == published.json()["id"]
    assert msgspec.json.decode(msg.data)["data"] == {"n": 7}


def test_internal_event_body_follows_standard_webhooks() -> None:
    event = Event(id="evt_1", source="internal", type="a.b", received_at=0.0, body=b'{"x":1}')
    body, content_type = request_body(event)
    assert msgspec.json.decode(body) == {
        "type": "a.b",
        "timestamp": "1970-01-01T00:00:00.000Z",
        "data": {"x": 1},
    }
    assert content_type == "application/json"
    assert rfc3339(1.5) == "1970-01-01T00:00:01.500Z"


async def _wait_for_stream(nats_url: str, stream: str, count: int, timeout: float = 10.0) -> list:
    with trio.fail_after(timeout):
        while True:
            msgs = await stream_messages(nats_url, stream)
            if len(msgs) >= count:
                return msgs
            await trio.sleep(0.05)


async def _attempt_records(nats_url: str, count: int) -> list[dict]:
    msgs = await _wait_for_stream(nats_url, "HOOKGATE_LOG", 0)
    with trio.fail_after(10):
        while True:
            msgs = await attempt_records(nats_url)
            if len(msgs) >= count:
                return [msgspec.json.decode(m.data) for m in msgs]
            await trio.sleep(0.05)


def test_exponential_policy_and_retry_after_bounds() -> None:
    from hookgate.config import EndpointConfig, ExponentialRetry, RetryConfig
    from hookgate.egress.endpoint import Endpoint
    from hookgate.egress.retry import parse_retry_after
    from hookgate.egress.send import Result

    retry = RetryConfig(exponential=ExponentialRetry(base="1s", factor=3, max="20s", attempts=5), jitter=0)
    endpoint = Endpoint.build("x", EndpointConfig(url="http://x.test/", retry=retry))
    assert endpoint.schedule == [1, 3, 9, 20]
    assert endpoint.max_attempts == 5
    # Retry-After lengthens a delay but never past the policy's longest delay.
    assert endpoint.retry_delay(1, retry_after=5) == 5
    assert endpoint.retry_delay(3, retry_after=2) == 9
    assert endpoint.retry_delay(1, retry_after=3600) == 20
    assert parse_retry_after(Result(status=429, headers=[("Retry-After", "7")])) == 7
    assert (
        parse_retry_after(Result(status=503, headers=[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")])) == 0
    )
    assert parse_retry_after(Result(status=503, headers=[("retry-after", "soon")])) is None
    assert endpoint.is_final(Result(error_kind="ssrf_refused"))


async def test_retry_after_is_honoured_and_final_statuses_are_not_retried(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hookgate.dispatcher")

    def slow_down(request: Received, n: int) -> int | tuple[int, dict[str, str]]:
        return (429, {"Retry-After": "1"}) if n == 0 else 200

    async with receiver(slow_down) as limited, receiver(lambda request, n: 422) as strict:
        text = endpoint_config(
            nats_server.url,
            f"""
  limited:
    url: {limited.url}/in
    retry: {{schedule: [100ms, 5s], jitter: 0}}
  strict:
    url: {strict.url}/in
    retry: {{schedule: [100ms, 100ms], jitter: 0, final_statuses: [422]}}
""",
            "  - {from: [internal], to: [limited, strict]}",
        )
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("x", {})
            first, second = await limited.wait_for(2)
            dead = await _wait_for_stream(nats_server.url, "HOOKGATE_DEAD", 1)
            with trio.move_on_after(0.5):
                await strict.wait_for(2)
    assert second.at - first.at >= 0.9  # waited for Retry-After, not the 100ms schedule
    assert second.headers["hookgate-attempt"] == "2"
    assert len(strict.requests) == 1
    letter = msgspec.msgpack.decode(dead[0].data, type=DeadLetter)
    assert letter.delivery.endpoint == "strict" and letter.last_attempt.status == 422
    logged = f"delivery {letter.delivery.id} to strict is failed after 1 attempt (last: HTTP 422)"
    assert logged in caplog.text


async def test_ordered_endpoint_delivers_in_publish_order_even_when_one_fails_first(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    failures: dict[int, int] = {}

    def respond(request: Received, n: int) -> int:
        number = request.json()["data"]["n"]
        if number == 100 and failures.get(number, 0) < 2:
            failures[number] = failures.get(number, 0) + 1
            return 500
        return 200

    async with receiver(respond) as rx:
        text = endpoint_config(
            nats_server.url,
            f"""
  ledger:
    url: {rx.url}/in
    ordered: true
    retry: {{schedule: [200ms, 200ms, 200ms], jitter: 0}}
""",
            "  - {from: [internal], to: [ledger]}",
        )
        async with run_gateway(tmp_path, text) as gw:
            for n in range(200):
                assert (await gw.publish("entry", {"n": n})).status_code == 202
            await rx.wait_for(202, timeout=60)
    numbers = [r.json()["data"]["n"] for r in rx.requests]
    # Every request arrived in order; event 100 was tried three times before 101 was sent.
    assert numbers == [*range(100), 100, 100, *range(100, 200)]
    assert [r.headers["hookgate-attempt"] for r in rx.requests[100:103]] == ["1", "2", "3"]


async def test_an_ordered_head_resumes_its_retries_after_a_restart(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    def respond(request: Received, n: int) -> int:
        return 500 if n == 0 else 200

    async with receiver(respond) as rx:
        text = endpoint_config(
            nats_server.url,
            f"""
  ledger:
    url: {rx.url}/in
    ordered: true
    retry: {{schedule: [3s, 3s], jitter: 0}}
""",
            "  - {from: [internal], to: [ledger]}",
        )
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("entry", {"n": 1})
            await rx.wait_for(1)
            with trio.fail_after(10):  # the log has attempt 1 (retrying) before the restart
                while not await attempt_records(nats_server.url):
                    await trio.sleep(0.05)
        # The head was waiting in place for its retry; the restarted gateway gets it redelivered.
        async with run_gateway(tmp_path, text):
            await rx.wait_for(2, timeout=15)
    first, second = rx.requests
    assert [first.headers["hookgate-attempt"], second.headers["hookgate-attempt"]] == ["1", "2"]
    assert second.headers["hookgate-delivery-id"] == first.headers["hookgate-delivery-id"]
    # It kept to the schedule: the second attempt came when the first one's record said.
    assert second.at - first.at >= 2.9
