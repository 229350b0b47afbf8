"""The internal publish API: bearer tokens, validation errors, idempotency keys."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.support import NatsServer, base_config, receiver, run_gateway


def _config(nats_url: str, receiver_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        endpoints:
          svc: {{url: "{receiver_url}/in"}}
        routes:
          - {{from: [internal], to: [svc]}}
        """,
    )


async def test_tokens_are_required_and_checked(tmp_path: Path, nats_server: NatsServer) -> None:
    async with run_gateway(tmp_path, _config(nats_server.url, "http://127.0.0.1:9")) as gw:
        missing = await gw.http.post(f"{gw.url}/api/v1/events", json={"type": "a", "data": {}})
        wrong = await gw.publish("a", {}, token="not-the-token")
        right = await gw.publish("a", {})
    assert missing.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    assert wrong.status_code == 403
    assert wrong.json()["error"] == "forbidden"
    assert "not-the-token" not in wrong.text
    assert right.status_code == 202


async def test_the_bearer_scheme_is_case_insensitive(tmp_path: Path, nats_server: NatsServer) -> None:
    # RFC 9110, 11.1: auth schemes are case-insensitive; the token itself is not.
    async with run_gateway(tmp_path, _config(nats_server.url, "http://127.0.0.1:9")) as gw:

        async def get(authorization: str) -> int:
            headers = {"Authorization": authorization}
            return (await gw.http.get(f"{gw.url}/api/v1/endpoints", headers=headers)).status_code

        statuses = {
            value: await get(value)
            for value in (
                "Bearer test-token",
                "bearer test-token",
                "BEARER test-token",
                "bEaReR  test-token",
                "Bearer TEST-TOKEN",
                "Bearer",
                "Basic test-token",
                "Bearertest-token",
            )
        }
    assert statuses == {
        "Bearer test-token": 200,
        "bearer test-token": 200,
        "BEARER test-token": 200,
        "bEaReR  test-token": 200,
        "Bearer TEST-TOKEN": 403,
        "Bearer": 401,
        "Basic test-token": 401,
        "Bearertest-token": 401,
    }


async def test_invalid_events_get_4xx_with_the_path(tmp_path: Path, nats_server: NatsServer) -> None:
    async with run_gateway(tmp_path, _config(nats_server.url, "http://127.0.0.1:9")) as gw:
        auth = {"Authorization": "Bearer test-token"}
        not_json = await gw.http.post(f"{gw.url}/api/v1/events", content=b"{nope", headers=auth)
        no_type = await gw.http.post(f"{gw.url}/api/v1/events", json={"data": {}}, headers=auth)
        bad_to = await gw.http.post(
            f"{gw.url}/api/v1/events", json={"type": "a", "data": 1, "to": "svc"}, headers=auth
        )
        unknown = await gw.http.post(
            f"{gw.url}/api/v1/events", json={"type": "a", "data": 1, "x": 2}, headers=auth
        )
        deep = b'{"type": "a", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        too_deep = await gw.http.post(f"{gw.url}/api/v1/events", content=deep, headers=auth)
        wrong_method = await gw.http.delete(f"{gw.url}/api/v1/events", headers=auth)
        elsewhere = await gw.http.get(f"{gw.url}/nothing-here")
    assert not_json.status_code == 400
    assert too_deep.status_code == 400 and "nested too deeply" in too_deep.json()["message"]
    assert no_type.status_code == 422 and "type" in no_type.json()["message"]
    assert bad_to.status_code == 422 and "$.to" in bad_to.json()["message"]
    assert unknown.status_code == 422 and "x" in unknown.json()["message"]
    assert wrong_method.status_code == 405
    assert elsewhere.status_code == 404


async def test_every_request_body_names_the_path_of_what_is_missing(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    auth = {"Authorization": "Bearer test-token"}
    url = "http://127.0.0.1:9/in"
    async with run_gateway(tmp_path, _config(nats_server.url, url)) as gw:

        async def call(method: str, path: str, body: object) -> str:
            response = await gw.http.request(method, f"{gw.url}/api/v1{path}", json=body, headers=auth)
            assert response.status_code == 422, response.text
            return str(response.json()["message"])

        created = await gw.http.post(
            f"{gw.url}/api/v1/endpoints", json={"name": "made", "url": url}, headers=auth
        )
        assert created.status_code == 201, created.text
        messages = {
            "event without type": await call("POST", "/events", {"data": {}}),
            "event without data": await call("POST", "/events", {"type": "a"}),
            "event with an unknown key": await call("POST", "/events", {"type": "a", "data": 1, "x": 2}),
            "event not an object": await call("POST", "/events", ["a"]),
            "endpoint without name": await call("POST", "/endpoints", {"url": url}),
            "endpoint without url": await call("POST", "/endpoints", {"name": "x"}),
            "endpoint without scheme": (
                await call("POST", "/endpoints", {"name": "x", "url": url, "signing": {"secret": "s"}})
            ).partition(" (installed")[0],  # then the signers installed here
            "patch removing url": await call("PATCH", "/endpoints/made", {"url": None}),
            "recover without since": await call("POST", "/endpoints/svc/recover", {}),
            "recover not an object": await call("POST", "/endpoints/svc/recover", "1h"),
        }
    assert messages == {
        "event without type": "Object missing required field `type` - at `$.type`",
        "event without data": "Object missing required field `data` - at `$.data`",
        "event with an unknown key": "Object contains unknown field `x` - at `$.x`",
        "event not an object": "Expected `object`, got `array` - at `$`",
        "endpoint without name": '$.name: missing required key "name"',
        "endpoint without url": "$.url: set exactly one of url or subject",
        "endpoint without scheme": '$.signing.scheme: missing required key "scheme"',
        "patch removing url": "$.url: set exactly one of url or subject",
        "recover without since": "Object missing required field `since` - at `$.since`",
        "recover not an object": "Expected `object`, got `str` - at `$`",
    }


async def test_event_id_is_an_idempotency_key(tmp_path: Path, nats_server: NatsServer) -> None:
    async with receiver() as rx, run_gateway(tmp_path, _config(nats_server.url, rx.url)) as gw:
        first = await gw.publish("order.created", {"n": 1}, id="order-1-created")
        second = await gw.publish("order.created", {"n": 1}, id="order-1-created")
        other = await gw.publish("order.created", {"n": 2}, id="order-2-created")
        await rx.wait_for(2)
        with trio.move_on_after(0.5):
            await rx.wait_for(3)
    assert first.json() == second.json() == {"id": "order-1-created"}
    assert other.json() == {"id": "order-2-created"}
    assert sorted(r.headers["webhook-id"] for r in rx.requests) == ["order-1-created", "order-2-created"]


async def test_ids_and_types_with_unsafe_characters_are_refused(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with run_gateway(tmp_path, _config(nats_server.url, "http://127.0.0.1:9")) as gw:
        newline_id = await gw.publish("a", {}, id="x\r\nNats-Msg-Id: y")
        spaced_type = await gw.publish("a b", {})
        empty_type = await gw.publish("", {})
    assert newline_id.status_code == 422 and "$.id" in newline_id.json()["message"]
    assert spaced_type.status_code == 422 and "$.type" in spaced_type.json()["message"]
    assert empty_type.status_code == 422
