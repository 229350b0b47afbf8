"""What an endpoint can make the gateway do, from the config and from the API: URLs the transport
cannot send to, unexpected exceptions in an attempt, proxies, and NATS subjects.

An API token holder is not the operator: it may name only a proxy the YAML lists, and a subject
endpoint may not reach NATS's own subjects (`$JS`, `$KV`, `_INBOX`) or hookgate's, unless the
operator lists them in `egress.allow_subjects`.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from hookgate.hookspecs import hookimpl
from hookgate.types import Delivery, EndpointView, OutgoingRequest
from tests.support import (
    NatsServer,
    attempt_records,
    base_config,
    receiver,
    run_gateway,
)

AUTH = {"Authorization": "Bearer test-token"}
API = "/api/v1/endpoints"


# --- unexpected exceptions -----------------------------------------------------------------


class FailingSigner:
    """Raises in `hookgate_sign` for the first `failures` attempts: a plugin with a bug."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []

    @hookimpl
    def hookgate_sign(self, request: OutgoingRequest, endpoint: EndpointView) -> None:
        self.calls.append(trio.current_time())
        if len(self.calls) <= self.failures:
            raise KeyError("signing-key-that-must-not-be-shown")


async def test_an_exception_in_an_attempt_is_an_internal_attempt_retried_on_schedule(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = FailingSigner(failures=2)
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in", retry: {{schedule: [300ms, 600ms], jitter: 0}}}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            await gw.publish("x", {})
            (got,) = await rx.wait_for(1)
            with trio.fail_after(10):
                while len(records := await attempt_records(nats_server.url)) < 3:
                    await trio.sleep(0.05)
            attempts = [json.loads(m.data) for m in records]
            detail = (
                await gw.http.get(f"{gw.url}/api/v1/deliveries/{attempts[0]['delivery_id']}", headers=AUTH)
            ).json()
    assert got.headers["hookgate-attempt"] == "3"
    assert [(a["attempt"], a["outcome"], a["error_kind"]) for a in attempts] == [
        (1, "retrying", "internal"),
        (2, "retrying", "internal"),
        (3, "succeeded", None),
    ]
    for attempt in attempts[:2]:
        assert "KeyError" in attempt["error"] and "signing-key" not in attempt["error"]
    # On the schedule, not redelivered at once: three calls in all, 300ms and 600ms apart.
    assert len(plugin.calls) == 3
    first, second, third = plugin.calls
    assert second - first >= 0.29 and third - second >= 0.59, plugin.calls
    assert detail["status"] == "succeeded" and [a["error_kind"] for a in detail["attempt_log"]] == [
        "internal",
        "internal",
        None,
    ]


async def test_an_attempt_that_always_fails_inside_the_gateway_ends_dead(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = FailingSigner(failures=1000)
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in", retry: {{schedule: [100ms, 100ms], jitter: 0}}}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            await gw.publish("x", {})
            with trio.fail_after(10):
                while len(records := await attempt_records(nats_server.url)) < 3:
                    await trio.sleep(0.05)
            await trio.sleep(0.5)  # room for an attempt too many, which must not come
    attempts = [json.loads(m.data) for m in records]
    assert [(a["outcome"], a["error_kind"]) for a in attempts] == [
        ("retrying", "internal"),
        ("retrying", "internal"),
        ("dead", "internal"),
    ]
    assert len(plugin.calls) == 3 and rx.requests == []


class FailingRateLimit:
    """Raises in `hookgate_rate_limit`, which runs before an attempt starts, the first two times."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    @hookimpl
    def hookgate_rate_limit(self, delivery: Delivery, endpoint: EndpointView) -> float | None:
        self.calls.append(trio.current_time())
        if len(self.calls) <= 2:
            raise RuntimeError("limiter down")
        return None


async def test_a_failure_outside_an_attempt_is_redelivered_after_a_growing_delay(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = FailingRateLimit()
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in"}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            await gw.publish("x", {})
            (got,) = await rx.wait_for(1, timeout=15)
    assert got.headers["hookgate-attempt"] == "1"  # no attempt was made before
    first, second, third = plugin.calls
    assert second - first >= 0.9 and third - second >= 1.9, plugin.calls
