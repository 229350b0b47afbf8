"""The catalog: YAML endpoints plus API ones followed through a KV watch; the KV operations it uses."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from hookgate import config as config_mod
from hookgate.api.catalog import Catalog, EndpointDocument, pack
from hookgate.broker import Broker
from hookgate.plugin_host.hooks import Hooks
from hookgate.transport.ssrf import EgressGuard
from hookgate.types import Event
from tests.support import NatsServer, base_config

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@asynccontextmanager
async def _catalog(nats_url: str, egress: str = "") -> AsyncIterator[tuple[Catalog, Broker]]:
    hooks = Hooks(())
    text = base_config(nats_url, 'endpoints:\n  fixed: {url: "http://127.0.0.1:9/in"}\n')
    text = text.replace("egress:\n", "egress:\n" + egress)
    loaded = config_mod.loads(text, hooks.registry)
    async with Broker.connect(loaded.config.broker, nats_url) as broker:
        yield Catalog(loaded, hooks, broker, EgressGuard()), broker


def _doc(name: str, **extra: object) -> bytes:
    return msgspec.json.encode({"name": name, "url": "http://127.0.0.1:9/x", **extra})


def _event(type_: str, body: bytes = b"{}") -> Event:
    return Event(id="e", source="internal", type=type_, received_at=0.0, body=body)


async def test_catalog_starts_from_the_stored_documents_and_follows_every_change(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "hookgate.api.catalog")
    async with _catalog(nats_server.url) as (catalog, broker):
        bucket = broker.topology.endpoint_configs_bucket
        await broker.kv_create(
            bucket, "early", _doc("early", signing={"scheme": "standard-webhooks", "secret": SECRET})
        )
        seen: list[list[str]] = []
        catalog.subscribe(lambda c: seen.append(sorted(c.endpoints())))
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(catalog.run, stopping)
            # Started means the documents stored before were applied.
            assert sorted(catalog.endpoints()) == ["early", "fixed"]
            assert catalog.get("early").source == "api" and catalog.get("fixed").read_only  # type: ignore[union-attr]

            revision = await broker.kv_create(
                bucket, "orders", _doc("orders", types=["order.*"], filter={"amount": {"$gte": 10}})
            )
            assert revision is not None and await catalog.wait_for(revision)
            orders = catalog.get("orders")
            assert orders is not None and orders.revision == orders.kv_revision == revision  # a bare document
            packed = await broker.kv_create(bucket, "packed", pack(msgspec.json.decode(_doc("packed")), 4))
            assert packed is not None and await catalog.wait_for(packed)
            entry = catalog.get("packed")
            assert entry is not None and (entry.revision, entry.kv_revision) == (4, packed)
            await broker.kv_delete(bucket, "packed")
            (route,) = [r for r in catalog.implicit_routes() if r.name == "endpoint:orders"]
            assert route.to == ("orders",)
            assert route.matches(_event("order.paid", b'{"amount": 10}'))
            assert not route.matches(_event("order.paid", b'{"amount": 9}'))
            assert not route.matches(_event("invoice.paid", b'{"amount": 10}'))

            # Documents this replica cannot use are skipped, and say why.
            for name, value in (
                ("unknown-scheme", _doc("unknown-scheme", signing={"scheme": "nope"})),
                ("renamed", _doc("something-else")),
                ("fixed", _doc("fixed")),
                ("garbage", b"{not json"),
            ):
                revision = await broker.kv_create(bucket, name, value)
                assert revision is not None and await catalog.wait_for(revision)
            assert sorted(catalog.api_entries) == ["early", "orders"]
            assert catalog.get("fixed").source == "config"  # type: ignore[union-attr]

            deleted = await broker.kv_delete(bucket, "orders")
            assert deleted is not None and await catalog.wait_for(deleted)
            assert "orders" not in catalog and "early" in catalog
            stopping.set()
    assert seen[0] == ["fixed"] and seen[1] == ["early", "fixed"]
    assert ["early", "fixed", "orders"] in seen and seen[-1] == ["early", "fixed"]
    text = caplog.text
    assert "unknown signer" in text and "$.signing.scheme" in text
    assert "names 'something-else'" in text and "the config wins" in text and "not JSON" in text
    assert SECRET not in text


async def test_stored_documents_that_break_the_api_rules_are_not_used(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Written to the bucket by an older version, or by any NATS client that may: checked again here.
    listed = "http://hg:proxy-pw@proxy.test:3128"
    async with _catalog(nats_server.url, f'  proxies: ["{listed}"]\n') as (catalog, broker):
        bucket = broker.topology.endpoint_configs_bucket
        for name, value in (
            ("octal", msgspec.json.encode({"name": "octal", "url": "http://0177.0.0.1:8000/i"})),
            ("loopback-proxy", _doc("loopback-proxy", proxy="http://127.0.0.1:8080")),
            ("kv", msgspec.json.encode({"name": "kv", "subject": "$KV.HOOKGATE_ENDPOINTS.fixed"})),
            ("inbox", msgspec.json.encode({"name": "inbox", "subject": "_INBOX.x"})),
            ("proxied", _doc("proxied", proxy="http://proxy.test:3128")),
        ):
            await broker.kv_create(bucket, name, value)
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(catalog.run, stopping)
            assert sorted(catalog.api_entries) == ["proxied"]
            entry = catalog.get("proxied")
            stopping.set()
    assert entry is not None and entry.endpoint.transport is not None
    # Named without credentials; sent with those the config gives.
    proxy = entry.endpoint.transport._proxy
    assert proxy is not None and (proxy.host, proxy.port) == ("proxy.test", 3128)
    assert proxy.authorization == b"Basic " + base64.b64encode(b"hg:proxy-pw")
    text = caplog.text
    for name, path in (
        ("octal", "$.url"),
        ("loopback-proxy", "$.proxy"),
        ("kv", "$.subject"),
        ("inbox", "$.subject"),
    ):
        assert f"endpoint {name} cannot be used on this replica: {path}: " in text, name


async def test_check_reports_paths_from_the_document(nats_server: NatsServer) -> None:
    async with _catalog(nats_server.url) as (catalog, _):
        checked = catalog.check({"name": "a", "url": "http://a.example", "types": ["x.*"]})
        assert isinstance(checked.config, EndpointDocument) and checked.signer is None
        for value, path in (
            ({"name": "a b", "url": "http://a.example"}, "$.name"),
            ({"name": "a", "url": "ftp://a.example"}, "$.url"),
            ({"name": "a", "url": "http://a.example", "types": []}, "$.types"),
            ({"name": "a", "url": "http://a.example", "filter": {"x": {"$regex": "("}}}, "$.filter.x"),
            ({"name": "a"}, "$: set exactly one of url or subject"),
            ({"name": "a", "subject": "hookgate.loop"}, "$.subject"),
        ):
            with pytest.raises(config_mod.ConfigError) as raised:
                catalog.check(value)
            assert any(str(p).startswith(f"<request>: {path}") for p in raised.value.problems), raised.value


async def test_kv_create_update_and_delete_are_conditional(nats_server: NatsServer) -> None:
    async with _catalog(nats_server.url) as (_, broker):
        bucket = broker.topology.endpoint_configs_bucket
        first = await broker.kv_create(bucket, "k", b"1")
        assert first is not None
        assert await broker.kv_create(bucket, "k", b"2") is None  # exists: refused by the server
        second = await broker.kv_update(bucket, "k", b"3", first)
        assert second is not None and second > first
        assert await broker.kv_update(bucket, "k", b"4", first) is None  # stale revision
        assert await broker.kv_delete(bucket, "k", first) is None
        stored = await broker.kv_get(bucket, "k")
        assert stored is not None and (stored.value, stored.revision) == (b"3", second)
        assert await broker.kv_delete(bucket, "k", second) is not None
        assert await broker.kv_get(bucket, "k") is None
        assert await broker.kv_create(bucket, "k", b"5") is not None  # a deleted key can be created again
        topology = broker.topology
        assert await broker.delete_consumer(topology.deliveries_stream, "endpoint-nobody") is False
