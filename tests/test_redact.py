"""Redaction of credential headers before they are shown or recorded."""

from __future__ import annotations

import pytest

from hookgate.redact import REDACTED, is_secret_header, redact_headers


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
        ("Authorization", REDACTED),
        ("x-n", "1"),
    ]
