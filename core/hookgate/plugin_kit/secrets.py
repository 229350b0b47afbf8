"""Shared secrets as verifier configs take them: `secret: "..."`, or a list while rotating."""

from __future__ import annotations


def check_secrets(secret: str | list[str]) -> None:
    """Refuse a `secret` option with no secret or an empty one; call it from a config's `__post_init__`.

    Raises ValueError with a message for the config error.
    """
    secrets = [secret] if isinstance(secret, str) else secret
    if not secrets:
        raise ValueError("secret: give at least one secret")
    if not all(secrets):
        # An empty key (say, from an unset `${VAR:-}`) would let anyone compute a valid signature.
        raise ValueError("secret must not be empty")


def secret_keys(secret: str | list[str]) -> list[bytes]:
    """The HMAC keys of a `secret` option (one or a list): each secret's UTF-8 bytes, in order."""
    secrets = [secret] if isinstance(secret, str) else secret
    return [s.encode() for s in secrets]
