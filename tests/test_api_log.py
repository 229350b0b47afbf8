"""The delivery log through the API: events, deliveries with statuses and attempts, pagination,
and replays (retry, recover, redrive) on a real nats-server with loopback receivers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support import (
    Gateway,
    NatsServer,
    Received,
    base_config,
    free_port,
    receiver,
    run_gateway,
    stream_messages,
)

AUTH = {"Authorization": "Bearer test-token"}


def _config(nats_url: str, ok: str, flaky: str, dead: str) -> str:
    return base_config(
        nats_url,
        f"""
        endpoints:
          ok: {{url: "{ok}/in"}}
          flaky: {{url: "{flaky}/in", retry: {{schedule: [100ms], jitter: 0}}}}
          dead: {{url: "{dead}/in", retry: {{schedule: [100ms], jitter: 0}}}}
        routes:
          - {{from: [internal], types: ["order.*"], to: [ok, flaky, dead]}}
        """,
    )


def _first_attempt_fails(request: Received, n: int) -> int:
    return 500 if request.headers["hookgate-attempt"] == "1" else 200


async def _get(gw: Gateway, path: str, **params: Any) -> Any:
    response = await gw.http.get(f"{gw.url}/api/v1{path}", params=params, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def _until(
    gw: Gateway, path: str, done: Callable[[Any], bool], timeout: float = 15, **params: Any
) -> Any:
    """Poll an API resource until `done` holds (the log is written without waiting on deliveries)."""
    with trio.fail_after(timeout):
        while True:
            body = await _get(gw, path, **params)
            if done(body):
                return body
            await trio.sleep(0.05)


def _statuses(page: Any) -> dict[str, str]:
    return {d["endpoint"]: d["status"] for d in page["data"]}


async def test_statuses_attempts_and_pagination(tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        receiver() as ok,
        receiver(_first_attempt_fails) as flaky,
        receiver(lambda r, n: 500) as dead,
        run_gateway(tmp_path, _config(nats_server.url, ok.url, flaky.url, dead.url)) as gw,
    ):
        ids = []
        for n in range(3):
            response = await gw.publish("order.created", {"n": n}, id=f"order-{n}")
            ids.append(response.json()["id"])
        await ok.wait_for(3)
        await flaky.wait_for(6)
        await dead.wait_for(6)

        def settled(page: Any) -> bool:
            return len(page["data"]) == 9 and all(d["status"] in ("succeeded", "dead") for d in page["data"])

        everything = await _until(gw, "/deliveries", settled, limit=50)
        by_event = await _get(gw, "/deliveries", event="order-1")
        dead_only = await _get(gw, "/deliveries", status="dead")
        ok_only = await _get(gw, "/deliveries", endpoint="ok")
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = await _get(gw, "/deliveries", **params)
            pages.append(page)
            cursor = page["next"]
            if cursor is None:
                break
        dead_pages, dead_cursor = [], None
        while True:
            dead_params: dict[str, Any] = {"status": "dead", "limit": 1}
            if dead_cursor:
                dead_params["cursor"] = dead_cursor
            dead_page = await _get(gw, "/deliveries", **dead_params)
            dead_pages.append(dead_page)
            dead_cursor = dead_page["next"]
            if dead_cursor is None:
                break
        dead_later = await _get(gw, "/deliveries", status="dead", since=str(time.time() + 60))
        dead_earlier = await _get(gw, "/deliveries", status="dead", until=str(time.time() - 3600))
        mixed = await _get(gw, "/deliveries", status="dead,succeeded", endpoint="dead")
        wrong_cursor = await gw.http.get(
            f"{gw.url}/api/v1/deliveries", params={"cursor": dead_pages[0]["next"]}, headers=AUTH
        )
        flaky_row = next(d for d in by_event["data"] if d["endpoint"] == "flaky")
        flaky_detail = await _get(gw, f"/deliveries/{flaky_row['id']}")
        dead_row = next(d for d in by_event["data"] if d["endpoint"] == "dead")
        dead_detail = await _get(gw, f"/deliveries/{dead_row['id']}")
        events = await _get(gw, "/events")
        event = await _get(gw, "/events/order-1")
        missing = await gw.http.get(f"{gw.url}/api/v1/deliveries/dlv_nope", headers=AUTH)
        bad_status = await gw.http.get(f"{gw.url}/api/v1/deliveries?status=lost", headers=AUTH)
        bad_param = await gw.http.get(f"{gw.url}/api/v1/deliveries?endpiont=ok", headers=AUTH)
        no_token = await gw.http.get(f"{gw.url}/api/v1/deliveries")
        # Names and ids become NATS subject tokens: wildcards must not widen a lookup.
        wildcard_id = await gw.http.get(f"{gw.url}/api/v1/deliveries/*", headers=AUTH)
        dotted_id = await gw.http.get(f"{gw.url}/api/v1/deliveries/a.b", headers=AUTH)
        wildcard_endpoint = await gw.http.get(f"{gw.url}/api/v1/deliveries?endpoint=>", headers=AUTH)
        wildcard_source = await gw.http.get(f"{gw.url}/api/v1/events?source=*", headers=AUTH)
        wildcard_retry = await gw.http.post(f"{gw.url}/api/v1/deliveries/*/retry", headers=AUTH)

    rows = everything["data"]
    assert {(d["endpoint"], d["status"], d["attempts"]) for d in rows} == {
        ("ok", "succeeded", 1),
        ("flaky", "succeeded", 2),
        ("dead", "dead", 2),
    }
    assert sorted(d["event_id"] for d in rows) == sorted(ids * 3)
    assert _statuses(by_event) == {"ok": "succeeded", "flaky": "succeeded", "dead": "dead"}
    assert [d["endpoint"] for d in dead_only["data"]] == ["dead"] * 3
    # Dead deliveries come from the dead-letter stream: paged once each, filtered by creation time.
    dead_paged = [d["id"] for page in dead_pages for d in page["data"]]
    assert sorted(dead_paged) == sorted(d["id"] for d in dead_only["data"]) and len(dead_paged) == 3
    assert all(d["attempts"] == 2 and d["last_status"] == 500 for d in dead_only["data"])
    assert dead_later["data"] == [] and dead_earlier["data"] == []
    assert [d["status"] for d in mixed["data"]] == ["dead"] * 3
    assert wrong_cursor.status_code == 422
    assert [d["endpoint"] for d in ok_only["data"]] == ["ok"] * 3

    # Pagination: every row exactly once, in creation order.
    paged = [d["id"] for page in pages for d in page["data"]]
    assert len(paged) == 9 and sorted(paged) == sorted(d["id"] for d in rows)
    assert all(len(page["data"]) <= 2 for page in pages)

    assert [(a["attempt"], a["status"], a["outcome"]) for a in flaky_detail["attempt_log"]] == [
        (1, 500, "retrying"),
        (2, 200, "succeeded"),
    ]
    assert flaky_detail["attempt_log"][0]["next_attempt_at"] is not None
    assert flaky_detail["attempt_log"][0]["error_kind"] == "http_status"
    assert [(a["attempt"], a["outcome"]) for a in dead_detail["attempt_log"]] == [
        (1, "retrying"),
        (2, "dead"),
    ]
    sent = dict(dead_detail["attempt_log"][0]["request_headers"])
    assert sent["webhook-id"] == "order-1" and sent["hookgate-attempt"] == "1"

    assert sorted(e["id"] for e in events["data"]) == sorted(ids)
    assert event["type"] == "order.created" and event["source"] == "internal"
    assert event["body"] == '{"n":1}' and not event["body_truncated"]
    assert sorted(event["endpoints"]) == ["dead", "flaky", "ok"]

    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert bad_status.status_code == 422 and "lost" in bad_status.json()["message"]
    assert bad_param.status_code == 422 and "endpiont" in bad_param.json()["message"]
    assert no_token.status_code == 401
    assert wildcard_id.status_code == dotted_id.status_code == wildcard_retry.status_code == 404
    assert wildcard_endpoint.status_code == wildcard_source.status_code == 422


async def test_retry_recover_and_redrive(tmp_path: Path, nats_server: NatsServer) -> None:
    healthy = False

    def dead_until_healed(request: Received, n: int) -> int:
        return 200 if healthy else 500

    async with (
        receiver() as ok,
        receiver(_first_attempt_fails) as flaky,
        receiver(dead_until_healed) as dead,
        run_gateway(tmp_path, _config(nats_server.url, ok.url, flaky.url, dead.url)) as gw,
    ):

        async def dead_rows(expected: int) -> list[Any]:
            page = await _until(
                gw,
                "/deliveries",
                lambda p: len(p["data"]) == expected,
                endpoint="dead",
                status="dead",
            )
            return list(page["data"])

        # Three batches of dead deliveries: a, then b and c (the recover's range), then d.
        await gw.publish("order.created", {}, id="a")
        await dead_rows(1)
        range_start = time.time()
        await gw.publish("order.created", {}, id="b")
        await gw.publish("order.created", {}, id="c")
        await dead_rows(3)
        range_end = time.time()
        await gw.publish("order.created", {}, id="d")
        rows = {r["event_id"]: r for r in await dead_rows(4)}
        healthy = True
        before = len(dead.requests)

        # Retry one delivery: it is sent again as attempt 3, and succeeds.
        retried = await gw.http.post(f"{gw.url}/api/v1/deliveries/{rows['a']['id']}/retry", headers=AUTH)
        await dead.wait_for(before + 1)
        a = await _until(gw, f"/deliveries/{rows['a']['id']}", lambda d: d["status"] == "succeeded")
        again = await gw.http.post(f"{gw.url}/api/v1/deliveries/{rows['a']['id']}/retry", headers=AUTH)
        await dead.wait_for(before + 2)

        # Recover the range: exactly b and c.
        recover = await gw.http.post(
            f"{gw.url}/api/v1/endpoints/dead/recover",
            json={"since": str(range_start), "until": str(range_end)},
            headers=AUTH,
        )
        job = await _until(gw, f"/jobs/{recover.json()['id']}", lambda j: j["state"] != "running")
        await dead.wait_for(before + 4)
        recovered = [r.json() for r in dead.requests[before + 2 :]]

        # Redrive the dead letters left (d): the dead-letter stream for the endpoint empties.
        redrive = await gw.http.post(f"{gw.url}/api/v1/endpoints/dead/redrive", headers=AUTH)
        redrive_job = await _until(gw, f"/jobs/{redrive.json()['id']}", lambda j: j["state"] != "running")
        await dead.wait_for(before + 5)
        final = await _until(
            gw,
            "/deliveries",
            lambda p: all(d["status"] == "succeeded" for d in p["data"]) and len(p["data"]) == 4,
            endpoint="dead",
        )
        left = await stream_messages(nats_server.url, "HOOKGATE_DEAD", "hookgate.dead.dead.>")
        unknown = await gw.http.post(
            f"{gw.url}/api/v1/endpoints/nope/recover", json={"since": "1h"}, headers=AUTH
        )
        bad = await gw.http.post(
            f"{gw.url}/api/v1/endpoints/dead/recover", json={"since": "yesterday"}, headers=AUTH
        )
        backwards = await gw.http.post(
            f"{gw.url}/api/v1/endpoints/dead/recover", json={"since": "1h", "until": "2h"}, headers=AUTH
        )

    assert retried.status_code == 202 and retried.json()["attempt"] == 3
    assert a["attempts"] == 3
    assert [x["attempt"] for x in a["attempt_log"]] == [1, 2, 3]
    assert again.status_code == 202 and again.json()["attempt"] == 4  # a resend of a delivered one
    assert [r.headers["hookgate-attempt"] for r in dead.requests[before : before + 2]] == ["3", "4"]

    assert recover.status_code == 202
    assert job["state"] == "succeeded" and job["requeued"] == 2, job
    assert sorted(r["type"] for r in recovered) == ["order.created"] * 2
    assert sorted(r.headers["webhook-id"] for r in dead.requests[before + 2 : before + 4]) == ["b", "c"]

    assert redrive.status_code == 202
    assert redrive_job["state"] == "succeeded" and redrive_job["requeued"] == 1, redrive_job
    assert dead.requests[before + 4].headers["webhook-id"] == "d"
    assert left == []
    assert {d["event_id"] for d in final["data"]} == {"a", "b", "c", "d"}

    assert unknown.status_code == 404
    assert bad.status_code == 422 and "$.since" in bad.json()["message"]
    assert backwards.status_code == 422 and "$.until" in backwards.json()["message"]


async def test_retry_of_a_delivery_on_its_way_is_refused(tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        receiver() as ok,
        receiver() as flaky,
        receiver() as dead,
        run_gateway(tmp_path, _config(nats_server.url, ok.url, flaky.url, dead.url)) as gw,
    ):
        disabled = await gw.http.post(f"{gw.url}/api/v1/endpoints/ok/disable", headers=AUTH)
        assert disabled.status_code == 200
        await gw.publish("order.created", {}, id="held-1")
        page = await _until(gw, "/deliveries", lambda p: len(p["data"]) == 1, endpoint="ok", status="held")
        refused = await gw.http.post(
            f"{gw.url}/api/v1/deliveries/{page['data'][0]['id']}/retry", headers=AUTH
        )
        missing = await gw.http.post(f"{gw.url}/api/v1/deliveries/dlv_missing/retry", headers=AUTH)
        wrong_method = await gw.http.get(
            f"{gw.url}/api/v1/deliveries/{page['data'][0]['id']}/retry", headers=AUTH
        )
    assert refused.status_code == 409 and refused.json()["error"] == "delivery_active"
    assert missing.status_code == 404
    assert wrong_method.status_code == 405
    assert ok.requests == []


async def test_retry_now_sends_a_retrying_deliverys_next_attempt_at_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with (
        receiver(_first_attempt_fails) as later,
        receiver() as limited,
        receiver() as off,
        receiver(lambda r, n: 500) as inline,
    ):
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              later: {{url: "{later.url}/in", retry: {{schedule: [1h, 1h], jitter: 0}}}}
              limited: {{url: "{limited.url}/in", rate_limit: {{rate: 1, per: 1h, burst: 1}}}}
              off: {{url: "{off.url}/in"}}
              inline: {{url: "{inline.url}/in", ordered: true, retry: {{schedule: [1h], jitter: 0}}}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:

            async def retry(delivery: str, query: str = "?now=true") -> Any:
                return await gw.http.post(f"{gw.url}/api/v1/deliveries/{delivery}/retry{query}", headers=AUTH)

            await gw.publish("x", {}, id="late", to=["later"])
            [first] = await later.wait_for(1)
            waiting = await _until(
                gw, "/deliveries", lambda p: _statuses(p) == {"later": "retrying"}, endpoint="later"
            )
            row = waiting["data"][0]
            plain = await retry(row["id"], "")
            bad_flag = await retry(row["id"], "?now=yes")
            async with trio.open_nursery() as nursery:  # a double click, or two replicas
                clicks: list[Any] = []
                for _ in range(2):
                    nursery.start_soon(lambda: _append(clicks, retry(row["id"])))
            second = (await later.wait_for(2))[1]
            settled = await _until(gw, f"/deliveries/{row['id']}", lambda d: d["status"] == "succeeded")
            schedules = await stream_messages(
                nats_server.url, "HOOKGATE_DELIVERIES", "hookgate.schedules.later.>"
            )
            again_now = await retry(row["id"])  # succeeded: nothing waits to be pulled forward
            again = await retry(row["id"], "")  # a plain retry resends it, with a fresh schedule
            third = (await later.wait_for(3))[2]
            with trio.move_on_after(0.5):
                await later.wait_for(4)

            await gw.publish("x", {}, id="first-in-the-hour", to=["limited"])
            await limited.wait_for(1)
            await gw.publish("x", {}, id="deferred", to=["limited"])
            pending = await _until(
                gw, "/deliveries", lambda p: len(p["data"]) == 1, endpoint="limited", status="pending"
            )
            pending_now = await retry(pending["data"][0]["id"])

            await gw.http.post(f"{gw.url}/api/v1/endpoints/off/disable", headers=AUTH)
            await gw.publish("x", {}, id="held", to=["off"])
            held = await _until(
                gw, "/deliveries", lambda p: len(p["data"]) == 1, endpoint="off", status="held"
            )
            held_now = await retry(held["data"][0]["id"])

            await gw.publish("x", {}, id="head", to=["inline"])
            head = await _until(
                gw, "/deliveries", lambda p: len(p["data"]) == 1, endpoint="inline", status="retrying"
            )
            head_now = await retry(head["data"][0]["id"])

    assert row["next_attempt_at"] > row["created_at"]  # an hour later
    assert (plain.status_code, plain.json()["error"]) == (409, "delivery_active")
    assert "now=true" in plain.json()["message"]
    assert bad_flag.status_code == 422 and "now" in bad_flag.json()["message"]
    assert sorted(c.status_code for c in clicks) == [202, 409]
    accepted = next(c.json() for c in clicks if c.status_code == 202)
    assert accepted == {
        "delivery": row["id"],
        "endpoint": "later",
        "attempt": 2,
        "status": "pending",
        "pulled_forward": True,
    }
    refused = next(c.json() for c in clicks if c.status_code == 409)
    # Refused while the pulled attempt is on its way, or once it has been delivered.
    assert refused["error"] in ("delivery_active", "not_retrying")
    # Sent at once instead of in an hour, as the next attempt of the same delivery, once.
    assert second.at - first.at < 30
    assert second.headers["hookgate-attempt"] == "2"
    assert second.headers["webhook-id"] == first.headers["webhook-id"] == "late"
    assert second.headers["hookgate-delivery-id"] == first.headers["hookgate-delivery-id"] == row["id"]
    assert [a["attempt"] for a in settled["attempt_log"]] == [1, 2]
    assert schedules == []  # nothing left to fire later
    assert (again_now.status_code, again_now.json()["error"]) == (409, "not_retrying")
    assert again.status_code == 202 and again.json()["pulled_forward"] is False
    assert again.json()["attempt"] == 3 and third.headers["hookgate-attempt"] == "3"
    assert len(later.requests) == 3
    assert (pending_now.status_code, pending_now.json()["error"]) == (409, "delivery_active")
    assert len(limited.requests) == 1
    assert (held_now.status_code, held_now.json()["error"]) == (409, "endpoint_disabled")
    assert "disabled" in held_now.json()["message"] and off.requests == []
    # An ordered endpoint retries its head in place, not by a schedule: nothing to pull forward.
    assert (head_now.status_code, head_now.json()["error"]) == (409, "ordered_endpoint")
    assert len(inline.requests) == 1


async def _append(into: list[Any], call: Any) -> None:
    into.append(await call)


async def test_a_refused_connection_is_reported_once(tmp_path: Path, nats_server: NatsServer) -> None:
    port = free_port()
    text = base_config(
        nats_server.url,
        f"""
        endpoints:
          down: {{url: "http://127.0.0.1:{port}/in", retry: {{schedule: []}}}}
        """,
    )
    async with run_gateway(tmp_path, text) as gw:
        await gw.publish("x", {}, to=["down"])
        page = await _until(gw, "/deliveries", lambda p: _statuses(p) == {"down": "dead"}, endpoint="down")
        detail = await _get(gw, f"/deliveries/{page['data'][0]['id']}")
    message = f"could not connect to 127.0.0.1:{port}: Connection refused"
    assert page["data"][0]["last_error"] == message
    [attempt] = detail["attempt_log"]
    assert attempt["error_kind"] == "connect" and attempt["error"] == message


def test_api_times_accept_durations_and_rfc3339() -> None:
    from hookgate.plugin_kit.units import parse_time

    assert parse_time("2026-11-27T04:00:00Z") == 1795752000.0
    assert parse_time("1795752000") == 1795752000.0
    assert parse_time("1h", now=1795752000.0) == 1795748400.0
    try:
        parse_time("yesterday")
    except ValueError as exc:
        assert "yesterday" in str(exc)
    else:
        raise AssertionError("parse_time accepted 'yesterday'")


async def test_a_long_attempt_shows_as_delivering(tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        receiver(lambda r, n: 3.0) as slow,  # hangs 3s, then answers 200
        receiver() as flaky,
        receiver() as dead,
        run_gateway(tmp_path, _config(nats_server.url, slow.url, flaky.url, dead.url)) as gw,
    ):
        await gw.publish("order.created", {}, id="slow-1")
        delivering = await _until(
            gw,
            "/deliveries",
            lambda p: [d["status"] for d in p["data"]] == ["delivering"],
            endpoint="ok",
        )
        now = await gw.http.post(
            f"{gw.url}/api/v1/deliveries/{delivering['data'][0]['id']}/retry?now=true", headers=AUTH
        )
        done = await _until(
            gw, "/deliveries", lambda p: [d["status"] for d in p["data"]] == ["succeeded"], endpoint="ok"
        )
    assert delivering["data"][0]["attempts"] == 1
    assert (now.status_code, now.json()["error"]) == (409, "delivery_active")
    assert done["data"][0]["attempts"] == 1
    assert len(slow.requests) == 1


async def test_secrets_never_appear_in_the_log_or_its_api(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.test_ingress import SECRET, signed

    token, whsec, api_key = (
        "tok-9f8e7d6c5b4a",
        "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LTEyMzQ1Ng==",
        "key-1a2b3c4d",
    )
    caplog.set_level(logging.DEBUG)
    async with receiver(lambda r, n: 500 if r.headers["hookgate-attempt"] == "1" else 200) as rx:
        text = base_config(
            nats_server.url,
            f"""
            sources:
              acme:
                verify: {{type: hmac, header: X-Acme-Signature, prefix: "sha256=", secret: {SECRET}}}
                event_type: header.X-Acme-Event
                event_id: header.X-Acme-Delivery
            endpoints:
              svc:
                url: {rx.url}/in
                auth: {{type: bearer, token: {token}}}
                signing: {{scheme: standard-webhooks, secret: "{whsec}"}}
                headers: {{X-Api-Key: {api_key}}}
                retry: {{schedule: [100ms], jitter: 0}}
            routes:
              - {{from: [acme], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            body = b'{"n": 1}'
            headers = {**signed(body, "s-1"), "Authorization": "Basic cHJvdmlkZXI6cGFzcw=="}
            assert (await gw.http.post(f"{gw.url}/webhooks/acme", content=body, headers=headers)).is_success
            await rx.wait_for(2)
            page = await _until(
                gw, "/deliveries", lambda p: [d["status"] for d in p["data"]] == ["succeeded"]
            )
            detail = await gw.http.get(f"{gw.url}/api/v1/deliveries/{page['data'][0]['id']}", headers=AUTH)
            event_id = page["data"][0]["event_id"]
            event = await gw.http.get(f"{gw.url}/api/v1/events/{event_id}", headers=AUTH)
            events = await gw.http.get(f"{gw.url}/api/v1/events", headers=AUTH)
    records = await stream_messages(nats_server.url, "HOOKGATE_LOG")
    stored = b"".join(m.data for m in records)
    # The receiver did get the credentials: they were sent, and only hidden from the log.
    assert rx.requests[0].headers["authorization"] == f"Bearer {token}"
    assert rx.requests[0].headers["x-api-key"] == api_key
    shown = detail.text + event.text + events.text + caplog.text
    for secret in (token, whsec, whsec.removeprefix("whsec_"), api_key, "cHJvdmlkZXI6cGFzcw==", SECRET):
        assert secret not in shown, secret
        assert secret.encode() not in stored, secret
    sent = dict(detail.json()["attempt_log"][0]["request_headers"])
    assert sent["Authorization"] == "***" and sent["X-Api-Key"] == "***"
    assert sent["webhook-signature"] == "***"
    received = dict(event.json()["headers"])
    assert received["authorization"] == "***" and received["x-acme-signature"] == "***"
    assert received["x-acme-event"] == "thing.created"
