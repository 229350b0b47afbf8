"""`/api/v1/endpoints`: CRUD, deliveries to API endpoints without a restart, two replicas, secrets."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks.webhooks
import trio

from tests.support import (
    Gateway,
    NatsServer,
    attempt_records,
    base_config,
    receiver,
    run_gateway,
)

API = "/api/v1/endpoints"
AUTH = {"Authorization": "Bearer test-token"}
YAML_TOKEN = "yaml-bearer-token-4f1c"
API_TOKEN = "api-bearer-token-9d2e"
HEADER_KEY = "header-api-key-77aa"


def _config(nats_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          acme: {{event_type: header.X-Event}}
        endpoints:
          fixed: {{url: "http://127.0.0.1:9/in", auth: {{type: bearer, token: {YAML_TOKEN}}}}}
        routes:
          - {{from: [internal], types: ["fixed.*"], to: [fixed]}}
        """,
    )


async def _call(gw: Gateway, method: str, path: str = "", body: Any = None, **kw: Any) -> httpx.Response:
    return await gw.http.request(method, f"{gw.url}{API}{path}", json=body, headers=AUTH, **kw)


async def test_crud_answers_with_the_documented_statuses_and_bodies(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with run_gateway(tmp_path, _config(nats_server.url)) as gw:
        no_token = await gw.http.get(f"{gw.url}{API}")
        wrong_token = await gw.http.get(f"{gw.url}{API}", headers={"Authorization": "Bearer nope"})
        created = await _call(
            gw, "POST", body={"name": "orders", "url": "http://127.0.0.1:9/o", "types": ["order.*"]}
        )
        again = await _call(gw, "POST", body={"name": "orders", "url": "http://127.0.0.1:9/p"})
        over_yaml = await _call(gw, "POST", body={"name": "fixed", "url": "http://127.0.0.1:9/p"})
        bad_duration = await _call(
            gw, "POST", body={"name": "x", "url": "http://a.example", "retry": {"schedule": ["5 minutes"]}}
        )
        bad_secret = await _call(
            gw,
            "POST",
            body={
                "name": "x",
                "url": "http://a.example",
                "signing": {"scheme": "standard-webhooks", "secret": 3},
            },
        )
        bad_filter = await _call(
            gw, "POST", body={"name": "x", "url": "http://a.example", "filter": {"a": {"$nope": 1}}}
        )
        no_name = await _call(gw, "POST", body={"url": "http://a.example"})
        unknown_key = await _call(gw, "POST", body={"name": "x", "url": "http://a.example", "colour": "red"})
        not_json = await gw.http.post(f"{gw.url}{API}", content=b"{nope", headers=AUTH)
        too_deep = await gw.http.post(f"{gw.url}{API}", content=b"[" * 100_000 + b"]" * 100_000, headers=AUTH)
        wrong_method = await _call(gw, "PUT")
        shown = await _call(gw, "GET", "/orders")
        listed = await _call(gw, "GET")
        missing = await _call(gw, "GET", "/nope")
        patch_yaml = await _call(gw, "PATCH", "/fixed", {"timeout": "5s"})
        delete_yaml = await _call(gw, "DELETE", "/fixed")
        patch_missing = await _call(gw, "PATCH", "/nope", {"timeout": "5s"})
        delete_missing = await _call(gw, "DELETE", "/nope")
        patched = await _call(gw, "PATCH", "/orders", {"timeout": "5s", "filter": {"amount": {"$gte": 10}}})
        renamed = await _call(gw, "PATCH", "/orders", {"name": "other"})
        placeholder = await _call(gw, "PATCH", "/orders", {"signing": {"secret": "whsec_***"}})
        deleted = await _call(gw, "DELETE", "/orders")
        gone = await _call(gw, "GET", "/orders")
        deleted_again = await _call(gw, "DELETE", "/orders")
    assert (no_token.status_code, no_token.json()["error"]) == (401, "unauthorized")
    assert (wrong_token.status_code, wrong_token.json()["error"]) == (403, "forbidden")

    assert created.status_code == 201, created.text
    assert created.headers["location"] == f"{API}/orders"
    body = created.json()
    assert {
        k: body[k] for k in ("name", "source", "read_only", "url", "subject", "types", "filter", "disabled")
    } == {
        "name": "orders",
        "source": "api",
        "read_only": False,
        "url": "http://127.0.0.1:9/o",
        "subject": None,
        "types": ["order.*"],
        "filter": None,
        "disabled": False,
    }
    secret = body["config"]["signing"]["secret"]
    assert body["config"]["signing"]["scheme"] == "standard-webhooks"
    assert secret.startswith("whsec_") and len(secret) == len("whsec_") + 32  # base64 of 24 bytes

    assert (again.status_code, again.json()["error"]) == (409, "conflict")
    assert (over_yaml.status_code, over_yaml.json()["error"]) == (409, "conflict")
    for response, path in (
        (bad_duration, "$.retry.schedule[0]"),
        (bad_secret, "$.signing.secret"),
        (bad_filter, "$.filter.a"),
        (no_name, '$.name: missing required key "name"'),
        (unknown_key, "$.colour"),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "invalid_endpoint"
        assert path in response.json()["message"]
    assert not_json.status_code == 400
    assert too_deep.status_code == 400 and "nested too deeply" in too_deep.json()["message"]
    assert wrong_method.status_code == 405

    assert shown.status_code == 200
    assert shown.json()["config"]["signing"] == {"scheme": "standard-webhooks", "secret": "whsec_***"}
    by_name = {e["name"]: e for e in listed.json()["data"]}
    assert set(by_name) == {"fixed", "orders"}
    assert by_name["fixed"]["source"] == "config" and by_name["fixed"]["read_only"] is True
    assert by_name["fixed"]["config"]["auth"] == {"type": "bearer", "token": "***"}
    assert by_name["orders"]["revision"] == body["revision"]

    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert (patch_yaml.status_code, patch_yaml.json()["error"]) == (409, "read_only")
    assert (delete_yaml.status_code, delete_yaml.json()["error"]) == (409, "read_only")
    assert patch_missing.status_code == 404 and delete_missing.status_code == 404

    assert patched.status_code == 200, patched.text
    assert patched.json()["config"]["timeout"] == "5s"
    assert patched.json()["filter"] == {"amount": {"$gte": 10}}
    assert patched.json()["types"] == ["order.*"]  # kept: a merge patch changes only what it names
    assert body["revision"] == 1 and patched.json()["revision"] == 2
    assert renamed.status_code == 422 and "$.name" in renamed.json()["message"]
    assert placeholder.status_code == 422 and "$.signing.secret" in placeholder.json()["message"]

    assert deleted.status_code == 204 and deleted.content == b""
    assert gone.status_code == 404 and deleted_again.status_code == 404
    for response in (shown, listed, patched, gone, renamed, placeholder):
        assert secret not in response.text
        assert YAML_TOKEN not in response.text


async def test_an_endpoints_revision_counts_its_own_changes(tmp_path: Path, nats_server: NatsServer) -> None:
    url = "http://127.0.0.1:9/in"
    async with run_gateway(tmp_path, _config(nats_server.url)) as gw:
        revisions: dict[str, list[int]] = {"a": [], "b": []}
        for method, name, body in (
            ("POST", "a", {"name": "a", "url": url}),
            ("POST", "b", {"name": "b", "url": url}),
            ("PATCH", "a", {"timeout": "5s"}),
            ("PATCH", "b", {"timeout": "5s"}),
            ("PATCH", "a", {"timeout": "6s"}),
        ):
            response = await _call(gw, method, "" if method == "POST" else f"/{name}", body)
            assert response.status_code in (200, 201), response.text
            revisions[name].append(response.json()["revision"])
        refused = await _call(gw, "PATCH", "/a", {"timeout": "soon"})
        shown = (await _call(gw, "GET", "/a")).json()
        listed = {e["name"]: e["revision"] for e in (await _call(gw, "GET")).json()["data"]}
        await _call(gw, "DELETE", "/b")
        recreated = await _call(gw, "POST", body={"name": "b", "url": url})

        # A document stored before revisions were kept per endpoint keeps the number it was shown
        # with (its KV revision), and counts on from there.
        broker = gw.running.broker
        bucket = broker.topology.endpoint_configs_bucket
        kv_revision = await broker.kv_create(bucket, "old", json.dumps({"name": "old", "url": url}).encode())
        assert kv_revision is not None
        with trio.fail_after(10):
            while (old := await _call(gw, "GET", "/old")).status_code == 404:
                await trio.sleep(0.05)
        old_patched = await _call(gw, "PATCH", "/old", {"timeout": "5s"})
    assert revisions == {"a": [1, 2, 3], "b": [1, 2]}
    assert refused.status_code == 422 and shown["revision"] == 3 and shown["config"]["timeout"] == "6s"
    assert listed == {"fixed": None, "a": 3, "b": 2}
    assert recreated.json()["revision"] == 1
    assert old.json()["revision"] == kv_revision
    assert old_patched.json()["revision"] == kv_revision + 1


async def test_an_api_endpoint_gets_events_at_once_follows_changes_and_stops_when_deleted(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with (
        receiver() as first,
        receiver() as second,
        run_gateway(tmp_path, _config(nats_server.url)) as gw,
    ):
        created = await _call(
            gw,
            "POST",
            body={
                "name": "orders",
                "url": f"{first.url}/in",
                "types": ["order.*"],
                "filter": {"amount": {"$gte": 100}},
            },
        )
        secret = created.json()["config"]["signing"]["secret"]
        await gw.publish("order.created", {"amount": 150})  # matches the subscription
        await gw.publish("order.created", {"amount": 5})  # filtered out
        await gw.publish("invoice.paid", {"amount": 500})  # another type
        explicit = await gw.publish("anything", {"n": 1}, to=["orders"])
        ingress = await gw.http.post(
            f"{gw.url}/webhooks/acme", json={"amount": 100}, headers={"X-Event": "order.shipped"}
        )
        got = await first.wait_for(3)
        with trio.move_on_after(0.5):
            await first.wait_for(4)
        assert len(first.requests) == 3

        await _wait_for_metric(gw, 'hookgate_endpoint_disabled{endpoint="orders"}', present=True)
        patched = await _call(gw, "PATCH", "/orders", {"url": f"{second.url}/in"})
        await gw.publish("order.created", {"amount": 200})
        moved = await second.wait_for(1)

        deleted = await _call(gw, "DELETE", "/orders")
        after_delete = await gw.publish("order.created", {"amount": 300}, to=["orders"])
        await gw.publish("order.created", {"amount": 300})
        with trio.move_on_after(0.5):
            await second.wait_for(2)
        await _wait_for_metric(gw, 'hookgate_endpoint_disabled{endpoint="orders"}', present=False)
    assert created.status_code == 201 and explicit.status_code == 202 and ingress.status_code == 202
    internal = [r for r in got if "hookgate-source" not in r.headers]
    assert sorted(r.json()["data"].get("amount", -1) for r in internal) == [-1, 150]
    (forwarded,) = [r for r in got if r.headers.get("hookgate-source") == "acme"]
    assert forwarded.json() == {"amount": 100}
    # Signed with the secret generated at creation.
    verifier = standardwebhooks.webhooks.Webhook(secret)
    for request in got:
        verifier.verify(request.body, request.headers)
    assert patched.status_code == 200
    assert len(first.requests) == 3 and moved[0].json()["data"] == {"amount": 200}
    assert deleted.status_code == 204
    assert after_delete.status_code == 422 and after_delete.json()["error"] == "unknown_endpoint"
    assert len(second.requests) == 1


async def test_an_endpoint_created_on_one_replica_is_used_by_another_without_a_restart(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text = _config(nats_server.url)
    async with receiver() as rx, run_gateway(tmp_path / "b", text) as b:
        async with run_gateway(tmp_path / "a", text) as a:
            created = await _call(
                a, "POST", body={"name": "orders", "url": f"{rx.url}/in", "types": ["order.*"]}
            )
        # Replica A is gone; B, running since before the endpoint existed, routes and delivers.
        seen = await _poll(lambda: _call(b, "GET", "/orders"), lambda r: r.status_code == 200)
        published = await b.publish("order.created", {"n": 1})
        explicit = await b.publish("other", {"n": 2}, to=["orders"])
        got = await rx.wait_for(2)
        patched = await _call(b, "PATCH", "/orders", {"headers": {"X-Team": "billing"}})
        await b.publish("order.created", {"n": 3})
        with_header = await rx.wait_for(1, predicate=lambda r: r.headers.get("x-team") == "billing")
    assert created.status_code == 201
    assert seen.json()["source"] == "api"
    assert published.status_code == 202 and explicit.status_code == 202
    assert sorted(r.json()["data"]["n"] for r in got[:2]) == [1, 2]
    assert patched.status_code == 200
    assert with_header[0].json()["data"] == {"n": 3}


async def test_secrets_appear_only_in_the_answer_to_the_create(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with receiver(lambda request, n: 500 if n == 0 else 200) as rx:
        text = _config(nats_server.url)
        async with run_gateway(tmp_path, text) as gw:
            created = await _call(
                gw,
                "POST",
                body={
                    "name": "orders",
                    "url": f"{rx.url}/in",
                    "auth": {"type": "bearer", "token": API_TOKEN},
                    "headers": {"X-Api-Key": HEADER_KEY, "X-Team": "orders"},
                    "retry": {"schedule": ["100ms"], "jitter": 0},
                },
            )
            secret = created.json()["config"]["signing"]["secret"]
            await gw.publish("order.created", {"n": 1}, to=["orders"])
            requests = await rx.wait_for(2)  # a failed attempt and its retry
            responses = [
                await _call(gw, "GET"),
                await _call(gw, "GET", "/orders"),
                await _call(gw, "PATCH", "/orders", {"timeout": "5s"}),
            ]
            records = await _poll(
                lambda: attempt_records(nats_server.url),
                lambda found: len(found) >= 2,
            )
    # The receiver got them: they are in force.
    assert requests[0].headers["authorization"] == f"Bearer {API_TOKEN}"
    assert requests[0].headers["x-api-key"] == HEADER_KEY
    revealed = created.text
    assert secret in revealed and API_TOKEN in revealed and HEADER_KEY in revealed
    config = responses[1].json()["config"]
    assert config["auth"] == {"type": "bearer", "token": "***"}
    assert config["headers"] == {"X-Api-Key": "***", "X-Team": "orders"}
    for value in (secret, API_TOKEN, HEADER_KEY):
        for response in responses:
            assert response.status_code == 200
            assert value not in response.text
        for record in records:
            assert value.encode() not in record.data
        assert value not in caplog.text
    assert any("endpoint orders added" in m for m in caplog.messages)


async def _wait_for_metric(gw: Gateway, line: str, *, present: bool) -> None:
    async def metrics() -> str:
        return (await gw.http.get(f"{gw.url}/metrics")).text

    await _poll(metrics, lambda text: (line in text) == present, timeout=15)


async def _poll(fetch: Any, done: Any, timeout: float = 10.0) -> Any:
    """Fetch until `done(result)`, with a deadline (for state another replica applies on its own)."""
    with trio.fail_after(timeout):
        while True:
            result = await fetch()
            if done(result):
                return result
            await trio.sleep(0.05)


async def test_a_change_lets_the_attempt_in_flight_finish_first(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with (
        receiver(lambda request, n: 1.0 if n == 0 else 200) as rx,
        run_gateway(tmp_path, _config(nats_server.url)) as gw,
    ):
        await _call(gw, "POST", body={"name": "slow", "url": f"{rx.url}/in", "signing": None})
        await gw.publish("a", {"n": 1}, to=["slow"])
        (first,) = await rx.wait_for(1)  # answered after a second
        patched = await _call(gw, "PATCH", "/slow", {"headers": {"X-Version": "2"}})
        await gw.publish("a", {"n": 2}, to=["slow"])
        (second,) = await rx.wait_for(1, predicate=lambda r: r.headers.get("x-version") == "2")
        records = await _poll(
            lambda: attempt_records(nats_server.url, "slow"),
            lambda found: len(found) >= 2,
        )
    assert patched.status_code == 200
    assert "webhook-signature" not in first.headers  # "signing": null: unsigned
    # The worker with the old config finished its attempt before the new one started.
    assert second.at - first.at >= 0.9
    assert len(rx.requests) == 2  # nothing was sent twice
    assert [json.loads(r.data)["outcome"] for r in records] == ["succeeded", "succeeded"]


async def test_deleting_an_endpoint_clears_its_shared_circuit_so_a_new_one_starts_closed(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    auth = {"Authorization": "Bearer test-token"}
    breaker = {"failure_rate": 0.5, "window": "60s", "min_requests": 2, "cooldown": "60s"}
    async with receiver(lambda request, n: 500) as rx, run_gateway(tmp_path, _config(nats_server.url)) as gw:
        broker = gw.running.broker
        bucket, key = broker.topology.health_bucket, "circuit.svc"
        body = {"name": "svc", "url": f"{rx.url}/in", "signing": None, "circuit_breaker": breaker}
        assert (await gw.http.post(f"{gw.url}/api/v1/endpoints", json=body, headers=auth)).status_code == 201
        for n in range(2):
            await gw.publish("a", {"n": n}, to=["svc"])
        opened = await _poll(
            lambda: broker.kv_get(bucket, key), lambda found: found is not None and found.value
        )
        deleted = await gw.http.delete(f"{gw.url}/api/v1/endpoints/svc", headers=auth)
        cleared = await _poll(
            lambda: broker.kv_get(bucket, key), lambda found: found is None or not found.value
        )
    assert deleted.status_code == 204
    assert b"open" in opened.value
    assert cleared is None or not cleared.value
