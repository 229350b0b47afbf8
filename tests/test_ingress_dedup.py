"""`dedup: body` on a source, through a real gateway: a provider that signs only the body (GitHub)
cannot tell a replay under a fresh delivery id from a new event, so the body decides."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from tests.support import Gateway, NatsServer, base_config, receiver, run_gateway, stored_events

SECRET = "gh-s3cret"


def github_config(nats_url: str, receiver_url: str, dedup: str = "") -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          github:
            verify: {{type: github, secret: {SECRET}}}
            {dedup}
          plain:
            verify: {{type: hmac, header: X-Sig, secret: {SECRET}}}
            dedup: body
        endpoints:
          internal:
            url: {receiver_url}/hooks
        routes:
          - {{to: [internal]}}
        """,
    )


def github_headers(body: bytes, delivery: str) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
        "Content-Type": "application/json",
    }


async def _post(gw: Gateway, body: bytes, delivery: str) -> str:
    response = await gw.http.post(
        f"{gw.url}/webhooks/github", content=body, headers=github_headers(body, delivery)
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def test_a_replayed_body_with_a_fresh_delivery_id_is_a_duplicate_with_dedup_body(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    first, other = (
        b'{"ref": "refs/heads/main", "after": "abc"}',
        b'{"ref": "refs/heads/main", "after": "def"}',
    )
    async with (
        receiver() as rx,
        run_gateway(tmp_path, github_config(nats_server.url, rx.url, "dedup: body")) as gw,
    ):
        original = await _post(gw, first, "d-1")
        replayed = await _post(gw, first, "d-2")  # the same signed body, a delivery id of its own
        redelivered = await _post(gw, first, "d-1")  # GitHub's own "Redeliver"
        fresh = await _post(gw, other, "d-3")
        got = await rx.wait_for(2)
        stored = await stored_events(nats_server.url)
    assert replayed == redelivered == original
    assert fresh != original
    # Stored once, so delivered once: a duplicate never reaches the stream the router reads.
    assert [e.id for e in stored] == [original, fresh]
    assert [e.external_id for e in stored] == ["d-1", "d-3"]  # the provider's id is still kept
    assert sorted(r.body for r in got) == sorted([first, other])
    assert {r.headers["x-github-delivery"] for r in got} == {"d-1", "d-3"}


async def test_without_dedup_body_a_fresh_delivery_id_is_a_new_event(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    body = b'{"ref": "refs/heads/main"}'
    async with receiver() as rx, run_gateway(tmp_path, github_config(nats_server.url, rx.url)) as gw:
        original = await _post(gw, body, "d-1")
        replayed = await _post(gw, body, "d-2")
        again = await _post(gw, body, "d-1")
        await rx.wait_for(2)
        stored = await stored_events(nats_server.url)
    assert original != replayed
    assert again == original
    assert [e.id for e in stored] == [original, replayed]


async def test_dedup_body_works_for_a_source_without_an_event_id(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    body = b"not json at all"
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with receiver() as rx, run_gateway(tmp_path, github_config(nats_server.url, rx.url)) as gw:
        ids = []
        for _ in range(2):
            response = await gw.http.post(f"{gw.url}/webhooks/plain", content=body, headers={"X-Sig": digest})
            assert response.status_code == 202
            ids.append(response.json()["id"])
        (got,) = await rx.wait_for(1)
        stored = await stored_events(nats_server.url)
    assert ids[0] == ids[1]
    assert [e.id for e in stored] == [ids[0]]
    assert stored[0].external_id is None
    assert got.body == body
