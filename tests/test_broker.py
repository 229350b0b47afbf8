"""The broker: dedup window, outage behaviour (503, never 2xx) and recovery without a restart."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import trio

from hookgate import config as config_mod
from hookgate.broker import Broker, OutMsg
from hookgate.plugin_host.hooks import Hooks
from hookgate.plugin_kit.units import rfc3339
from tests.support import NatsServer, base_config, receiver, run_gateway, stream_messages

SECRET = "dedup-secret"


def _config(nats_url: str, receiver_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          prov:
            verify: {{type: hmac, header: X-Sig, secret: {SECRET}}}
            event_id: header.X-Delivery
        endpoints:
          svc: {{url: "{receiver_url}/in", retry: {{schedule: [200ms, 500ms, 1s, 2s, 5s]}}}}
        routes:
          - {{from: [prov, internal], to: [svc]}}
        """,
    )


def _headers(body: bytes, delivery: str) -> dict[str, str]:
    return {"X-Sig": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(), "X-Delivery": delivery}


async def _stream_info(nats_url: str, stream: str) -> dict:
    import asyncio

    import nats

    async def go() -> dict:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jsm().stream_info(stream)
            return {"duplicate_window": info.config.duplicate_window, "messages": info.state.messages}
        finally:
            await nc.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(go()))


async def test_same_provider_event_twice_is_stored_and_delivered_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx, run_gateway(tmp_path, _config(nats_server.url, rx.url)) as gw:
        body = b'{"n": 1}'
        first = await gw.http.post(f"{gw.url}/webhooks/prov", content=body, headers=_headers(body, "dup-1"))
        await rx.wait_for(1)
        again = await gw.http.post(f"{gw.url}/webhooks/prov", content=body, headers=_headers(body, "dup-1"))
        other = await gw.http.post(f"{gw.url}/webhooks/prov", content=body, headers=_headers(body, "dup-2"))
        await rx.wait_for(2)
        info = await _stream_info(nats_server.url, "HOOKGATE_EVENTS")
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert [r.headers["webhook-id"] for r in rx.requests] == [first.json()["id"], other.json()["id"]]
    assert info["messages"] == 2
    # Providers retry for days: the window is 24h by default, not NATS's 2 minutes.
    assert info["duplicate_window"] == 24 * 3600


async def test_broker_outage_answers_503_then_recovers_without_restart(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx, run_gateway(tmp_path, _config(nats_server.url, rx.url)) as gw:
        body = b'{"n": 0}'
        before = await gw.http.post(f"{gw.url}/webhooks/prov", content=body, headers=_headers(body, "o-0"))
        await rx.wait_for(1)
        nats_server.stop()
        during = []
        for n in range(3):
            b = f'{{"n": {n}}}'.encode()
            r = await gw.http.post(f"{gw.url}/webhooks/prov", content=b, headers=_headers(b, f"down-{n}"))
            during.append(r.status_code)
        api = await gw.publish("x", {})
        ready = await gw.http.get(f"{gw.url}/readyz")
        nats_server.start()  # same port, same store
        with trio.fail_after(20):
            while True:
                b = b'{"n": "back"}'
                after = await gw.http.post(f"{gw.url}/webhooks/prov", content=b, headers=_headers(b, "back"))
                if after.status_code == 202:
                    break
                assert after.status_code == 503
                await trio.sleep(0.2)
        got = await rx.wait_for(2, timeout=20)
    assert before.status_code == 202
    assert during == [503, 503, 503]
    assert api.status_code == 503
    assert ready.status_code == 503
    assert got[-1].body == b'{"n": "back"}'
    assert {r.headers["webhook-id"] for r in got} == {before.json()["id"], after.json()["id"]}


async def test_events_are_kept_on_disk_across_a_broker_restart(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with run_gateway(tmp_path, _config(nats_server.url, "http://127.0.0.1:9")) as gw:
        for n in range(5):
            assert (await gw.publish("kept", {"n": n})).status_code == 202
    nats_server.stop()
    nats_server.start()
    events = await stream_messages(nats_server.url, "HOOKGATE_EVENTS")
    assert len(events) == 5


async def test_a_pending_schedule_fired_now_is_published_once_and_removed(nats_server: NatsServer) -> None:
    """What pulling a retry forward relies on: the message goes to its target now, the schedule
    goes with it, and firing it again (a double click, another replica, or after it fired by
    itself) is refused by the server."""
    loaded = config_mod.loads(base_config(nats_server.url), Hooks(()).registry)
    async with Broker.connect(loaded.config.broker, nats_server.url) as broker:
        t = broker.topology
        stream, target = t.deliveries_stream, t.delivery_subject("svc")
        trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

        async def schedule(delivery: str, at: float) -> str:
            subject = t.schedule_subject("svc", delivery, 2)
            headers = {"Nats-Schedule": f"@at {rfc3339(at)}", "Nats-Schedule-Target": target, **trace}
            assert (await broker.publish(OutMsg(subject, delivery.encode(), headers))).ok
            return subject

        async def on_target() -> list[bytes]:
            return [m.data for m in (await broker.scan(stream, [target]))[0]]

        hour = await schedule("dlv_hour", time.time() + 3600)
        pending = (await broker.last_msgs(stream, [hour]))[hour]
        fired = await broker.fire_now(pending)
        again = await broker.fire_now(pending)
        left = await broker.last_msgs(stream, [hour])
        sent = (await broker.scan(stream, [target]))[0]

        soon = await schedule("dlv_soon", time.time() + 0.5)
        read_before = (await broker.last_msgs(stream, [soon]))[soon]
        with trio.fail_after(10):
            while b"dlv_soon" not in await on_target():  # fires by itself
                await trio.sleep(0.05)
        late = await broker.fire_now(read_before)
        delivered = await on_target()

    due = Broker.due_at(pending)
    assert due is not None and due > time.time() + 3000
    assert fired.ok, fired.error
    assert not again.ok and "wrong last sequence" in (again.error or "")
    assert left == {}
    assert [m.data for m in sent] == [b"dlv_hour"] and sent[0].headers["traceparent"] == trace["traceparent"]
    assert not late.ok and "wrong last sequence" in (late.error or "")
    assert delivered == [b"dlv_hour", b"dlv_soon"]
