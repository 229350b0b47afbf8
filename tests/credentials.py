"""Throwaway credentials for real nats-servers and HTTPS listeners, made at test time.

- nkeys (user, account, operator) with the `nkeys` package.
- NATS decentralized auth: operator, account and user JWTs (NATS JWT v2), signed here the way
  nsc signs them, and a `.creds` file in the standard format.
- A small PKI with the `cryptography` package: a CA, a server certificate for 127.0.0.1 and
  localhost, and a client certificate.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# --- nkeys --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NKey:
    seed: str  # "SU...", "SA...", "SO..."
    public: str  # "U...", "A...", "O..."

    def sign(self, data: bytes) -> bytes:
        return bytes(nkeys.from_seed(bytearray(self.seed.encode())).sign(data))


def new_nkey(prefix: int) -> NKey:
    """A fresh nkey of one role: nkeys.PREFIX_BYTE_USER, _ACCOUNT or _OPERATOR."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    public = nkeys.from_seed(bytearray(seed)).public_key
    return NKey(bytes(seed).decode(), bytes(public).decode())


def user_nkey() -> NKey:
    return new_nkey(nkeys.PREFIX_BYTE_USER)


# --- NATS JWTs (decentralized auth) ---------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(issuer: NKey, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT v2: header.payload.signature, ed25519-signed by the issuer's nkey."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": issuer.public, "name": name, "sub": subject}
    # jti: a hash of the other claims, as the reference implementation computes it.
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    claims["nats"] = {**nats, "version": 2}
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signature = _b64url(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


@dataclass(frozen=True)
class Decentralized:
    """An operator with a system account, and one account (JetStream enabled) with one user."""

    operator_jwt: str
    system: NKey
    system_jwt: str
    account: NKey
    account_jwt: str
    user: NKey
    user_jwt: str

    def server_config(self) -> str:
        """The nats-server config block: trust the operator, preload the accounts."""
        return (
            f"operator: {self.operator_jwt}\n"
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {self.system.public}: {self.system_jwt}\n"
            f"  {self.account.public}: {self.account_jwt}\n"
            "}\n"
        )

    def write_creds(self, path: Path, user_jwt: str | None = None) -> Path:
        """The user's .creds file, in the format nsc writes."""
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{user_jwt or self.user_jwt}\n"
            "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{self.user.seed}\n"
            "------END USER NKEY SEED------\n\n"
            "*************************************************************\n"
        )
        path.chmod(0o600)
        return path


def decentralized(permissions: dict[str, Any] | None = None) -> Decentralized:
    operator = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    # JetStream needs a system account when the server trusts an operator.
    system = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    account = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    user = user_nkey()
    operator_jwt = encode_jwt(
        operator,
        operator.public,
        "hookgate-test-operator",
        {"type": "operator", "system_account": system.public},
    )
    system_jwt = encode_jwt(operator, system.public, "SYS", {"type": "account", "limits": dict(UNLIMITED)})
    limits = {
        **UNLIMITED,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
        # JetStream is enabled for an account whose storage limits are not 0.
        "mem_storage": -1,
        "disk_storage": -1,
        "streams": -1,
        "consumer": -1,
    }
    account_jwt = encode_jwt(
        operator,
        account.public,
        "hookgate-test-account",
        {"type": "account", "limits": limits, "default_permissions": {"pub": {}, "sub": {}}},
    )
    user_claims = {"type": "user", **UNLIMITED, **(permissions or {"pub": {}, "sub": {}})}
    user_jwt = encode_jwt(account, user.public, "hookgate", user_claims)
    return Decentralized(operator_jwt, system, system_jwt, account, account_jwt, user, user_jwt)


# --- a PKI --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(
    path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None
) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
    return path


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("hookgate test CA", ca_key, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue("127.0.0.1", server_key, (ca, ca_key), ExtendedKeyUsageOID.SERVER_AUTH)
    client = _issue("hookgate", client_key, (ca, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        ca=_write(directory / "ca.pem", cert=ca),
        server_cert=_write(directory / "server.pem", cert=server),
        server_key=_write(directory / "server.key", key=server_key),
        client_cert=_write(directory / "client.pem", cert=client),
        client_key=_write(directory / "client.key", key=client_key),
    )
