"""What connecting needs around nats-py: the settings, the client's keyword arguments, the
credential files checked before nats-py reads them, and a server's refusal put in words the user
can act on."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from typing import Any

import nkeys

from hookgate.broker.messages import BrokerRefused

# How nats-py's error callback words a publish or subscription the server refused.
PERMISSIONS_VIOLATION = "permissions violation"


@dataclass(frozen=True)
class ConnectOptions:
    servers: list[str]
    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls: ssl.SSLContext | None = None
    name: str = "hookgate"
    # The oldest nats-server version that has what we use, and what that is (for the message).
    min_server_version: tuple[int, int, int] | None = None
    min_server_needs: str = ""


def client_options(o: ConnectOptions) -> dict[str, Any]:
    """nats-py's connect() arguments for these settings, without the callbacks."""
    kwargs: dict[str, Any] = {
        "servers": o.servers,
        "name": o.name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        # Keep publishing through short outages from a buffer rather than failing at once.
        "pending_size": 64 * 1024 * 1024,
    }
    if o.token:
        kwargs["token"] = o.token
    if o.user:
        kwargs["user"] = o.user
        kwargs["password"] = o.password
    if o.creds_file:
        kwargs["user_credentials"] = o.creds_file
    if o.nkey_seed_file:
        # The path, not the seed: nats-py reads the file whenever it signs a server's nonce.
        kwargs["nkeys_seed"] = o.nkey_seed_file
    if o.tls is not None:
        kwargs["tls"] = o.tls
    return kwargs


def check_credential_files(o: ConnectOptions) -> None:
    """Refuse unreadable or malformed credential files before nats-py reads them: it would loop
    for ever on a creds file without a JWT, and report a bad seed without saying which file."""
    if o.nkey_seed_file:
        seed = _read_secret("broker.nkey_seed", o.nkey_seed_file).strip()
        _check_seed("broker.nkey_seed", o.nkey_seed_file, seed, "holds nothing else")
    if o.creds_file:
        text = _read_secret("broker.creds", o.creds_file)
        jwt_block = re.search(r"-----BEGIN NATS USER JWT-----\s*\n\s*(\S+)", text)
        seed_block = re.search(r"-----BEGIN USER NKEY SEED-----\s*\n\s*(\S+)", text)
        if jwt_block is None or seed_block is None:
            raise BrokerRefused(
                f"broker.creds: {o.creds_file} is not a NATS credentials file (it needs a "
                "'BEGIN NATS USER JWT' and a 'BEGIN USER NKEY SEED' block, as nsc writes them)"
            )
        _check_seed("broker.creds", o.creds_file, seed_block.group(1), "in its seed block")


def _read_secret(key: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise BrokerRefused(f"{key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BrokerRefused(f"{key}: {path} is not a text file") from None


def _check_seed(key: str, path: str, seed: str, where: str) -> None:
    # The seed is never part of a message, not even in part.
    try:
        role, _ = nkeys.decode_seed(bytearray(seed.encode()))
    except (nkeys.NkeysError, ValueError):
        role = None
    if role != nkeys.PREFIX_BYTE_USER:
        raise BrokerRefused(
            f"{key}: {path} does not hold a user nkey seed (one line starting with SU, {where})"
            if role is None
            else f"{key}: the seed in {path} is not a user's (its role is not U: use a user nkey)"
        )


def refusal(exc: BaseException, o: ConnectOptions) -> str | None:
    """What a server that refused us said, for the user to act on; None for other failures."""
    servers = ", ".join(redact(s) for s in o.servers)
    text = str(exc)
    lowered = text.lower()
    if "authorization violation" in lowered or "authentication" in lowered:
        if o.creds_file:
            how = f"the user in broker.creds ({o.creds_file})"
        elif o.nkey_seed_file:
            how = f"the nkey whose seed is in broker.nkey_seed ({o.nkey_seed_file})"
        elif o.token:
            how = "broker.token"
        elif o.user:
            how = f"broker.user {o.user!r} and its password"
        else:
            how = "a connection without credentials (set broker.token, user and password, creds or nkey_seed)"
        return f"NATS at {servers} refused {how}: {text.removeprefix('nats: ')}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"cannot verify the TLS certificate of NATS at {servers}: {exc.verify_message}; set "
            "broker.tls.ca_file to the CA that signed it"
        )
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or text
        if "CERTIFICATE_REQUIRED" in reason.upper():
            return (
                f"NATS at {servers} requires a client certificate: set broker.tls.cert_file and "
                "broker.tls.key_file"
            )
        if o.tls is not None and "ALERT" in reason.upper():
            return f"NATS at {servers} refused the TLS handshake ({reason}): check broker.tls.cert_file"
    return None


def where(url: Any) -> str:
    """host:port of a connected URL, without credentials."""
    if url is None or url.hostname is None:
        return "?"
    return f"{url.hostname}:{url.port}" if url.port else url.hostname


def redact(url: str) -> str:
    """A server URL without credentials, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
