"""Redaction of secrets in endpoint configs and of credential headers."""

from __future__ import annotations

import pytest

from hookgate.observe.redact import (
    PLACEHOLDER,
    is_secret_header,
    placeholders,
    redact,
    redact_headers,
    redact_text,
    without_password,
)


def test_secret_keys_headers_and_url_passwords_are_redacted() -> None:
    config = {
        "url": "https://user:pw@hooks.example/in",
        "proxy": "http://proxy.example:3128",
        "headers": {"Authorization": "Bearer a", "X-Api-Key": "b", "X-Team": "billing"},
        "signing": {
            "scheme": "standard-webhooks",
            "secrets": [{"secret": "whsec_abc", "expires": "2026-01-01T00:00:00Z"}, {"secret": "whsec_def"}],
            "private_key": ["whsk_xyz"],
        },
        "auth": {"type": "oauth2", "client_id": "hookgate", "client_secret": "c", "token_url": "https://t/x"},
        "retry": {"schedule": ["5s"]},
        "timeout": "5s",
    }
    assert redact(config) == {
        "url": "https://user:***@hooks.example/in",
        "proxy": "http://proxy.example:3128",
        "headers": {"Authorization": "***", "X-Api-Key": "***", "X-Team": "billing"},
        "signing": {
            "scheme": "standard-webhooks",
            "secrets": [{"secret": "whsec_***", "expires": "2026-01-01T00:00:00Z"}, {"secret": "whsec_***"}],
            "private_key": ["whsk_***"],
        },
        "auth": {
            "type": "oauth2",
            "client_id": "hookgate",
            "client_secret": "***",
            "token_url": "https://t/x",
        },
        "retry": {"schedule": ["5s"]},
        "timeout": "5s",
    }
    assert config["signing"]["secrets"][0]["secret"] == "whsec_abc"  # type: ignore[index]  # a copy


def test_placeholders_sent_back_are_found() -> None:
    sent_back = {
        "signing": {"secret": "whsec_***"},
        "headers": {"X-Api-Key": "***", "X-Team": "***"},
        "auth": {"type": "bearer", "token": "real"},
    }
    assert placeholders(sent_back) == ["$.signing.secret", "$.headers.X-Api-Key"]
    assert placeholders({"auth": {"type": "basic", "password": "fine"}}) == []


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "proxy-authorization",
        "Cookie",
        "X-Api-Key",
        "x-auth-token",
        "Stripe-Signature",
        "X-Hub-Signature-256",
        "X-Shopify-Hmac-Sha256",
        "webhook-signature",
        "X-Client-Secret",
        "X-Password",
    ],
)
def test_credential_headers_are_secret(name: str) -> None:
    assert is_secret_header(name)


@pytest.mark.parametrize(
    "name", ["content-type", "webhook-id", "user-agent", "hookgate-attempt", "X-GitHub-Event"]
)
def test_ordinary_headers_are_kept(name: str) -> None:
    assert not is_secret_header(name)


def test_redact_keeps_names_and_order_and_hides_only_values() -> None:
    headers = [("content-type", "application/json"), ("Authorization", "Bearer s3cr3t"), ("x-n", "1")]
    assert redact_headers(headers) == [
        ("content-type", "application/json"),
        ("Authorization", PLACEHOLDER),
        ("x-n", "1"),
    ]


def test_error_text_hides_credential_headers_unsendable_values_and_url_passwords() -> None:
    headers = [
        ("Authorization", "Bearer tok-abc"),
        ("X-Note", "a\x01tok-def"),
        ("X-Team", "billing"),
        ("X-Api-Key-Version", "5"),  # too short to be a credential: "HTTP 502" stays readable
    ]
    url = "https://hookgate:p%40ss-word@hooks.example/in"
    text = (
        "HTTP 502; sent Bearer tok-abc; illegal header value 'a\\x01tok-def' b'a\\x01tok-def'; "
        "refused https://hookgate:p%40ss-word@hooks.example/in (p@ss-word); team billing"
    )
    assert redact_text(text, headers, url) == (
        f"HTTP 502; sent {PLACEHOLDER}; illegal header value '{PLACEHOLDER}' b'{PLACEHOLDER}'; "
        f"refused https://hookgate:{PLACEHOLDER}@hooks.example/in ({PLACEHOLDER}); team billing"
    )
    assert redact_text("no secrets here", headers) == "no secrets here"


def test_without_password_shows_the_user_and_hides_the_password() -> None:
    assert without_password("http://user:pw@h.example:8/x?q=1") == "http://user:***@h.example:8/x?q=1"
    assert without_password("http://h.example/x") == "http://h.example/x"
    assert without_password("nats://a:b@n1:4222") == "nats://a:***@n1:4222"


def test_a_redacted_url_password_sent_back_is_found() -> None:
    shown = redact({"url": "https://user:pw@hooks.example/in", "proxy": "http://proxy.example:3128"})
    assert placeholders(shown) == ["$.url"]
