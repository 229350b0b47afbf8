"""The generic `hmac` verifier, unit by unit: algorithms, encodings, prefixes, rotation, refusals.

Expected signatures are computed here with Python's `hmac` module, independently of the plugin. The
verifier is built the way the gateway builds it: YAML through the config loader, then the factory
the plugin registered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import textwrap
from typing import Any

import pytest

from hookgate.config import ConfigError, loads
from hookgate.hooks import Hooks
from hookgate.types import ComponentKind, IngressRequest, Rejection

BODY = b'{"id": "evt_1", "amount": 1200, "note": "caf\xc3\xa9"}'
HEADER = "X-Acme-Signature"


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_verifier(hooks: Hooks, **options: Any) -> Any:
    """Load a one-source config with `verify: {type: hmac, **options}` and build its verifier."""
    verify = {"type": "hmac", "header": HEADER, **options}
    text = "sources:\n  acme:\n    verify: " + _flow(verify) + "\n"
    loaded = loads(text, hooks.registry, file="x.yaml", env={})
    component = loaded.verifiers["acme"]
    ctype = hooks.registry.get(ComponentKind.VERIFIER, component.type)
    assert ctype is not None
    return ctype.factory(component.config)


def _flow(value: Any) -> str:
    """A YAML flow mapping/list with every string quoted (prefixes like "sha256=" need it)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def request(body: bytes = BODY, headers: dict[str, str] | None = None) -> IngressRequest:
    return IngressRequest(
        source="acme",
        method="POST",
        url="http://127.0.0.1/webhooks/acme",
        path="/webhooks/acme",
        query_string=b"",
        headers=[(k.lower(), v) for k, v in (headers or {}).items()],
        body=body,
        client="127.0.0.1",
    )


def expected(secret: str, body: bytes, algorithm: str, encoding: str) -> str:
    digest = hmac.new(secret.encode(), body, getattr(hashlib, algorithm)).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def assert_problem(error: ConfigError, where: str, *words: str) -> None:
    """One problem, at exactly `where` ("file:line: path"), whose message has all of `words`.

    The wording itself is the config loader's; the location is the contract checked here.
    """
    (problem,) = error.problems
    text = str(problem)
    assert text.startswith(where + ": "), f"{text!r} is not at {where!r}"
    message = text[len(where) + 2 :].lower()
    assert all(word.lower() in message for word in words), f"{text!r} lacks one of {words}"


def assert_rejected(result: Rejection | None, code: str) -> None:
    assert isinstance(result, Rejection), f"expected a {code} rejection, got {result!r}"
    assert result.status == 401
    assert result.code == code
    assert result.message


# --- accepted signatures ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("encoding", ["hex", "base64"])
@pytest.mark.parametrize("prefix", ["", "sha256=", "v0="])
def test_valid_signature_is_accepted(hooks: Hooks, algorithm: str, encoding: str, prefix: str) -> None:
    verifier = make_verifier(
        hooks,
        secret="s3cret",
        algorithm=algorithm,
        encoding=encoding,
        **({"prefix": prefix} if prefix else {}),
    )
    signature = prefix + expected("s3cret", BODY, algorithm, encoding)
    assert verifier.verify(request(headers={HEADER: signature})) is None


def test_defaults_are_sha256_hex_without_prefix(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret="s3cret")
    hex_sig = hmac.new(b"s3cret", BODY, hashlib.sha256).hexdigest()
    assert verifier.verify(request(headers={HEADER: hex_sig})) is None
    # The same digest in another algorithm or encoding is not accepted by the defaults.
    assert_rejected(
        verifier.verify(request(headers={HEADER: expected("s3cret", BODY, "sha512", "hex")})),
        "invalid_signature",
    )
    assert_rejected(
        verifier.verify(request(headers={HEADER: expected("s3cret", BODY, "sha256", "base64")})),
        "invalid_signature",
    )


def test_header_name_is_matched_case_insensitively(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret="s3cret")
    signature = expected("s3cret", BODY, "sha256", "hex")
    assert verifier.verify(request(headers={"x-acme-SIGNATURE": signature})) is None


def test_uppercase_hex_is_accepted(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret="s3cret")
    signature = expected("s3cret", BODY, "sha256", "hex").upper()
    assert verifier.verify(request(headers={HEADER: signature})) is None


def test_signature_covers_the_raw_bytes_not_a_reserialisation(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret="s3cret")
    raw = b'{ "b":1,\n  "a" : 2 }'
    assert verifier.verify(request(raw, {HEADER: expected("s3cret", raw, "sha256", "hex")})) is None
    compact = b'{"b":1,"a":2}'
    assert_rejected(
        verifier.verify(request(compact, {HEADER: expected("s3cret", raw, "sha256", "hex")})),
        "invalid_signature",
    )


# --- rotation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["hex", "base64"])
def test_any_secret_of_a_rotation_list_is_accepted(hooks: Hooks, encoding: str) -> None:
    verifier = make_verifier(
        hooks, secret=["old-secret", "new-secret"], algorithm="sha512", encoding=encoding, prefix="v1="
    )
    for secret in ("old-secret", "new-secret"):
        signature = "v1=" + expected(secret, BODY, "sha512", encoding)
        assert verifier.verify(request(headers={HEADER: signature})) is None, secret
    retired = "v1=" + expected("retired-secret", BODY, "sha512", encoding)
    assert_rejected(verifier.verify(request(headers={HEADER: retired})), "invalid_signature")


# --- refusals ----------------------------------------------------------------------------------


def test_missing_header_is_missing_signature_401(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret="s3cret")
    assert_rejected(verifier.verify(request(headers={})), "missing_signature")
    assert_rejected(verifier.verify(request(headers={"X-Other": "abc"})), "missing_signature")
    assert_rejected(verifier.verify(request(headers={HEADER: ""})), "missing_signature")


def test_wrong_secret_is_invalid_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret="s3cret", prefix="sha256=")
    signature = "sha256=" + expected("not-the-secret", BODY, "sha256", "hex")
    assert_rejected(verifier.verify(request(headers={HEADER: signature})), "invalid_signature")


@pytest.mark.parametrize("encoding", ["hex", "base64"])
def test_tampered_body_is_invalid_signature(hooks: Hooks, encoding: str) -> None:
    verifier = make_verifier(hooks, secret="s3cret", encoding=encoding)
    signature = expected("s3cret", BODY, "sha256", encoding)
    assert verifier.verify(request(BODY, {HEADER: signature})) is None
    tampered = BODY.replace(b"1200", b"9200")
    assert_rejected(verifier.verify(request(tampered, {HEADER: signature})), "invalid_signature")
    assert_rejected(verifier.verify(request(BODY + b" ", {HEADER: signature})), "invalid_signature")


def test_truncated_signature_is_invalid_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret="s3cret")
    signature = expected("s3cret", BODY, "sha256", "hex")
    assert_rejected(verifier.verify(request(headers={HEADER: signature[:-2]})), "invalid_signature")


def test_missing_or_wrong_prefix_is_invalid_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret="s3cret", prefix="sha256=")
    digest = expected("s3cret", BODY, "sha256", "hex")
    assert verifier.verify(request(headers={HEADER: "sha256=" + digest})) is None
    assert_rejected(verifier.verify(request(headers={HEADER: digest})), "invalid_signature")
    assert_rejected(verifier.verify(request(headers={HEADER: "sha1=" + digest})), "invalid_signature")


@pytest.mark.parametrize("value", ["zz" * 32, "abc", "0x" + "ab" * 31, "sha256"])
def test_malformed_hex_is_invalid_signature(hooks: Hooks, value: str) -> None:
    verifier = make_verifier(hooks, secret="s3cret", encoding="hex")
    assert_rejected(verifier.verify(request(headers={HEADER: value})), "invalid_signature")


@pytest.mark.parametrize("value", ["not base64!", "abc", "a===", "%%%%"])
def test_malformed_base64_is_invalid_signature(hooks: Hooks, value: str) -> None:
    verifier = make_verifier(hooks, secret="s3cret", encoding="base64")
    assert_rejected(verifier.verify(request(headers={HEADER: value})), "invalid_signature")


# --- config ------------------------------------------------------------------------------------


def config_error(hooks: Hooks, verify_block: str) -> ConfigError:
    text = "sources:\n  acme:\n    verify:\n" + textwrap.indent(textwrap.dedent(verify_block), "      ")
    with pytest.raises(ConfigError) as info:
        loads(text, hooks.registry, file="x.yaml", env={})
    return info.value


@pytest.mark.parametrize(
    ("block", "where", "words"),
    [
        (
            """\
            type: hmac
            header: X-Sig
            secret: s
            algorithm: md5
            """,
            "x.yaml:7: $.sources.acme.verify.algorithm",
            ("md5",),
        ),
        (
            """\
            type: hmac
            header: X-Sig
            secret: s
            encoding: base32
            """,
            "x.yaml:7: $.sources.acme.verify.encoding",
            ("base32",),
        ),
        (
            """\
            type: hmac
            header: X-Sig
            secret: s
            colour: red
            """,
            "x.yaml:7: $.sources.acme.verify.colour",
            ("unknown",),
        ),
        (
            """\
            type: hmac
            secret: s
            """,
            "x.yaml:3: $.sources.acme.verify",
            ("missing", "header"),
        ),
        (
            """\
            type: hmac
            header: X-Sig
            """,
            "x.yaml:3: $.sources.acme.verify",
            ("missing", "secret"),
        ),
        (
            """\
            type: hmac
            header: X-Sig
            secret:
              - old
              - 42
            """,
            "x.yaml:8: $.sources.acme.verify.secret[1]",
            ("str",),
        ),
        (
            """\
            type: hmac
            header: X-Sig
            secret: ""
            """,
            "x.yaml:3: $.sources.acme.verify",
            ("secret must not be empty",),
        ),
        (
            """\
            type: hmac
            header: X-Sig
            secret: []
            """,
            "x.yaml:3: $.sources.acme.verify",
            ("at least one secret",),
        ),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, words: tuple[str, ...]
) -> None:
    assert_problem(config_error(hooks, block), where, *words)


def test_an_unset_secret_variable_is_named(hooks: Hooks) -> None:
    error = config_error(
        hooks,
        """\
        type: hmac
        header: X-Sig
        secret: "${ACME_SECRET}"
        """,
    )
    assert_problem(error, "x.yaml:6: $.sources.acme.verify.secret", "ACME_SECRET", "not set")


def test_the_secret_can_come_from_the_environment(hooks: Hooks) -> None:
    text = 'sources:\n  acme:\n    verify: {type: hmac, header: X-Sig, secret: "${ACME_SECRET}"}\n'
    loaded = loads(text, hooks.registry, file="x.yaml", env={"ACME_SECRET": "from-env"})
    config = loaded.verifiers["acme"].config
    ctype = hooks.registry.get(ComponentKind.VERIFIER, "hmac")
    assert ctype is not None
    verifier = ctype.factory(config)
    signature = expected("from-env", BODY, "sha256", "hex")
    assert verifier.verify(request(headers={"X-Sig": signature})) is None
