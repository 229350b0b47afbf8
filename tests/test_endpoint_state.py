"""Disabling endpoints (410, disable_after), keeping their deliveries, operational events, re-enabling."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import msgspec
import nats
import trio

from hookgate.egress.worker import STATE_POLL
from tests.support import NatsServer, Received, base_config, receiver, run_gateway, stream_messages


async def _ops(nats_url: str, kinds: set[str], timeout: float = 10) -> list[dict]:
    with trio.fail_after(timeout):
        while True:
            events = [msgspec.json.decode(m.data) for m in await stream_messages(nats_url, "HOOKGATE_OPS")]
            if kinds <= {e["kind"] for e in events}:
                return events
            await trio.sleep(0.05)


async def test_410_disables_keeps_deliveries_and_enable_puts_them_back(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    gone = True

    def respond(request: Received, n: int) -> int:
        return 410 if gone else 200

    async with receiver(respond) as rx, receiver() as alerts:
        text = base_config(
            nats_server.url,
            f"""
            ops: {{endpoint: alerts}}
            endpoints:
              svc: {{url: "{rx.url}/in", retry: {{schedule: [100ms, 100ms]}}}}
              alerts: {{url: "{alerts.url}/ops"}}
            routes:
              - {{from: [internal], types: ["order.*"], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("order.created", {"n": 1})
            await rx.wait_for(1)
            await _ops(nats_server.url, {"endpoint.disabled"})
            for n in (2, 3):
                await gw.publish("order.created", {"n": n})
            (alert,) = await alerts.wait_for(1)
            with trio.move_on_after(1.5):  # disabled: nothing more reaches the endpoint
                await rx.wait_for(2)
            assert len(rx.requests) == 1
            gone = False
            enabled = await gw.http.post(
                f"{gw.url}/api/v1/endpoints/svc/enable", headers={"Authorization": "Bearer test-token"}
            )
            got = await rx.wait_for(4, timeout=15)
            await alerts.wait_for(2)
            ops = await _ops(nats_server.url, {"endpoint.disabled", "endpoint.recovered"})
    assert enabled.status_code == 200
    assert sorted(r.json()["data"]["n"] for r in got[1:]) == [1, 2, 3]
    # The 410'd delivery came back unspent.
    assert {r.headers["hookgate-attempt"] for r in got} == {"1"}
    assert alert.json()["type"] == "hookgate.endpoint.disabled"
    assert alert.json()["data"]["endpoint"] == "svc"
    assert "410" in alert.json()["data"]["reason"]
    assert [o["kind"] for o in ops if o["endpoint"] == "svc"][:2] == [
        "endpoint.disabled",
        "endpoint.recovered",
    ]


async def test_a_410_on_the_head_of_an_ordered_endpoint_keeps_the_order(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    gone = True

    def respond(request: Received, n: int) -> int:
        return 410 if gone else 200

    async with receiver(respond) as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in", ordered: true, retry: {{schedule: [100ms]}}}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            for n in (1, 2, 3, 4):
                await gw.publish("order.created", {"n": n})
            await rx.wait_for(1)
            await _ops(nats_server.url, {"endpoint.disabled"})
            gone = False
            enabled = await gw.http.post(
                f"{gw.url}/api/v1/endpoints/svc/enable", headers={"Authorization": "Bearer test-token"}
            )
            got = await rx.wait_for(5, timeout=15)
    assert enabled.status_code == 200
    assert [r.json()["data"]["n"] for r in got] == [1, 1, 2, 3, 4]
    assert [r.headers["hookgate-attempt"] for r in got] == ["1"] * 5  # the 410 spent no attempt


async def test_continuous_failure_disables_after_disable_after_and_the_cli_enables(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    healthy = False

    def respond(request: Received, n: int) -> int:
        return 200 if healthy else 500

    async with receiver(respond) as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc:
                url: "{rx.url}/in"
                disable_after: 500ms
                retry: {{schedule: [200ms, 200ms, 200ms, 200ms, 200ms, 200ms], jitter: 0}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("x", {"n": 1})
            ops = await _ops(nats_server.url, {"delivery.failing", "endpoint.disabled"})
            attempts_when_disabled = len(rx.requests)
            with trio.move_on_after(1.0):
                await rx.wait_for(attempts_when_disabled + 1)
            assert len(rx.requests) == attempts_when_disabled  # kept, not retried while disabled
            healthy = True
            config = tmp_path / "hookgate.yaml"
            cli = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "hookgate.cli",
                        "endpoint",
                        "enable",
                        "svc",
                        "-c",
                        str(config),
                        "--url",
                        gw.url,
                        "--token",
                        "test-token",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            )
            last = await rx.wait_for(attempts_when_disabled + 1, timeout=15)
    assert cli.returncode == 0, cli.stderr
    assert "endpoint svc enabled" in cli.stdout
    assert 2 <= attempts_when_disabled <= 5
    # The kept delivery resumed with its next attempt once enabled.
    assert int(last[-1].headers["hookgate-attempt"]) == attempts_when_disabled + 1
    disabled = next(o for o in ops if o["kind"] == "endpoint.disabled")
    assert "failing continuously" in disabled["reason"]


async def test_exhausted_deliveries_emit_an_ops_event(tmp_path: Path, nats_server: NatsServer) -> None:
    async with receiver(lambda request, n: 500) as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in", retry: {{schedule: [100ms], jitter: 0}}}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            published = await gw.publish("x", {})
            ops = await _ops(nats_server.url, {"delivery.exhausted"})
    exhausted = next(o for o in ops if o["kind"] == "delivery.exhausted")
    assert exhausted["event_id"] == published.json()["id"]
    assert len(rx.requests) == 2


async def _consumer_count(nats_url: str, stream: str) -> int:
    """How many consumers `stream` has now, read with a plain nats-py client (as an operator would)."""

    async def read() -> int:
        nc = await nats.connect(nats_url)
        try:
            return len(await nc.jsm().consumers_info(stream))
        finally:
            await nc.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(read()))


async def test_an_idle_gateway_keeps_one_watch_on_the_states_bucket(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """No consumer per refresh: the count on KV_<bucket> stays constant and small while idle."""
    async with receiver() as rx:
        text = base_config(nats_server.url, f'endpoints: {{svc: {{url: "{rx.url}/in"}}}}\n')
        async with run_gateway(tmp_path, text) as gw:
            stream = "KV_" + gw.running.broker.topology.endpoints_bucket
            counts = []
            for _ in range(4):  # several refresh periods (STATE_POLL) of an idle gateway
                counts.append(await _consumer_count(nats_server.url, stream))
                await trio.sleep(STATE_POLL)
            assert len(set(counts)) == 1, counts
            assert counts[0] <= 1, counts


async def test_a_state_set_on_one_gateway_is_seen_by_another_within_a_second(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    auth = {"Authorization": "Bearer test-token"}
    async with receiver() as rx:
        text = base_config(nats_server.url, f'endpoints: {{svc: {{url: "{rx.url}/in"}}}}\n')
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        async with run_gateway(tmp_path / "a", text) as first, run_gateway(tmp_path / "b", text) as second:

            async def seen_by_first(disabled: bool) -> float:
                started = trio.current_time()
                with trio.fail_after(5):
                    while True:
                        shown = await first.http.get(f"{first.url}/api/v1/endpoints/svc", headers=auth)
                        if shown.json()["disabled"] is disabled:
                            return trio.current_time() - started
                        await trio.sleep(0.02)

            for action, disabled in (("disable", True), ("enable", False)):
                changed = await second.http.post(f"{second.url}/api/v1/endpoints/svc/{action}", headers=auth)
                assert changed.status_code == 200, changed.text
                assert await seen_by_first(disabled) < 1.2
