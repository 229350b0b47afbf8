"""Routing: fan-out, type globs, sources, explicit targets, and events that match no route."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import msgspec
import trio

from hookgate.broker.records import RoutingRecord
from hookgate.config import RouteConfig
from hookgate.routing.routes import CompiledRoute
from hookgate.types import Event
from tests.support import (
    NatsServer,
    base_config,
    publish_with_nats,
    receiver,
    run_gateway,
    stream_messages,
)


def _event(source: str, type_: str) -> Event:
    return Event(id="e", source=source, type=type_, received_at=0.0, body=b"{}")


def test_route_matching_by_glob_and_source() -> None:
    route = CompiledRoute.compile(
        0, RouteConfig(to=["x"], from_=["stripe"], types=["invoice.*", "charge.succeeded"])
    )
    assert route.matches(_event("stripe", "invoice.paid"))
    assert route.matches(_event("stripe", "charge.succeeded"))
    assert not route.matches(_event("stripe", "charge.failed"))
    assert not route.matches(_event("github", "invoice.paid"))
    assert CompiledRoute.compile(1, RouteConfig(to=["x"])).matches(_event("any", "thing"))
    assert route.name == "route-0"


async def test_fan_out_globs_sources_and_unrouted_events(tmp_path: Path, nats_server: NatsServer) -> None:
    secret = "s3cret"
    async with receiver() as billing, receiver() as audit:
        text = base_config(
            nats_server.url,
            f"""
            sources:
              shop:
                verify: {{type: hmac, header: X-Sig, secret: {secret}}}
                event_type: body.kind
                event_id: body.id
            endpoints:
              billing: {{url: "{billing.url}/b"}}
              audit: {{url: "{audit.url}/a"}}
            routes:
              - name: invoices
                from: [internal]
                types: ["invoice.*"]
                to: [billing, audit]
              - name: shop-orders
                from: [shop]
                types: ["order.*"]
                to: [audit]
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            fanned = await gw.publish("invoice.paid", {"n": 1})
            unrouted = await gw.publish("user.deleted", {"n": 2})
            body = b'{"kind": "order.created", "id": "o-1"}'
            sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            shop = await gw.http.post(f"{gw.url}/webhooks/shop", content=body, headers={"X-Sig": sig})
            shop_other = b'{"kind": "refund.created", "id": "r-1"}'
            sig2 = hmac.new(secret.encode(), shop_other, hashlib.sha256).hexdigest()
            await gw.http.post(f"{gw.url}/webhooks/shop", content=shop_other, headers={"X-Sig": sig2})
            await billing.wait_for(1)
            await audit.wait_for(2)
            records = await _routing_records(nats_server.url, 4)
            # Nothing else arrives for the unrouted events.
            with trio.move_on_after(0.5):
                await audit.wait_for(3)
    assert shop.status_code == 202
    assert [r.headers["webhook-id"] for r in billing.requests] == [fanned.json()["id"]]
    assert {r.headers["webhook-id"] for r in audit.requests} == {fanned.json()["id"], shop.json()["id"]}
    assert len(audit.requests) == 2
    by_type = {r.type: r for r in records}
    assert by_type["invoice.paid"].routes == ["invoices"]
    assert sorted(by_type["invoice.paid"].endpoints) == ["audit", "billing"]
    assert by_type["user.deleted"].event_id == unrouted.json()["id"]
    assert by_type["user.deleted"].endpoints == [] and by_type["user.deleted"].routes == []
    assert by_type["refund.created"].endpoints == []
    assert by_type["order.created"].source == "shop"


async def test_explicit_to_overrides_routes(tmp_path: Path, nats_server: NatsServer) -> None:
    async with receiver() as a, receiver() as b:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              a: {{url: "{a.url}/"}}
              b: {{url: "{b.url}/"}}
            routes:
              - {{from: [internal], to: [a]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            response = await gw.publish("x", {}, to=["b"])
            unknown = await gw.publish("x", {}, to=["nope"])
            await b.wait_for(1)
    assert response.status_code == 202
    assert unknown.status_code == 422
    assert a.requests == []


async def _routing_records(nats_url: str, count: int) -> list[RoutingRecord]:
    with trio.fail_after(10):
        while True:
            msgs = await stream_messages(nats_url, "HOOKGATE_LOG", "hookgate.log.routed.>")
            if len(msgs) >= count:
                return [msgspec.json.decode(m.data, type=RoutingRecord) for m in msgs]
            await trio.sleep(0.05)


async def test_too_deeply_nested_json_published_to_nats_is_recorded_not_retried(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/"}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            deep = b"[" * 100_000 + b"]" * 100_000
            await publish_with_nats(nats_server.url, "hookgate.publish.deep", deep, "deep-1")
            await publish_with_nats(nats_server.url, "hookgate.publish.fine", b"{}", "fine-1")
            (got,) = await rx.wait_for(1)
            records = {r.event_id: r for r in await _routing_records(nats_server.url, 2)}
            assert gw.running.broker.connected
    assert got.headers["webhook-id"] == "fine-1"
    assert records["deep-1"].endpoints == [] and "nested too deeply" in (records["deep-1"].error or "")
