"""The `github` verifier: GitHub's documented test vector, refusals, rotation, ping, and the real gateway.

There is no GitHub SDK for Python here, so the oracle is GitHub's own documented example (secret
"It's a Secret to Everybody", payload "Hello, World!") plus signatures computed independently with
Python's `hmac`. The verifier is built the way the gateway builds it: YAML through the config
loader, then the factory the plugin registered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from hookgate.broker.ids import event_id_for
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import HandshakeResponse, IngressRequest, Rejection
from tests.plugin_support import (
    assert_http_error,
    assert_problem,
    assert_rejection,
    ingress_request,
    load_error,
    load_verifier,
    nested,
)
from tests.support import NatsServer, base_config, receiver, run_gateway, stored_events

SECRET = "gh-s3cret"
BODY = b'{"ref": "refs/heads/main", "pusher": {"name": "Zo\xc3\xab"}, "commits": [1, 2]}\n'

# https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries#testing-the-webhook-payload-validation
DOCS_SECRET = "It's a Secret to Everybody"
DOCS_BODY = b"Hello, World!"
DOCS_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_verifier(hooks: Hooks, **options: Any) -> Any:
    return load_verifier(hooks, "gh", {"type": "github", **options})


def request(body: bytes = BODY, headers: dict[str, str] | None = None) -> IngressRequest:
    return ingress_request("gh", headers=headers or {}, body=body)


def sha256(secret: str, body: bytes = BODY) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def sha1(secret: str, body: bytes = BODY) -> str:
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def assert_rejected(result: Rejection | None, code: str) -> None:
    # Never the secret, nor the signature the verifier expected.
    assert_rejection(result, 401, code, never=[SECRET, sha256(SECRET).split("=")[1]])


# --- accepted signatures ---------------------------------------------------------------------


def test_githubs_documented_example_is_accepted(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=DOCS_SECRET)
    assert verifier.verify(request(DOCS_BODY, {"X-Hub-Signature-256": DOCS_SIGNATURE})) is None
    assert_rejected(
        verifier.verify(request(b"Hello, World?", {"X-Hub-Signature-256": DOCS_SIGNATURE})),
        "invalid_signature",
    )


def test_a_signature_computed_with_hmac_is_accepted_on_the_raw_bytes(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert verifier.verify(request(headers={"X-Hub-Signature-256": sha256(SECRET)})) is None
    upper = "sha256=" + sha256(SECRET).removeprefix("sha256=").upper()
    assert verifier.verify(request(headers={"x-hub-signature-256": upper})) is None
    # A re-serialisation of the same JSON is a different body.
    reserialised = json.dumps(json.loads(BODY)).encode()
    assert_rejected(
        verifier.verify(request(reserialised, {"X-Hub-Signature-256": sha256(SECRET)})), "invalid_signature"
    )


def test_non_utf8_bodies_are_verified_as_bytes(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    body = b"\xff\xfe\x00\x80 not text"
    assert verifier.verify(request(body, {"X-Hub-Signature-256": sha256(SECRET, body)})) is None
    assert_rejected(
        verifier.verify(request(body, {"X-Hub-Signature-256": sha256(SECRET)})), "invalid_signature"
    )


def test_any_secret_of_a_rotation_list_is_accepted(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=["old-secret", "new-secret"])
    for secret in ("old-secret", "new-secret"):
        assert verifier.verify(request(headers={"X-Hub-Signature-256": sha256(secret)})) is None, secret
    assert_rejected(
        verifier.verify(request(headers={"X-Hub-Signature-256": sha256("unrelated")})), "invalid_signature"
    )


# --- refusals ----------------------------------------------------------------------------------


def test_tampered_body_and_wrong_secret_are_invalid_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    good = {"X-Hub-Signature-256": sha256(SECRET)}
    assert_rejected(verifier.verify(request(BODY.replace(b"main", b"mainx"), good)), "invalid_signature")
    assert_rejected(verifier.verify(request(BODY + b" ", good)), "invalid_signature")
    assert_rejected(verifier.verify(request(b"", good)), "invalid_signature")
    wrong = {"X-Hub-Signature-256": sha256("not-the-secret")}
    assert_rejected(verifier.verify(request(headers=wrong)), "invalid_signature")


def test_missing_header_is_missing_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert_rejected(verifier.verify(request(headers={})), "missing_signature")
    assert_rejected(verifier.verify(request(headers={"X-Hub-Signature-256": ""})), "missing_signature")
    # Without legacy_sha1 a SHA-1 signature is not a signature at all.
    assert_rejected(verifier.verify(request(headers={"X-Hub-Signature": sha1(SECRET)})), "missing_signature")


@pytest.mark.parametrize(
    "value",
    [
        sha256(SECRET)[len("sha256=") :],  # no prefix
        "sha1=" + sha256(SECRET)[len("sha256=") :],  # wrong prefix
        "SHA256=" + sha256(SECRET)[len("sha256=") :],
        " " + sha256(SECRET),
        sha256(SECRET) + "\n",
        sha256(SECRET) + "00",  # too long
        sha256(SECRET)[:-2],  # truncated
        "sha256=",
        "sha256=" + "zz" * 32,  # not hex
        "sha256=" + "ab " * 21 + "a",  # hex with spaces, which bytes.fromhex would take
        "sha256=" + "a" * 100_000,  # absurdly long
        "sha256=" + "\xe9" * 64,  # non-ASCII (a latin-1 decoded header)
        "sha256=" + "\u0661" * 64,  # non-ASCII digits
        "\x00\x01garbage",
    ],
)
def test_malformed_signature_is_invalid_signature(hooks: Hooks, value: str) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert_rejected(verifier.verify(request(headers={"X-Hub-Signature-256": value})), "invalid_signature")


def test_legacy_sha1_only_when_enabled_and_never_as_a_downgrade(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET, legacy_sha1=True)
    assert verifier.verify(request(headers={"X-Hub-Signature": sha1(SECRET)})) is None
    assert verifier.verify(request(headers={"X-Hub-Signature-256": sha256(SECRET)})) is None
    assert_rejected(verifier.verify(request(headers={"X-Hub-Signature": sha1("wrong")})), "invalid_signature")
    assert_rejected(
        verifier.verify(request(headers={"X-Hub-Signature": "sha1=" + "ab" * 32})), "invalid_signature"
    )
    assert_rejected(
        verifier.verify(request(headers={"X-Hub-Signature": sha256(SECRET)})), "invalid_signature"
    )
    # A request with both headers is held to SHA-256: a valid SHA-1 does not rescue a bad SHA-256.
    both = {"X-Hub-Signature-256": sha256("wrong"), "X-Hub-Signature": sha1(SECRET)}
    assert_rejected(verifier.verify(request(headers=both)), "invalid_signature")
    assert_rejected(verifier.verify(request(headers={})), "missing_signature")


# --- defaults and the ping handshake -----------------------------------------------------------


def test_default_event_type_and_id_are_githubs_headers(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert verifier.default_event_type == "header.X-GitHub-Event"
    assert verifier.default_event_id == "header.X-GitHub-Delivery"


def test_ping_is_answered_200_with_json_and_other_events_are_not(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    answer = verifier.handshake(request(headers={"X-GitHub-Event": "ping"}))
    assert isinstance(answer, HandshakeResponse)
    assert answer.status == 200
    assert answer.content_type == "application/json"
    assert json.loads(answer.body) == {"ok": True, "event": "ping"}
    assert verifier.handshake(request(headers={"X-GitHub-Event": "push"})) is None
    assert verifier.handshake(request(headers={})) is None


def test_route_ping_leaves_ping_to_be_stored(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET, route_ping=True)
    assert verifier.handshake(request(headers={"X-GitHub-Event": "ping"})) is None


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "where", "word"),
    [
        (
            "type: github\nsecret: s\nlegacy_sha1: sometimes\n",
            "x.yaml:6: $.sources.gh.verify.legacy_sha1",
            "true or false",
        ),
        (
            "type: github\nsecret: s\nroute_ping: [1]\n",
            "x.yaml:6: $.sources.gh.verify.route_ping",
            "true or false",
        ),
        ("type: github\nsecret: s\nsha1: true\n", "x.yaml:6: $.sources.gh.verify.sha1", "unknown"),
        ("type: github\n", "x.yaml:3: $.sources.gh.verify", "secret"),
        ('type: github\nsecret: ""\n', "x.yaml:3: $.sources.gh.verify", "must not be empty"),
        ("type: github\nsecret: [a, 7]\n", "x.yaml:5: $.sources.gh.verify.secret[1]", "string"),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, word: str
) -> None:
    assert_problem(load_error(hooks, nested("sources:\n  gh:\n    verify:\n", block, 6)), where, word)


# --- through the real gateway ------------------------------------------------------------------


def github_config(nats_url: str, receiver_url: str, options: str = "") -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          github:
            verify: {{type: github, secret: [old-secret, {SECRET}]{options}}}
        endpoints:
          internal:
            url: {receiver_url}/hooks
            retry: {{schedule: [100ms]}}
        routes:
          - from: [github]
            to: [internal]
        """,
    )


def github_headers(body: bytes, event: str, delivery: str, secret: str = SECRET) -> dict[str, str]:
    return {
        "X-Hub-Signature-256": sha256(secret, body),
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/abc123",
    }


async def test_signed_push_is_stored_once_per_delivery_and_forwarded_unchanged(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    other = b'{"action": "opened"}'
    async with receiver() as rx, run_gateway(tmp_path, github_config(nats_server.url, rx.url)) as gw:
        url = f"{gw.url}/webhooks/github"
        first = await gw.http.post(url, content=BODY, headers=github_headers(BODY, "push", "d-1"))
        # GitHub's "redeliver" keeps the delivery id: answered 2xx, neither stored nor routed again.
        again = await gw.http.post(url, content=BODY, headers=github_headers(BODY, "push", "d-1"))
        rotated = await gw.http.post(
            url, content=other, headers=github_headers(other, "issues", "d-2", secret="old-secret")
        )
        got = await rx.wait_for(2)
    assert (first.status_code, again.status_code, rotated.status_code) == (202, 202, 202)
    assert first.json()["id"] == again.json()["id"] == event_id_for("github", "d-1")
    assert sorted(r.body for r in got) == sorted([BODY, other])
    push = next(r for r in got if r.body == BODY)
    assert push.headers["x-github-event"] == "push"
    assert push.headers["hookgate-event-id"] == event_id_for("github", "d-1")
    stored = await stored_events(nats_server.url)
    assert sorted((e.type, e.external_id, e.body) for e in stored) == sorted(
        [("push", "d-1", BODY), ("issues", "d-2", other)]
    )
    assert len(rx.requests) == 2


async def test_wrongly_signed_or_unsigned_requests_get_401_and_nothing_is_stored(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx, run_gateway(tmp_path, github_config(nats_server.url, rx.url)) as gw:
        url = f"{gw.url}/webhooks/github"
        wrong = await gw.http.post(url, content=BODY, headers=github_headers(BODY, "push", "d-1", "nope"))
        unsigned = await gw.http.post(url, content=BODY, headers={"X-GitHub-Event": "push"})
        garbage = await gw.http.post(
            url,
            content=b"\xff\xfe\x00",
            headers={b"X-Hub-Signature-256": b"sha256=" + b"\xe9" * 8000, b"X-GitHub-Event": b"push"},
        )
        unsigned_ping = await gw.http.post(url, content=b"{}", headers={"X-GitHub-Event": "ping"})
    assert_http_error(wrong, 401, "invalid_signature")
    assert_http_error(unsigned, 401, "missing_signature")
    assert_http_error(garbage, 401, "invalid_signature")
    assert_http_error(unsigned_ping, 401, "missing_signature")
    assert SECRET not in wrong.text
    assert await stored_events(nats_server.url) == []
    assert rx.requests == []


async def test_a_signed_ping_is_answered_and_neither_stored_nor_routed(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    ping = b'{"zen": "Keep it logically awesome.", "hook_id": 1}'
    async with receiver() as rx, run_gateway(tmp_path, github_config(nats_server.url, rx.url)) as gw:
        url = f"{gw.url}/webhooks/github"
        answer = await gw.http.post(url, content=ping, headers=github_headers(ping, "ping", "p-1"))
        # A push afterwards proves the pipeline was running while the ping was not routed.
        push = await gw.http.post(url, content=BODY, headers=github_headers(BODY, "push", "d-1"))
        (got,) = await rx.wait_for(1)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json() == {"ok": True, "event": "ping"}
    assert push.status_code == 202
    assert got.body == BODY
    stored = await stored_events(nats_server.url)
    assert [e.type for e in stored] == ["push"]


async def test_route_ping_stores_and_routes_the_ping(tmp_path: Path, nats_server: NatsServer) -> None:
    ping = b'{"zen": "Design for failure.", "hook_id": 1}'
    async with receiver() as rx:
        config = github_config(nats_server.url, rx.url, options=", route_ping: true")
        async with run_gateway(tmp_path, config) as gw:
            answer = await gw.http.post(
                f"{gw.url}/webhooks/github", content=ping, headers=github_headers(ping, "ping", "p-1")
            )
            (got,) = await rx.wait_for(1)
    assert answer.status_code == 202
    assert got.body == ping
    stored = await stored_events(nats_server.url)
    assert [(e.type, e.external_id) for e in stored] == [("ping", "p-1")]
