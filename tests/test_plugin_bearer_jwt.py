"""The `bearer_jwt` access rule: HS256/RS256/ES256 tokens, JWKS by kid, claims, attacks, config errors.

Keys are generated with `cryptography` when the tests run and tokens are signed with PyJWT (or by
hand, for tokens PyJWT refuses to make: alg confusion). The last test runs the real gateway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from hookgate.config import ConfigError
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import ComponentKind, IngressRequest
from tests.plugin_support import (
    assert_forbidden,
    assert_http_error,
    assert_problem,
    build,
    ingress_request,
    load,
    load_access_rule,
    load_error,
    nested,
    sources_config,
)
from tests.support import NatsServer, receiver, run_gateway, stream_messages

SECRET = "an-hs256-secret-of-at-least-32-bytes!"
OTHER_SECRET = "another-hs256-secret-of-32-bytes-or-more"
ISSUER = "https://auth.partner.example"
AUDIENCE = "hookgate"


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def jwk(key: Any, kid: str | None = None, **extra: Any) -> dict[str, Any]:
    to_jwk = (
        RSAAlgorithm.to_jwk if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey) else ECAlgorithm.to_jwk
    )
    public = key.public_key() if hasattr(key, "public_key") else key
    data: dict[str, Any] = to_jwk(public, as_dict=True)
    if kid is not None:
        data["kid"] = kid
    return {**data, **extra}


def write_jwks(tmp_path: Path, *keys: dict[str, Any], name: str = "jwks.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"keys": list(keys)}))
    return str(path)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "partner", "iat": now, "exp": now + 300, "iss": ISSUER, "aud": AUDIENCE}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(key: Any, algorithm: str = "HS256", kid: str | None = None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**overrides), key, algorithm=algorithm, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(secret: bytes, header: dict[str, Any] | None = None, **overrides: Any) -> str:
    """An HS256 token signed by hand (PyJWT refuses to use a PEM key as an HMAC secret)."""
    head = b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims(**overrides)).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def make_rule(hooks: Hooks, **options: Any) -> Any:
    """Load a one-source config with `auth: [{type: bearer_jwt, **options}]` and build its rule."""
    return load_access_rule(hooks, "bearer_jwt", **options)


def request(authorization: str | None) -> IngressRequest:
    headers = [("authorization", authorization)] if authorization is not None else []
    return ingress_request("acme", headers=headers)


def bearer(value: str) -> IngressRequest:
    return request(f"Bearer {value}")


# --- HS256 -------------------------------------------------------------------------------------


def test_hs256_token_with_the_secret_passes(hooks: Hooks) -> None:
    rule = make_rule(hooks, secret=SECRET, issuer=ISSUER, audience=AUDIENCE)
    assert rule.check(bearer(token(SECRET))) is None
    assert rule.check(request(f"bearer {token(SECRET)}")) is None  # the scheme in any case
    assert rule.check(bearer(token(SECRET, kid="whatever"))) is None  # a kid does not matter for HS256


def test_hs256_token_with_another_secret_is_forbidden(hooks: Hooks) -> None:
    rule = make_rule(hooks, secret=SECRET)
    sent = token(OTHER_SECRET, iss=None, aud=None)
    result = rule.check(bearer(sent))
    assert_forbidden(result, "signature")
    assert result is not None and sent not in result.message and SECRET not in result.message


def test_every_secret_of_a_rotation_list_passes(hooks: Hooks) -> None:
    rule = make_rule(hooks, secret=[SECRET, OTHER_SECRET], audience=AUDIENCE)
    assert rule.check(bearer(token(SECRET))) is None
    assert rule.check(bearer(token(OTHER_SECRET))) is None
    assert_forbidden(rule.check(bearer(token("a-third-secret-that-is-also-32-bytes-long"))), "signature")


def test_tampered_payload_is_forbidden(hooks: Hooks) -> None:
    rule = make_rule(hooks, secret=SECRET, audience=AUDIENCE)
    head, _, signature = token(SECRET).split(".")
    forged = b64url(json.dumps(claims(sub="admin")).encode())
    assert_forbidden(rule.check(bearer(f"{head}.{forged}.{signature}")), "signature")


# --- RS256 and ES256 with an inline key --------------------------------------------------------


def test_rs256_token_with_the_inline_public_key_passes(
    hooks: Hooks, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    rule = make_rule(hooks, key=public_pem(rsa_key), audience=AUDIENCE)
    assert rule.check(bearer(token(rsa_key, "RS256"))) is None
    assert rule.check(bearer(token(rsa_key, "RS256", kid="any"))) is None  # one key: the kid does not choose
    assert_forbidden(rule.check(bearer(token(rsa_key2, "RS256"))), "signature")


def test_es256_token_with_the_inline_public_key_passes(
    hooks: Hooks, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    rule = make_rule(hooks, key=public_pem(ec_key), audience=AUDIENCE)
    assert rule.check(bearer(token(ec_key, "ES256"))) is None
    stranger = ec.generate_private_key(ec.SECP256R1())
    assert_forbidden(rule.check(bearer(token(stranger, "ES256"))), "signature")
    # An RS256 token is not even tried against an EC key.
    assert_forbidden(rule.check(bearer(token(rsa_key, "RS256"))), "algorithm")


def test_a_configured_algorithm_list_is_enforced(
    hooks: Hooks, tmp_path: Path, rsa_key: Any, ec_key: Any
) -> None:
    jwks = write_jwks(tmp_path, jwk(rsa_key, "r1"), jwk(ec_key, "e1"))
    both = make_rule(hooks, jwks_file=jwks, audience=AUDIENCE)
    assert both.check(bearer(token(rsa_key, "RS256", kid="r1"))) is None
    assert both.check(bearer(token(ec_key, "ES256", kid="e1"))) is None
    rs_only = make_rule(hooks, jwks_file=jwks, audience=AUDIENCE, algorithms=["RS256"])
    assert rs_only.check(bearer(token(rsa_key, "RS256", kid="r1"))) is None
    assert_forbidden(rs_only.check(bearer(token(ec_key, "ES256", kid="e1"))), "algorithm")


# --- JWKS --------------------------------------------------------------------------------------


def test_jwks_keys_are_picked_by_kid(hooks: Hooks, tmp_path: Path, rsa_key: Any, rsa_key2: Any) -> None:
    jwks = write_jwks(tmp_path, jwk(rsa_key, "2024", use="sig", alg="RS256"), jwk(rsa_key2, "2025"))
    rule = make_rule(hooks, jwks_file=jwks, issuer=ISSUER, audience=AUDIENCE)
    assert rule.check(bearer(token(rsa_key, "RS256", kid="2024"))) is None
    assert rule.check(bearer(token(rsa_key2, "RS256", kid="2025"))) is None
    # The right key under the wrong kid, an unknown kid, no kid among several keys: all refused.
    assert_forbidden(rule.check(bearer(token(rsa_key, "RS256", kid="2025"))), "signature")
    assert_forbidden(rule.check(bearer(token(rsa_key, "RS256", kid="2023"))), "kid")
    assert_forbidden(rule.check(bearer(token(rsa_key, "RS256"))), "kid")


def test_a_single_key_jwks_accepts_tokens_without_kid(hooks: Hooks, tmp_path: Path, ec_key: Any) -> None:
    rule = make_rule(hooks, jwks_file=write_jwks(tmp_path, jwk(ec_key, "only")), audience=AUDIENCE)
    assert rule.check(bearer(token(ec_key, "ES256"))) is None
    assert rule.check(bearer(token(ec_key, "ES256", kid="only"))) is None
    assert_forbidden(rule.check(bearer(token(ec_key, "ES256", kid="other"))), "kid")


def test_jwks_keys_for_other_uses_and_algorithms_are_skipped(
    hooks: Hooks, tmp_path: Path, rsa_key: Any, rsa_key2: Any, ec_key: Any
) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    jwks = write_jwks(
        tmp_path,
        jwk(rsa_key2, "enc", use="enc"),
        jwk(rsa_key2, "ps", alg="PS256"),
        jwk(p384, "p384"),
        {"kty": "oct", "kid": "sym", "k": b64url(SECRET.encode())},
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64url(b"\x00" * 32)},
        jwk(rsa_key, "sig"),
    )
    rule = make_rule(hooks, jwks_file=jwks, audience=AUDIENCE)
    assert rule.check(bearer(token(rsa_key, "RS256", kid="sig"))) is None
    assert_forbidden(rule.check(bearer(token(rsa_key2, "RS256", kid="enc"))), "kid")
    assert_forbidden(rule.check(bearer(token(rsa_key2, "RS256", kid="ps"))), "kid")
    # A symmetric key in the JWKS never becomes an HS256 secret.
    assert_forbidden(rule.check(bearer(token(SECRET, "HS256", kid="sym"))), "algorithm")


def test_a_kid_of_a_key_of_the_other_family_is_refused(
    hooks: Hooks, tmp_path: Path, rsa_key: Any, ec_key: Any
) -> None:
    rule = make_rule(
        hooks, jwks_file=write_jwks(tmp_path, jwk(rsa_key, "r"), jwk(ec_key, "e")), audience=AUDIENCE
    )
    assert_forbidden(rule.check(bearer(token(ec_key, "ES256", kid="r"))), "kid")


def test_the_jwks_file_is_read_once_when_the_rule_is_built(
    hooks: Hooks, tmp_path: Path, rsa_key: Any
) -> None:
    path = write_jwks(tmp_path, jwk(rsa_key, "k"))
    rule = make_rule(hooks, jwks_file=path, audience=AUDIENCE)
    Path(path).unlink()
    assert rule.check(bearer(token(rsa_key, "RS256", kid="k"))) is None


# --- claims ------------------------------------------------------------------------------------


def test_expiry_is_required_and_checked_with_leeway(hooks: Hooks) -> None:
    now = int(time.time())
    rule = make_rule(hooks, secret=SECRET, audience=AUDIENCE)  # leeway 30s by default
    assert rule.check(bearer(token(SECRET, exp=now - 10))) is None
    assert_forbidden(rule.check(bearer(token(SECRET, exp=now - 120))), "expired")
    assert_forbidden(rule.check(bearer(token(SECRET, exp=None))), "lacks the exp claim")
    assert_forbidden(rule.check(bearer(token(SECRET, exp="tomorrow"))))
    strict = make_rule(hooks, secret=SECRET, audience=AUDIENCE, leeway="0s")
    assert_forbidden(strict.check(bearer(token(SECRET, exp=now - 10))), "expired")
    lenient = make_rule(hooks, secret=SECRET, audience=AUDIENCE, leeway="5m")
    assert lenient.check(bearer(token(SECRET, exp=now - 120))) is None


def test_tokens_not_valid_yet_are_forbidden(hooks: Hooks) -> None:
    now = int(time.time())
    rule = make_rule(hooks, secret=SECRET, audience=AUDIENCE)
    assert rule.check(bearer(token(SECRET, nbf=now + 10))) is None  # within the leeway
    assert_forbidden(rule.check(bearer(token(SECRET, nbf=now + 120))), "not valid yet")
    assert_forbidden(rule.check(bearer(token(SECRET, iat=now + 120))), "not valid yet")


def test_the_issuer_is_required_and_checked_when_configured(hooks: Hooks) -> None:
    rule = make_rule(hooks, secret=SECRET, issuer=ISSUER, audience=AUDIENCE)
    assert rule.check(bearer(token(SECRET))) is None
    assert_forbidden(rule.check(bearer(token(SECRET, iss="https://evil.example"))), "issuer")
    assert_forbidden(rule.check(bearer(token(SECRET, iss=None))), "lacks the iss claim")
    unchecked = make_rule(hooks, secret=SECRET, audience=AUDIENCE)
    assert unchecked.check(bearer(token(SECRET, iss="https://anyone.example"))) is None


def test_the_audience_is_required_and_checked_when_configured(hooks: Hooks) -> None:
    rule = make_rule(hooks, secret=SECRET, audience=[AUDIENCE, "hookgate-staging"])
    assert rule.check(bearer(token(SECRET))) is None
    assert rule.check(bearer(token(SECRET, aud="hookgate-staging"))) is None
    assert rule.check(bearer(token(SECRET, aud=["billing", AUDIENCE]))) is None
    assert_forbidden(rule.check(bearer(token(SECRET, aud="billing"))), "audience")
    assert_forbidden(rule.check(bearer(token(SECRET, aud=None))), "lacks the aud claim")
    # A token meant for some audience is refused where none is configured (RFC 7519, 4.1.3).
    no_audience = make_rule(hooks, secret=SECRET)
    assert no_audience.check(bearer(token(SECRET, aud=None))) is None
    assert_forbidden(no_audience.check(bearer(token(SECRET))), "audience")


# --- attacks -----------------------------------------------------------------------------------


def test_alg_none_is_forbidden(hooks: Hooks, tmp_path: Path, rsa_key: Any) -> None:
    unsigned = jwt.encode(claims(), "", algorithm="none")
    for options in (
        {"secret": SECRET},
        {"key": public_pem(rsa_key)},
        {"jwks_file": write_jwks(tmp_path, jwk(rsa_key, "k"))},
    ):
        rule = make_rule(hooks, audience=AUDIENCE, **options)
        assert_forbidden(rule.check(bearer(unsigned)), "algorithm")
        assert_forbidden(rule.check(bearer(unsigned.rstrip(".") + ".c2ln")), "algorithm")
        for alg in ("None", "NONE", "nOnE", ""):
            forged = hand_signed_hs256(b"", {"alg": alg, "typ": "JWT"})
            assert_forbidden(rule.check(bearer(forged)))


def test_alg_confusion_hs256_signed_with_the_rsa_public_key_is_forbidden(
    hooks: Hooks, tmp_path: Path, rsa_key: Any
) -> None:
    pem = public_pem(rsa_key)
    forged = [
        hand_signed_hs256(pem.encode()),
        hand_signed_hs256(pem.strip().encode()),
        hand_signed_hs256(pem.encode(), {"alg": "HS256", "typ": "JWT", "kid": "k"}),
    ]
    for options in ({"key": pem}, {"jwks_file": write_jwks(tmp_path, jwk(rsa_key, "k"))}):
        rule = make_rule(hooks, audience=AUDIENCE, **options)
        assert rule.check(bearer(token(rsa_key, "RS256", kid="k"))) is None
        for sent in forged:
            assert_forbidden(rule.check(bearer(sent)), "algorithm")
    # With a secret configured too, HS256 is accepted, but only with that secret.
    mixed = make_rule(hooks, audience=AUDIENCE, key=pem, secret=SECRET)
    assert mixed.check(bearer(token(SECRET))) is None
    assert mixed.check(bearer(token(rsa_key, "RS256"))) is None
    for sent in forged:
        assert_forbidden(mixed.check(bearer(sent)), "signature")


def test_a_token_claiming_rs256_is_not_checked_with_the_hs256_secret(hooks: Hooks) -> None:
    rule = make_rule(hooks, secret=SECRET, audience=AUDIENCE)
    forged = hand_signed_hs256(SECRET.encode(), {"alg": "RS256", "typ": "JWT"})
    assert_forbidden(rule.check(bearer(forged)), "algorithm")


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token abc.def.ghi",
        "Bearer not-a-jwt",
        "Bearer a.b",
        "Bearer a.b.c.d",
        "Bearer ...",
        "Bearer !!!.@@@.###",
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30",
        "Bearer " + b64url(b"[1,2]") + "." + b64url(b"{}") + ".",  # header not an object
        "Bearer " + b64url(b"\xff\xfe") + "." + b64url(b"{}") + ".c2ln",  # header not UTF-8
        "Bearer " + b64url(b'{"alg":"HS256","kid":7}') + "." + b64url(b"{}") + ".c2ln",  # kid not a string
        "Bearer " + b64url(b'{"alg":["HS256"]}') + "." + b64url(b"{}") + ".c2ln",  # alg not a string
        "Bearer " + b64url(b'{"alg":"HS256"}') + "." + b64url(b"[]") + ".c2ln",  # payload not an object
        "Bearer " + b64url(b'{"alg":"HS256"}') + ".%%%." + "c2ln",
        "Bearer ☃.☃.☃",
        "Bearer a b c",
    ],
)
def test_malformed_authorization_is_forbidden_never_an_exception(
    hooks: Hooks, authorization: str | None
) -> None:
    rule = make_rule(hooks, secret=SECRET)
    assert_forbidden(rule.check(request(authorization)))


# --- config ------------------------------------------------------------------------------------


def config_error(hooks: Hooks, rule: str) -> ConfigError:
    return load_error(hooks, nested("sources:\n  acme:\n    auth:\n      - type: bearer_jwt\n", rule, 8))


SRC = "x.yaml:{line}: $.sources.acme.auth[0]"


@pytest.mark.parametrize(
    ("rule", "line", "path", "words"),
    [
        ("issuer: x\n", 4, "", ("give secret",)),
        (f"secret: {SECRET}\nalgorithms: [HS256, none]\n", 6, ".algorithms[1]", ('"none"',)),
        (f"secret: {SECRET}\nalgorithms: [HS384]\n", 6, ".algorithms[0]", ("HS384",)),
        (f"secret: {SECRET}\nalgorithms: [HS256, RS256]\n", 6, ".algorithms[1]", ("RS256 needs an RSA key",)),
        (f"secret: {SECRET}\nalgorithms: []\n", 6, ".algorithms", ("at least one",)),
        ("algorithms: [HS256]\n", 5, ".algorithms[0]", ("HS256 needs a secret",)),
        ("secret: short\n", 5, ".secret", ("at least 32 bytes",)),
        ('secret: ""\n', 5, ".secret", ("at least 32 bytes",)),
        (f"secret:\n  - {SECRET}\n  - short\n", 7, ".secret[1]", ("at least 32 bytes",)),
        ("secret: []\n", 5, ".secret", ("at least one",)),
        (f"secret: {SECRET}\nleeway: 30 seconds\n", 6, ".leeway", ("duration",)),
        (f"secret: {SECRET}\nissuer: ''\n", 6, ".issuer", ("must not be empty",)),
        (f"secret: {SECRET}\naudience: ''\n", 6, ".audience", ("must not be empty",)),
        (f"secret: {SECRET}\naudience: [a, '']\n", 6, ".audience", ("must not be empty",)),
        (f"secret: {SECRET}\njwks_url: https://x\n", 6, ".jwks_url", ("unknown key",)),
        ("key: not a pem\n", 5, ".key", ("PEM public key",)),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, rule: str, line: int, path: str, words: tuple[str, ...]
) -> None:
    assert_problem(config_error(hooks, rule), SRC.format(line=line) + path, *words)


def yaml_block(pem: str) -> str:
    return "|\n" + textwrap.indent(pem, "  ")


def test_key_problems_are_refused(hooks: Hooks, rsa_key: Any, ec_key: Any) -> None:
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    assert_problem(
        config_error(hooks, "key: " + yaml_block(private)), SRC.format(line=5) + ".key", "private key"
    )
    p384 = public_pem(ec.generate_private_key(ec.SECP384R1()))
    assert_problem(config_error(hooks, "key: " + yaml_block(p384)), SRC.format(line=5) + ".key", "P-256")
    short = public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    assert_problem(config_error(hooks, "key: " + yaml_block(short)), SRC.format(line=5) + ".key", "1024 bits")
    ec_pem = public_pem(ec_key)
    assert_problem(
        config_error(hooks, "algorithms: [RS256]\nkey: " + yaml_block(ec_pem)),
        SRC.format(line=5) + ".algorithms[0]",
        "RS256 needs an RSA key",
    )
    assert_problem(
        config_error(hooks, f"algorithms: [ES256]\nsecret: {SECRET}\nkey: " + yaml_block(ec_pem)),
        SRC.format(line=6) + ".secret",
        "only used for HS256",
    )
    assert_problem(
        config_error(hooks, "jwks_file: /x.json\nkey: " + yaml_block(ec_pem)),
        SRC.format(line=4),
        "key or jwks_file, not both",
    )


def test_jwks_file_problems_are_refused(hooks: Hooks, tmp_path: Path, rsa_key: Any) -> None:
    def error_for(content: str | bytes | None) -> ConfigError:
        path = tmp_path / "jwks.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        return config_error(hooks, f"jwks_file: {path}\n")

    where = SRC.format(line=5) + ".jwks_file"
    assert_problem(error_for(None), where, "cannot read", "no such file")
    assert_problem(error_for("{not json"), where, "not a JSON file")
    assert_problem(error_for(b"\xff\xfe{}"), where, "not a JSON file")
    assert_problem(error_for("[]"), where, "not a JWKS")
    assert_problem(error_for('{"keys": {}}'), where, "not a JWKS")
    assert_problem(error_for('{"keys": []}'), where, "no RS256 or ES256 signing key")
    assert_problem(error_for(json.dumps({"keys": [jwk(rsa_key, "e", use="enc")]})), where, "no RS256")
    assert_problem(error_for('{"keys": [42]}'), where, "keys[0] is not a JSON object")
    assert_problem(
        error_for(json.dumps({"keys": [jwk(rsa_key, kid=None), {**jwk(rsa_key), "kid": 5}]})), where, "kid"
    )
    private = RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    assert_problem(error_for(json.dumps({"keys": [private]})), where, "keys[0] holds a private key")
    broken = {**jwk(rsa_key, "b"), "n": "!!"}
    assert_problem(error_for(json.dumps({"keys": [broken]})), where, "keys[0] is not a valid RSA public key")
    weak = jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "weak")
    assert_problem(error_for(json.dumps({"keys": [weak]})), where, "1024 bits")


def test_the_secret_can_come_from_the_environment(hooks: Hooks) -> None:
    text = 'sources:\n  acme:\n    auth: [{type: bearer_jwt, secret: "${JWT_SECRET}"}]\n'
    (component,) = load(hooks, text, env={"JWT_SECRET": SECRET}).access_rules["acme"]
    rule = build(hooks, ComponentKind.ACCESS_RULE, component)
    assert rule.check(bearer(token(SECRET, aud=None))) is None
    error = load_error(hooks, text)
    assert_problem(error, "x.yaml:3: $.sources.acme.auth[0].secret", "JWT_SECRET", "not set")


# --- through the gateway -----------------------------------------------------------------------


async def test_gateway_delivers_with_a_valid_token_only(
    tmp_path: Path, nats_server: NatsServer, rsa_key: Any, rsa_key2: Any
) -> None:
    jwks = write_jwks(tmp_path, jwk(rsa_key, "current"), jwk(rsa_key2, "next"))
    now = int(time.time())
    with trio.fail_after(30):
        async with receiver() as rx:
            text = sources_config(
                nats_server.url,
                rx.url,
                f"""
                partner:
                  auth:
                    - type: bearer_jwt
                      jwks_file: {jwks}
                      issuer: {ISSUER}
                      audience: {AUDIENCE}
                """,
            )
            async with run_gateway(tmp_path, text) as gw:
                url = f"{gw.url}/webhooks/partner"

                async def post(body: bytes, authorization: str | None) -> Any:
                    headers = {"Authorization": authorization} if authorization else {}
                    return await gw.http.post(url, content=body, headers=headers)

                refused = [
                    await post(b"1", None),
                    await post(b"2", "Bearer " + token(rsa_key, "RS256", kid="current", exp=now - 600)),
                    await post(b"3", "Bearer " + token(rsa_key, "RS256", kid="current", aud="other")),
                    await post(b"4", "Bearer " + hand_signed_hs256(public_pem(rsa_key).encode())),
                    await post(b"5", "Bearer " + jwt.encode(claims(), "", algorithm="none")),
                    await post(b"6", "Bearer " + token(rsa_key, "RS256", kid="next")),
                ]
                good = await post(b"7", "Bearer " + token(rsa_key2, "RS256", kid="next"))
                (got,) = await rx.wait_for(1)
    for response in refused:
        assert_http_error(response, 403, "forbidden")
    assert good.status_code == 202
    assert got.body == b"7"
    assert len(await stream_messages(nats_server.url, "HOOKGATE_EVENTS")) == 1
