"""The `twilio` verifier, with Twilio's own `RequestValidator` as the oracle, and through the gateway.

Signatures are made with `RequestValidator(token).compute_signature`, and `RequestValidator.validate`
must agree with the verifier on what is accepted and refused, for form posts (with the documented
test vector), JSON bodies with `bodySHA256`, explicit default ports, and the SHA-256 variant.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from twilio.request_validator import RequestValidator, get_signature_algorithm

from hookgate.plugin_host.hooks import Hooks
from hookgate.types import IngressRequest, Rejection
from tests.plugin_support import (
    assert_http_error,
    assert_problem,
    assert_rejection,
    ingress_request,
    load_error,
    load_verifier,
    nested,
)
from tests.support import NatsServer, base_config, receiver, run_gateway, stream_messages

TOKEN = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
FORM = "application/x-www-form-urlencoded"
URL = "https://hooks.example.com/webhooks/twilio"
PARAMS = [
    ("MessageSid", "SM0123456789abcdef0123456789abcdef"),
    ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
    ("From", "+14155550100"),
    ("To", "+14155550199"),
    ("Body", "Héllo wörld & more = 100% 🎉"),
    ("NumMedia", "0"),
    ("FromCity", ""),
]

# Twilio's documented example (https://www.twilio.com/docs/usage/security#validating-requests).
VECTOR_TOKEN = "12345"
VECTOR_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
VECTOR_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}
VECTOR_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_verifier(hooks: Hooks, **options: Any) -> Any:
    """The verifier of `verify: {type: twilio, secret: TOKEN, **options}`."""
    return load_verifier(hooks, "twilio", {"type": "twilio", "secret": TOKEN, **options})


def request(
    url: str,
    body: bytes,
    signature: str | None,
    content_type: str | None = FORM,
    extra: dict[str, str] | None = None,
) -> IngressRequest:
    """A request as ingress builds it: `url` is scheme://Host-header/raw-path?query."""
    _, _, rest = url.partition("://")
    host, _, target = rest.partition("/")
    path, _, query = ("/" + target).partition("?")
    headers = [("host", host)]
    if content_type is not None:
        headers.append(("content-type", content_type))
    if signature is not None:
        headers.append(("x-twilio-signature", signature))
    headers += (extra or {}).items()
    return ingress_request("twilio", headers=headers, body=body, query=query.encode(), url=url, path=path)


class MultiDict(dict[str, list[str]]):
    """Form values as web frameworks hand them to RequestValidator (it calls `getall`)."""

    def getall(self, name: str) -> list[str]:
        return self[name]


def multidict(pairs: list[tuple[str, str]]) -> MultiDict:
    out = MultiDict()
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    return out


def form_signature(
    url: str, pairs: list[tuple[str, str]], token: str = TOKEN, algorithm: str | None = None
) -> str:
    return RequestValidator(token).compute_signature(url, multidict(pairs), algorithm)


def assert_rejected(result: Rejection | None, code: str) -> None:
    assert_rejection(result, 401, code, never=[TOKEN, OTHER, VECTOR_TOKEN, form_signature(URL, PARAMS)])


# --- the documented vector and SDK-signed requests -----------------------------------------------


def test_twilios_documented_test_vector(hooks: Hooks) -> None:
    validator = RequestValidator(VECTOR_TOKEN)
    assert validator.compute_signature(VECTOR_URL, VECTOR_PARAMS) == VECTOR_SIGNATURE
    # Computed independently: the URL, then each name followed by its value, sorted by name.
    data = VECTOR_URL + "".join(k + v for k, v in sorted(VECTOR_PARAMS.items()))
    digest = hmac.new(VECTOR_TOKEN.encode(), data.encode(), hashlib.sha1).digest()
    assert base64.b64encode(digest).decode() == VECTOR_SIGNATURE

    verifier = make_verifier(hooks, secret=VECTOR_TOKEN)
    body = urlencode(VECTOR_PARAMS).encode()
    assert verifier.verify(request(VECTOR_URL, body, VECTOR_SIGNATURE)) is None
    assert_rejected(
        verifier.verify(request(VECTOR_URL, body + b"&Digits=9", VECTOR_SIGNATURE)), "invalid_signature"
    )


def test_a_form_post_signed_by_the_sdk_is_accepted(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    url = URL + "?tenant=acme&x=a%20b"
    body = urlencode(PARAMS).encode()
    signature = form_signature(url, PARAMS)
    assert verifier.verify(request(url, body, signature)) is None
    assert verifier.verify(request(url, body, signature, content_type=FORM + "; charset=UTF-8")) is None


def test_the_parameter_order_in_the_body_does_not_matter(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    signature = form_signature(URL, PARAMS)
    body = urlencode(list(reversed(PARAMS))).encode()
    assert verifier.verify(request(URL, body, signature)) is None


def test_a_json_body_is_covered_by_body_sha256(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    body = b'{"event": "message.added", "data": {"body": "caf\xc3\xa9"}}'
    url = f"{URL}?bodySHA256={hashlib.sha256(body).hexdigest()}"
    signature = RequestValidator(TOKEN).compute_signature(url, {})
    assert RequestValidator(TOKEN).validate(url, body.decode(), signature)
    assert verifier.verify(request(url, body, signature, "application/json")) is None
    tampered = body.replace(b"added", b"removed")
    assert not RequestValidator(TOKEN).validate(url, tampered.decode(), signature)
    assert_rejected(
        verifier.verify(request(url, tampered, signature, "application/json")), "invalid_signature"
    )


def case_list() -> dict[str, tuple[str, bytes, str, str | None, dict[str, str]]]:
    """(URL, body, signature, content type, extra headers) around valid requests."""
    body = urlencode(PARAMS).encode()
    good = form_signature(URL, PARAMS)
    json_body = b'{"a": 1}'
    hashed = f"{URL}?bodySHA256={hashlib.sha256(json_body).hexdigest()}"
    json_sig = RequestValidator(TOKEN).compute_signature(hashed, {})
    repeated = [("To", "+2"), ("Media", "b"), ("Media", "a"), ("Media", "b"), ("A", "")]
    sha256 = {"X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"}
    return {
        "valid form": (URL, body, good, FORM, {}),
        "form, other token": (URL, body, form_signature(URL, PARAMS, OTHER), FORM, {}),
        "form, value changed": (URL, body.replace(b"0199", b"0198"), good, FORM, {}),
        "form, parameter added": (URL, body + b"&Extra=1", good, FORM, {}),
        "form, parameter dropped": (URL, urlencode(PARAMS[1:]).encode(), good, FORM, {}),
        "form, another URL": (URL + "2", body, good, FORM, {}),
        "form, a query added": (URL + "?a=1", body, good, FORM, {}),
        "form, http instead of https": ("http" + URL[5:], body, good, FORM, {}),
        "repeated names": (URL, urlencode(repeated).encode(), form_signature(URL, repeated), FORM, {}),
        "repeated names, one value dropped": (
            URL,
            urlencode(repeated[:2]).encode(),
            form_signature(URL, repeated),
            FORM,
            {},
        ),
        "port 443 signed, none requested": (
            URL,
            body,
            form_signature(URL.replace(".com/", ".com:443/"), PARAMS),
            FORM,
            {},
        ),
        "none signed, port 443 requested": (URL.replace(".com/", ".com:443/"), body, good, FORM, {}),
        "port 80 signed, none requested (http)": (
            "http" + URL[5:],
            body,
            form_signature("http" + URL[5:].replace(".com/", ".com:80/"), PARAMS),
            FORM,
            {},
        ),
        "port 8443 requested, none signed": (URL.replace(".com/", ".com:8443/"), body, good, FORM, {}),
        "port 8443 signed, 443 requested": (
            URL.replace(".com/", ".com:443/"),
            body,
            form_signature(URL.replace(".com/", ".com:8443/"), PARAMS),
            FORM,
            {},
        ),
        "valid JSON": (hashed, json_body, json_sig, "application/json", {}),
        "JSON, body changed": (hashed, b'{"a": 2}', json_sig, "application/json", {}),
        "JSON, hash changed in the URL": (hashed[:-1] + "0", json_body, json_sig, "application/json", {}),
        "JSON, other token": (
            hashed,
            json_body,
            RequestValidator(OTHER).compute_signature(hashed, {}),
            "application/json",
            {},
        ),
        "SHA-256 settings": (URL, body, form_signature(URL, PARAMS, algorithm="HMAC_SHA256"), FORM, sha256),
        "SHA-256 signature, no settings": (
            URL,
            body,
            form_signature(URL, PARAMS, algorithm="HMAC_SHA256"),
            FORM,
            {},
        ),
        "SHA-1 signature, SHA-256 settings": (URL, body, good, FORM, sha256),
        "unsupported algorithm": (
            URL,
            body,
            good,
            FORM,
            {"X-Twilio-Webhooks-Signature-Settings": "algorithm=MD5"},
        ),
        "padding dropped": (URL, body, good.rstrip("="), FORM, {}),
        "lowercased": (URL, body, good.lower(), FORM, {}),
    }


@pytest.mark.parametrize("case", list(case_list()))
def test_the_verifier_agrees_with_twilios_request_validator(hooks: Hooks, case: str) -> None:
    url, body, signature, content_type, extra = case_list()[case]
    ours = make_verifier(hooks).verify(request(url, body, signature, content_type, extra))
    params: Any = (
        body.decode()
        if content_type == "application/json"
        else multidict(parse_qsl(body.decode(), keep_blank_values=True))
    )
    algorithm = get_signature_algorithm(extra.get("X-Twilio-Webhooks-Signature-Settings"))
    theirs = RequestValidator(TOKEN).validate(url, params, signature, algorithm)
    assert (ours is None) == theirs, f"{case}: verifier said {ours!r}, RequestValidator says {theirs}"
    if ours is not None:
        assert_rejected(ours, "invalid_signature")


# --- ports, proxies, rotation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signed_for", "requested"),
    [
        ("https://host.example/path", "https://host.example:443/path"),
        ("https://host.example:443/path", "https://host.example/path"),
        ("http://host.example/path?x=1", "http://host.example:80/path?x=1"),
        ("http://host.example:80/path?x=1", "http://host.example/path?x=1"),
    ],
)
def test_an_explicit_default_port_is_tolerated_both_ways(
    hooks: Hooks, signed_for: str, requested: str
) -> None:
    body = urlencode(PARAMS).encode()
    signature = form_signature(signed_for, PARAMS)
    assert RequestValidator(TOKEN).validate(requested, multidict(PARAMS), signature)
    assert make_verifier(hooks).verify(request(requested, body, signature)) is None


def test_public_url_is_what_is_verified_behind_a_proxy(hooks: Hooks) -> None:
    public = "https://hooks.example.com/webhooks/twilio"
    arrived = "http://127.0.0.1:8123/webhooks/tw?tenant=acme"
    body = urlencode(PARAMS).encode()
    signature = form_signature(public + "?tenant=acme", PARAMS)
    behind_proxy = make_verifier(hooks, public_url=public)
    assert behind_proxy.verify(request(arrived, body, signature)) is None
    # The public URL's explicit port is tolerated as well.
    assert (
        make_verifier(hooks, public_url="https://hooks.example.com:443/webhooks/twilio").verify(
            request(arrived, body, signature)
        )
        is None
    )
    # Without public_url, the URL that reached hookgate is not the one Twilio signed.
    assert_rejected(make_verifier(hooks).verify(request(arrived, body, signature)), "invalid_signature")
    # The query string is the request's own: a changed one fails.
    changed = arrived.replace("acme", "evil")
    assert_rejected(behind_proxy.verify(request(changed, body, signature)), "invalid_signature")
    # And without a query, the public URL alone is signed.
    plain = form_signature(public, PARAMS)
    assert behind_proxy.verify(request("http://127.0.0.1:8123/webhooks/tw", body, plain)) is None


def test_public_url_with_body_sha256(hooks: Hooks) -> None:
    public = "https://hooks.example.com/webhooks/twilio"
    body = b'{"a": [1, 2]}'
    query = f"bodySHA256={hashlib.sha256(body).hexdigest()}"
    signature = RequestValidator(TOKEN).compute_signature(f"{public}?{query}", {})
    verifier = make_verifier(hooks, public_url=public)
    arrived = f"http://127.0.0.1:8123/webhooks/tw?{query}"
    assert verifier.verify(request(arrived, body, signature, "application/json")) is None


def test_any_token_of_a_rotation_list_is_accepted(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=[OTHER, TOKEN])
    body = urlencode(PARAMS).encode()
    for token in (TOKEN, OTHER):
        assert verifier.verify(request(URL, body, form_signature(URL, PARAMS, token))) is None
    retired = form_signature(URL, PARAMS, "retired-token")
    assert_rejected(verifier.verify(request(URL, body, retired)), "invalid_signature")


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  "])
def test_a_missing_or_empty_header_is_missing_signature(hooks: Hooks, value: str | None) -> None:
    body = urlencode(PARAMS).encode()
    assert_rejected(make_verifier(hooks).verify(request(URL, body, value)), "missing_signature")


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "not base64!",
        "====",
        "t=1,v1=abc",
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ",
        "é" * 28,
        "A" * 100_000,
        "\x00\x01",
        "\udcff",
    ],
)
def test_a_malformed_header_is_invalid_signature_never_an_error(hooks: Hooks, value: str) -> None:
    body = urlencode(PARAMS).encode()
    assert_rejected(make_verifier(hooks).verify(request(URL, body, value)), "invalid_signature")


def test_a_huge_settings_header_is_refused(hooks: Hooks) -> None:
    body = urlencode(PARAMS).encode()
    extra = {"X-Twilio-Webhooks-Signature-Settings": "key=x," * 50_000}
    result = make_verifier(hooks).verify(request(URL, body, form_signature(URL, PARAMS), FORM, extra))
    assert_rejected(result, "invalid_signature")


def test_a_non_utf8_body_is_refused_never_an_error(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    good = form_signature(URL, PARAMS)
    assert_rejected(verifier.verify(request(URL, b"Body=\xff\xfe&From=x", good)), "invalid_signature")
    assert_rejected(verifier.verify(request(URL, b"Body=%ff%fe", good)), "invalid_signature")
    # A binary body covered by bodySHA256 is verified on its bytes.
    blob = b"\x00\xff\xfe binary"
    url = f"{URL}?bodySHA256={hashlib.sha256(blob).hexdigest()}"
    signature = RequestValidator(TOKEN).compute_signature(url, {})
    assert verifier.verify(request(url, blob, signature, "application/octet-stream")) is None
    assert_rejected(
        verifier.verify(request(url, blob + b"!", signature, "application/octet-stream")), "invalid_signature"
    )


def test_a_body_the_signature_does_not_cover_is_refused(hooks: Hooks) -> None:
    # Twilio's validator, given no params, checks only the URL; the body would go unchecked.
    verifier = make_verifier(hooks)
    url_only = RequestValidator(TOKEN).compute_signature(URL, {})
    assert_rejected(
        verifier.verify(request(URL, b'{"forged": true}', url_only, "application/json")), "invalid_signature"
    )
    assert_rejected(verifier.verify(request(URL, b"Body=hi", url_only, None)), "invalid_signature")
    # An empty body has nothing to cover.
    assert verifier.verify(request(URL, b"", url_only, None)) is None
    assert verifier.verify(request(URL, b"", url_only, FORM)) is None


@pytest.mark.parametrize(
    "url",
    ["http://[::1/webhooks/twilio", "http://host:99999/webhooks/twilio", "http://host:abc/webhooks/twilio"],
)
def test_a_garbage_host_header_is_invalid_signature_never_an_error(hooks: Hooks, url: str) -> None:
    body = urlencode(PARAMS).encode()
    assert_rejected(
        make_verifier(hooks).verify(request(url, body, form_signature(URL, PARAMS))), "invalid_signature"
    )


def test_the_default_event_id_is_the_idempotency_token(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    assert verifier.default_event_id == "header.I-Twilio-Idempotency-Token"
    assert verifier.default_event_type is None


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "where", "word"),
    [
        (
            "type: twilio\nsecret: t\npublic_url: ftp://example.com/x\n",
            "x.yaml:6: $.sources.twilio.verify.public_url",
            "ftp",
        ),
        (
            "type: twilio\nsecret: t\npublic_url: https://example.com/x?a=1\n",
            "x.yaml:6: $.sources.twilio.verify.public_url",
            "?a=1",
        ),
        (
            "type: twilio\nsecret: t\npublic_url: /webhooks/twilio\n",
            "x.yaml:6: $.sources.twilio.verify.public_url",
            "/webhooks",
        ),
        ("type: twilio\nsecret: t\npublic_url: 42\n", "x.yaml:6: $.sources.twilio.verify.public_url", "42"),
        (
            "type: twilio\nsecret: t\npublicurl: https://a/b\n",
            "x.yaml:6: $.sources.twilio.verify.publicurl",
            "public_url",
        ),
        ("type: twilio\nsecret: ''\n", "x.yaml:5: $.sources.twilio.verify.secret", "length"),
        ("type: twilio\nsecret: []\n", "x.yaml:5: $.sources.twilio.verify.secret", "length"),
        ("type: twilio\nsecret: [a, '']\n", "x.yaml:5: $.sources.twilio.verify.secret[1]", "length"),
        ("type: twilio\nsecret: 12345\n", "x.yaml:5: $.sources.twilio.verify.secret", "12345"),
        ("type: twilio\n", "x.yaml:3: $.sources.twilio.verify", "secret"),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, word: str
) -> None:
    assert_problem(load_error(hooks, nested("sources:\n  twilio:\n    verify:\n", block, 6)), where, word)


# --- through the gateway -------------------------------------------------------------------------

PUBLIC = "https://hooks.example.com/twilio/sms"


def gateway_config(nats_url: str, receiver_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          tw:
            verify: {{type: twilio, secret: "{TOKEN}", public_url: "{PUBLIC}"}}
            event_type: twilio.sms
          twdirect:
            verify: {{type: twilio, secret: "{TOKEN}"}}
        endpoints:
          sms:
            url: {receiver_url}/sms
            retry: {{schedule: [100ms]}}
        routes:
          - from: [tw, twdirect]
            to: [sms]
        """,
    )


async def test_through_the_gateway_signed_once_stored_once_and_forged_refused(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    body = urlencode(PARAMS).encode()
    later = urlencode([*PARAMS[:4], ("Body", "second")]).encode()
    async with receiver() as rx, run_gateway(tmp_path, gateway_config(nats_server.url, rx.url)) as gw:

        async def post(source: str, content: bytes, signature: str, token: str, query: str = "") -> Any:
            return await gw.http.post(
                f"{gw.url}/webhooks/{source}{query}",
                content=content,
                headers={
                    "Content-Type": FORM,
                    "X-Twilio-Signature": signature,
                    "I-Twilio-Idempotency-Token": token,
                },
            )

        forged = await post("tw", body, form_signature(PUBLIC + "?n=1", PARAMS, OTHER), "tok-0", "?n=1")
        wrong_url = await post(
            "tw", body, form_signature(f"{gw.url}/webhooks/tw?n=1", PARAMS), "tok-0", "?n=1"
        )
        assert_http_error(forged, 401, "invalid_signature")
        assert wrong_url.status_code == 401
        assert await stream_messages(nats_server.url, "HOOKGATE_EVENTS") == []

        # Behind a proxy: signed for the public URL, with the request's query string.
        signature = form_signature(PUBLIC + "?n=1", PARAMS)
        accepted = await post("tw", body, signature, "tok-1", "?n=1")
        # Twilio retries with the same idempotency token: answered 2xx, stored once.
        retried = await post("tw", body, signature, "tok-1", "?n=1")
        # Straight to hookgate: signed for the URL it was addressed to (the Host header httpx sends).
        direct = await post(
            "twdirect",
            later,
            form_signature(f"{gw.url}/webhooks/twdirect", [*PARAMS[:4], ("Body", "second")]),
            "tok-2",
        )
        assert [r.status_code for r in (accepted, retried, direct)] == [202, 202, 202]
        assert accepted.json()["id"] == retried.json()["id"] != direct.json()["id"]

        got = await rx.wait_for(2)
        stored = await stream_messages(nats_server.url, "HOOKGATE_EVENTS")
    assert len(stored) == 2
    assert len(rx.requests) == 2
    by_source = {r.headers["hookgate-source"]: r for r in got}
    assert by_source["tw"].body == body
    assert by_source["twdirect"].body == later
    assert by_source["tw"].headers["x-twilio-signature"] == signature
    assert by_source["tw"].headers["content-type"] == FORM
