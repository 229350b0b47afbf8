"""`auth: [{type: bearer_jwt}]`: a JSON Web Token in `Authorization: Bearer <jwt>`, checked with PyJWT.

    sources:
      partner:
        auth:
          - type: bearer_jwt
            jwks_file: /etc/hookgate/partner-jwks.json   # RS256/ES256 keys, picked by the token's kid
            # or  key: |                                 # one PEM public key (RSA, or EC P-256)
            #       -----BEGIN PUBLIC KEY-----
            #       ...
            # or  secret: "${PARTNER_JWT_SECRET}"        # HS256; a list while rotating
            issuer: https://auth.partner.example
            audience: hookgate                           # or a list of accepted audiences
            algorithms: [RS256, ES256]                   # default: those the configured keys allow
            leeway: 30s                                  # clock skew allowed on exp, nbf and iat

Every token must carry `exp`; `iss` and `aud` are required and checked when `issuer` / `audience`
are set, and a token that carries `aud` is refused when no `audience` is configured. Only HS256,
RS256 and ES256 exist here ("none" never does), and each algorithm is verified with its own keys
only: an HS256 token is checked against `secret` and nothing else, so a token "signed" with an RSA
public key as its HMAC secret is refused. The JWKS file is read when the config loads and when the
gateway starts; relative paths are relative to the working directory. Refusals are 403; tokens and
secrets are never logged or echoed. The Authorization header is dropped from the event before it
is stored, so it reaches no endpoint (`forward_credential: true` keeps it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import Duration, seconds
from hookgate.types import ComponentRegistry, IngressRequest, Rejection

Algorithm = Literal["HS256", "RS256", "ES256"]
ALGORITHMS: tuple[Algorithm, ...] = ("HS256", "RS256", "ES256")
MIN_SECRET_BYTES = 32  # RFC 7518, 3.2: an HS256 key at least as long as the hash
MIN_RSA_BITS = 2048


def _at(path: str, message: str) -> ValueError:
    """A ValueError the config loader reports at `<rule path><path>` (msgspec's own suffix)."""
    return ValueError(f"{message} - at `${path}`")


class BearerJwtConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    secret: str | list[str] | None = None
    key: str | None = None
    jwks_file: str | None = None
    algorithms: list[Algorithm] | None = None
    issuer: str | None = None
    audience: str | list[str] | None = None
    leeway: Duration = "30s"
    forward_credential: Annotated[
        bool,
        msgspec.Meta(
            description="also send the Authorization header on to endpoints; by default it is dropped"
        ),
    ] = False

    def __post_init__(self) -> None:
        load_keys(self)  # every problem with the keys is a config error, with its path


@dataclass(frozen=True)
class VerificationKey:
    algorithm: Algorithm
    key: Any  # bytes (HS256), an RSA or EC public key
    kid: str | None = None


@dataclass(frozen=True)
class Keys:
    algorithms: tuple[Algorithm, ...]
    by_algorithm: dict[str, list[VerificationKey]]
    from_jwks: bool


def load_keys(config: BearerJwtConfig) -> Keys:
    """The verification keys of a config, by algorithm; ValueError (with its path) for any problem."""
    if config.key is not None and config.jwks_file is not None:
        raise ValueError("set key or jwks_file, not both")
    keys: list[VerificationKey] = []
    if config.secret is not None:
        keys += _secrets(config.secret)
    pem = _pem_key(config.key) if config.key is not None else None
    if pem is not None:
        keys.append(pem)
    if config.jwks_file is not None:
        keys += _jwks_keys(config.jwks_file)
    available = {k.algorithm for k in keys}
    if config.algorithms is None:
        algorithms = tuple(a for a in ALGORITHMS if a in available)
        if not algorithms:
            raise ValueError("give secret (HS256), key or jwks_file (RS256, ES256)")
    else:
        if not config.algorithms:
            raise _at(".algorithms", "give at least one algorithm")
        for i, algorithm in enumerate(config.algorithms):
            if algorithm not in available:
                raise _at(f".algorithms[{i}]", f"{_needs(algorithm)}, and none is configured")
        algorithms = tuple(dict.fromkeys(config.algorithms))
        if config.secret is not None and "HS256" not in algorithms:
            raise _at(".secret", "a secret is only used for HS256, which algorithms does not list")
        if pem is not None and pem.algorithm not in algorithms:
            raise _at(".key", f"this key is for {pem.algorithm}, which algorithms does not list")
    audiences = [config.audience] if isinstance(config.audience, str) else config.audience
    if audiences is not None and (not audiences or not all(audiences)):
        raise _at(".audience", "must not be empty")
    if config.issuer is not None and not config.issuer:
        raise _at(".issuer", "must not be empty")
    by_algorithm: dict[str, list[VerificationKey]] = {a: [] for a in algorithms}
    for key in keys:
        if key.algorithm in by_algorithm:
            by_algorithm[key.algorithm].append(key)
    return Keys(algorithms, by_algorithm, from_jwks=config.jwks_file is not None)


def _needs(algorithm: str) -> str:
    return {
        "HS256": "algorithm HS256 needs a secret",
        "RS256": "algorithm RS256 needs an RSA key (key or jwks_file)",
        "ES256": "algorithm ES256 needs an EC P-256 key (key or jwks_file)",
    }[algorithm]


def _secrets(secret: str | list[str]) -> list[VerificationKey]:
    if isinstance(secret, str):
        named = [(".secret", secret)]
    else:
        if not secret:
            raise _at(".secret", "give at least one secret")
        named = [(f".secret[{i}]", s) for i, s in enumerate(secret)]
    keys = []
    for path, value in named:
        raw = value.encode()
        if len(raw) < MIN_SECRET_BYTES:
            # An empty or short HMAC key can be guessed; RFC 7518 requires at least 32 bytes.
            raise _at(path, f"an HS256 secret must be at least {MIN_SECRET_BYTES} bytes long")
        keys.append(VerificationKey("HS256", raw))
    return keys


def _pem_key(pem: str) -> VerificationKey:
    data = pem.strip().encode()
    try:
        public = load_pem_public_key(data)
    except (ValueError, TypeError):
        if b"PRIVATE KEY" in data:
            raise _at(".key", "this is a private key: give the public key") from None
        raise _at(".key", "expected a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    algorithm = _algorithm_of(public)
    if algorithm is None:
        raise _at(".key", "expected an RSA or EC P-256 public key")
    _check_size(public, ".key", "the key")
    return VerificationKey(algorithm, public)


def _algorithm_of(key: Any) -> Algorithm | None:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    return None


def _check_size(key: Any, path: str, what: str) -> None:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise _at(path, f"{what} is an RSA key of {key.key_size} bits: use at least {MIN_RSA_BITS}")


def _jwks_keys(file: str) -> list[VerificationKey]:
    """The RS256/ES256 signing keys of a JWKS file; keys for other algorithms or uses are skipped."""
    try:
        document = json.loads(Path(file).read_text(encoding="utf-8"))
    except OSError as exc:
        raise _at(".jwks_file", f"cannot read {file}: {exc.strerror}") from None
    except ValueError as exc:  # not UTF-8, or not JSON
        raise _at(".jwks_file", f"{file} is not a JSON file: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise _at(".jwks_file", f'{file} is not a JWKS: expected {{"keys": [...]}}')
    keys = []
    for i, entry in enumerate(entries):
        where = f"{file}: keys[{i}]"
        if not isinstance(entry, dict):
            raise _at(".jwks_file", f"{where} is not a JSON object")
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _at(".jwks_file", f"{where}: kid must be a string")
        algorithm = _jwk_algorithm(entry)
        if algorithm is None:
            continue
        if "d" in entry:
            raise _at(".jwks_file", f"{where} holds a private key: publish only public keys")
        try:
            public = jwt.PyJWK(entry, algorithm).key
        # Older PyJWT lets cryptography's own ValueError through ("n must be >= 3").
        except (jwt.PyJWTError, ValueError):
            raise _at(".jwks_file", f"{where} is not a valid {entry['kty']} public key") from None
        _check_size(public, ".jwks_file", where)
        keys.append(VerificationKey(algorithm, public, kid))
    if not keys:
        raise _at(".jwks_file", f"{file} holds no RS256 or ES256 signing key")
    return keys


def _jwk_algorithm(entry: dict[str, Any]) -> Algorithm | None:
    if entry.get("use", "sig") != "sig":
        return None
    alg = entry.get("alg")
    if entry.get("kty") == "RSA" and alg in (None, "RS256"):
        return "RS256"
    if entry.get("kty") == "EC" and entry.get("crv") == "P-256" and alg in (None, "ES256"):
        return "ES256"
    return None


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


_REASONS: list[tuple[type[Exception], str]] = [
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidIssuerError, "the token's issuer is not accepted"),
    (jwt.InvalidAudienceError, "the token's audience is not accepted"),
    (jwt.InvalidSignatureError, "the token's signature does not match"),
]


def _reason(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token lacks the {exc.claim} claim"
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "invalid token"


class BearerJwtRule:
    def __init__(self, config: BearerJwtConfig):
        self.credential_headers = () if config.forward_credential else ("authorization",)
        keys = load_keys(config)
        self.algorithms = keys.algorithms
        self._keys = keys.by_algorithm
        self._from_jwks = keys.from_jwks
        self.issuer = config.issuer
        self.audience = config.audience
        self.leeway = seconds(config.leeway)
        self._required = ["exp"] + (["iss"] if config.issuer else []) + (["aud"] if config.audience else [])

    def check(self, request: IngressRequest) -> Rejection | None:
        header_value = request.header("authorization")
        if not header_value:
            return _forbidden("missing Bearer token (Authorization header)")
        token = bearer_token(header_value)
        if token is None:
            return _forbidden("the Authorization header does not hold a Bearer token")
        try:
            jose = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            return _forbidden("malformed token")
        algorithm = jose.get("alg")
        if algorithm not in self.algorithms:
            return _forbidden("the token's algorithm (alg) is not accepted")
        candidates, reason = self._candidates(algorithm, jose.get("kid"))
        for key in candidates:
            try:
                jwt.decode(
                    token,
                    key.key,
                    algorithms=[algorithm],
                    issuer=self.issuer,
                    audience=self.audience,
                    leeway=self.leeway,
                    options={"require": self._required, "enforce_minimum_key_length": True},
                )
            except jwt.InvalidSignatureError as exc:
                reason = _reason(exc)  # perhaps another key of a rotation
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                return _forbidden(_reason(exc))
            else:
                return None
        return _forbidden(reason)

    def _candidates(self, algorithm: str, kid: object) -> tuple[Sequence[VerificationKey], str]:
        keys = self._keys[algorithm]
        if algorithm == "HS256" or not self._from_jwks:
            return keys, ""  # one inline key, or the secrets: the kid does not choose
        if kid is None:
            if len(keys) == 1:
                return keys, ""
            return [], "the token has no kid to choose one of the keys"
        matching = [k for k in keys if k.kid == kid]
        return matching, "" if matching else "no key matches the token's kid"


def _forbidden(message: str) -> Rejection:
    return Rejection(status=403, code="forbidden", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_access_rule("bearer_jwt", BearerJwtConfig, BearerJwtRule)
