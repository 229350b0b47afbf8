"""Redaction of secrets in endpoint configs."""

from __future__ import annotations

from hookgate.redact import placeholders, redact


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
