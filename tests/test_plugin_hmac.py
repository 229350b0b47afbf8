"""The generic `hmac` verifier, unit by unit: algorithms, encodings, prefixes, rotation, refusals.

Expected signatures are computed here with Python's `hmac` module, independently of the plugin. The
verifier is built the way the gateway builds it: YAML through the config loader, then the factory
the plugin registered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest
from slack_sdk.signature import Clock, SignatureVerifier

from hookgate.config import ConfigError
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import ComponentKind, IngressRequest, Rejection
from tests.plugin_support import (
    assert_problem,
    assert_rejection,
    build,
    ingress_request,
    load,
    load_error,
    nested,
    with_clock,
)

BODY = b'{"id": "evt_1", "amount": 1200, "note": "caf\xc3\xa9"}'
HEADER = "X-Acme-Signature"


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_verifier(hooks: Hooks, now: float | None = None, /, **options: Any) -> Any:
    """Load a one-source config with `verify: {type: hmac, **options}` and build its verifier.

    `now` fixes the verifier's clock; None leaves it on the real one.
    """
    verify = {"type": "hmac", "header": HEADER, **options}
    text = "sources:\n  acme:\n    verify: " + _flow(verify) + "\n"
    return build(hooks, ComponentKind.VERIFIER, load(hooks, text).verifiers["acme"], **with_clock(now))


def _flow(value: Any) -> str:
    """A YAML flow mapping/list with every string quoted (prefixes like "sha256=" need it)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def request(body: bytes = BODY, headers: dict[str, str] | None = None) -> IngressRequest:
    return ingress_request("acme", headers=headers or {}, body=body)


def expected(secret: str, body: bytes, algorithm: str, encoding: str) -> str:
    digest = hmac.new(secret.encode(), body, getattr(hashlib, algorithm)).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def assert_rejected(result: Rejection | None, code: str) -> None:
    assert_rejection(result, 401, code)


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
    return load_error(hooks, nested("sources:\n  acme:\n    verify:\n", verify_block, 6))


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
    component = load(hooks, text, env={"ACME_SECRET": "from-env"}).verifiers["acme"]
    verifier = build(hooks, ComponentKind.VERIFIER, component)
    signature = expected("from-env", BODY, "sha256", "hex")
    assert verifier.verify(request(headers={"X-Sig": signature})) is None


# --- signed-content templates --------------------------------------------------------------------

NOW = 1_700_000_000
TS_HEADER = "X-Acme-Timestamp"


def sign(content: bytes, secret: str = "s3cret") -> str:
    return hmac.new(secret.encode(), content, hashlib.sha256).hexdigest()


def timestamped(**options: Any) -> dict[str, Any]:
    return {
        "secret": "s3cret",
        "signed_content": "{timestamp}.{body}",
        "timestamp_header": TS_HEADER,
        **options,
    }


def test_the_default_template_is_the_body(hooks: Hooks) -> None:
    explicit = make_verifier(hooks, secret="s3cret", signed_content="{body}")
    assert explicit.verify(request(headers={HEADER: sign(BODY)})) is None
    assert_rejected(explicit.verify(request(headers={HEADER: sign(b"x" + BODY)})), "invalid_signature")


def test_timestamp_and_body_are_signed_together(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, NOW, **timestamped())
    good = sign(f"{NOW}.".encode() + BODY)
    assert verifier.verify(request(headers={HEADER: good, TS_HEADER: str(NOW)})) is None
    # The same signature with another timestamp, another body, or over the body alone: refused.
    assert_rejected(
        verifier.verify(request(headers={HEADER: good, TS_HEADER: str(NOW - 1)})), "invalid_signature"
    )
    assert_rejected(
        verifier.verify(request(BODY + b" ", {HEADER: good, TS_HEADER: str(NOW)})), "invalid_signature"
    )
    assert_rejected(
        verifier.verify(request(headers={HEADER: sign(BODY), TS_HEADER: str(NOW)})), "invalid_signature"
    )


def test_the_timestamp_is_signed_exactly_as_sent(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, NOW, **timestamped())
    padded = "0" + str(NOW)
    assert (
        verifier.verify(request(headers={HEADER: sign(f"{padded}.".encode() + BODY), TS_HEADER: padded}))
        is None
    )
    assert_rejected(
        verifier.verify(request(headers={HEADER: sign(f"{NOW}.".encode() + BODY), TS_HEADER: padded})),
        "invalid_signature",
    )


@pytest.mark.parametrize(
    ("age", "accepted"),
    [(0, True), (300, True), (-300, True), (301, False), (-301, False), (86_400, False), (-86_400, False)],
)
def test_the_default_tolerance_is_five_minutes_either_way(hooks: Hooks, age: int, accepted: bool) -> None:
    verifier = make_verifier(hooks, NOW, **timestamped())
    ts = NOW - age
    result = verifier.verify(request(headers={HEADER: sign(f"{ts}.".encode() + BODY), TS_HEADER: str(ts)}))
    if accepted:
        assert result is None
    else:
        assert_rejected(result, "timestamp_out_of_tolerance")
        assert result is not None
        assert TS_HEADER in result.message


def test_the_tolerance_is_configurable(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, NOW, **timestamped(tolerance="10s"))

    def at(ts: int) -> Rejection | None:
        return verifier.verify(request(headers={HEADER: sign(f"{ts}.".encode() + BODY), TS_HEADER: str(ts)}))

    assert at(NOW - 10) is None
    assert at(NOW + 10) is None
    assert_rejected(at(NOW - 11), "timestamp_out_of_tolerance")
    assert_rejected(at(NOW + 11), "timestamp_out_of_tolerance")


def test_a_stale_request_with_a_bad_signature_is_invalid_not_stale(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, NOW, **timestamped())
    ts = NOW - 3600
    forged = sign(f"{ts}.".encode() + BODY, "not-the-secret")
    assert_rejected(
        verifier.verify(request(headers={HEADER: forged, TS_HEADER: str(ts)})), "invalid_signature"
    )


def test_a_missing_timestamp_is_missing_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, NOW, **timestamped())
    good = sign(f"{NOW}.".encode() + BODY)
    for headers in ({HEADER: good}, {HEADER: good, TS_HEADER: ""}):
        result = verifier.verify(request(headers=headers))
        assert_rejected(result, "missing_signature")
        assert result is not None and TS_HEADER in result.message


@pytest.mark.parametrize(
    "value",
    [
        "soon",
        "-1700000000",
        "1700000000.0",
        "1.7e9",
        "+1700000000",
        " 1700000000",
        "0x6553f100",
        "\u0661\u0667" + "\u0660" * 8,
        "9" * 16,
        "1_700_000_000",
        "\udcff",
        "1700000000\n",
    ],
)
def test_a_malformed_timestamp_is_invalid_signature_never_an_error(hooks: Hooks, value: str) -> None:
    verifier = make_verifier(hooks, NOW, **timestamped())
    signature = sign(f"{value}.".encode("utf-8", "surrogatepass") + BODY)
    assert_rejected(
        verifier.verify(request(headers={HEADER: signature, TS_HEADER: value})), "invalid_signature"
    )


def test_a_header_is_signed_with_the_body(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret="s3cret", signed_content="{header.X-Request-Id}:{body}")
    good = sign(b"req_42:" + BODY)
    assert verifier.verify(request(headers={HEADER: good, "X-Request-Id": "req_42"})) is None
    assert verifier.verify(request(headers={HEADER: good, "x-request-id": "req_42"})) is None
    assert_rejected(
        verifier.verify(request(headers={HEADER: good, "X-Request-Id": "req_43"})), "invalid_signature"
    )
    # An empty header is signed as empty; an absent one is refused before any HMAC is computed.
    assert verifier.verify(request(headers={HEADER: sign(b":" + BODY), "X-Request-Id": ""})) is None
    missing = verifier.verify(request(headers={HEADER: good}))
    assert_rejected(missing, "missing_signature")
    assert missing is not None and "X-Request-Id" in missing.message


def test_header_values_are_signed_as_their_bytes_on_the_wire(hooks: Hooks) -> None:
    # The ASGI layer decodes header bytes as latin-1; the signature covers the bytes that were sent.
    verifier = make_verifier(hooks, secret="s3cret", signed_content="{header.X-Request-Id}:{body}")
    raw = "réq".encode()
    good = sign(raw + b":" + BODY)
    assert verifier.verify(request(headers={HEADER: good, "X-Request-Id": raw.decode("latin-1")})) is None


def test_a_template_with_several_parts_literals_and_braces(hooks: Hooks) -> None:
    verifier = make_verifier(
        hooks,
        NOW,
        secret=["old", "s3cret"],
        algorithm="sha512",
        encoding="base64",
        prefix="v2=",
        signed_content="{{v2}}|{header.X-Account}|{timestamp}|{body}|end",
        timestamp_header=TS_HEADER,
        tolerance="1m",
    )
    content = b"{v2}|acct_1|" + str(NOW).encode() + b"|" + BODY + b"|end"
    for secret in ("old", "s3cret"):
        digest = hmac.new(secret.encode(), content, hashlib.sha512).digest()
        headers = {
            HEADER: "v2=" + base64.b64encode(digest).decode(),
            "X-Account": "acct_1",
            TS_HEADER: str(NOW),
        }
        assert verifier.verify(request(headers=headers)) is None, secret
    digest = hmac.new(b"retired", content, hashlib.sha512).digest()
    headers = {HEADER: "v2=" + base64.b64encode(digest).decode(), "X-Account": "acct_1", TS_HEADER: str(NOW)}
    assert_rejected(verifier.verify(request(headers=headers)), "invalid_signature")


def test_slacks_scheme_as_a_template_agrees_with_slack_sdk(hooks: Hooks) -> None:
    """Slack signs `v0:{timestamp}:{body}`: the template must accept what Slack's SDK signs."""
    secret = "8f742231b10e8888abcd99yyyzzz85a5"
    verifier = make_verifier(
        hooks,
        NOW,
        header="X-Slack-Signature",
        secret=secret,
        prefix="v0=",
        signed_content="v0:{timestamp}:{body}",
        timestamp_header="X-Slack-Request-Timestamp",
    )
    body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&command=%2Fweather&text=94070"
    slack = SignatureVerifier(secret)
    signature = slack.generate_signature(timestamp=str(NOW), body=body)
    assert signature is not None
    headers = {"X-Slack-Signature": signature, "X-Slack-Request-Timestamp": str(NOW)}
    assert verifier.verify(request(body, headers)) is None
    tampered = body.replace(b"94070", b"94071")
    assert not SignatureVerifier(secret, clock=_Clock(NOW)).is_valid_request(tampered, headers)
    assert_rejected(verifier.verify(request(tampered, headers)), "invalid_signature")


class _Clock(Clock):
    def __init__(self, now: float):
        self._now = now

    def now(self) -> float:
        return self._now


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ("signed_content: '{foo}.{body}'\n", ("unknown placeholder {foo}", "{body}", "{header.<name>}")),
        ("signed_content: '{Body}'\n", ("unknown placeholder {body}",)),
        ("signed_content: '{header.}{body}'\n", ("unknown placeholder {header.}",)),
        ("signed_content: '{header.X Id}{body}'\n", ("unknown placeholder {header.x id}",)),
        ("signed_content: '{ body }'\n", ("unknown placeholder { body }",)),
        ("signed_content: '{body'\n", ("stray '{'",)),
        ("signed_content: '{body}}'\n", ("stray '}'",)),
        ("signed_content: '{timestamp}.{body}'\n", ("{timestamp}", "timestamp_header")),
        ("signed_content: '{header.X-Id}'\n", ("must hold {body}",)),
        ("signed_content: ''\n", ("must hold {body}",)),
        ("timestamp_header: X-Ts\n", ("does not hold {timestamp}",)),
        (
            "signed_content: '{header.X-Ts}.{body}'\ntimestamp_header: X-Ts\n",
            ("does not hold {timestamp}",),
        ),
        ("tolerance: 5m\n", ("tolerance", "timestamp_header")),
        (
            "signed_content: '{timestamp}{body}'\ntimestamp_header: X-Ts\ntolerance: 0s\n",
            ("tolerance must be longer than 0s",),
        ),
        (
            "signed_content: '{timestamp}{body}'\ntimestamp_header: 'X Ts'\n",
            ("is not a header name",),
        ),
    ],
)
def test_bad_templates_are_refused_at_load_with_file_line_and_path(
    hooks: Hooks, block: str, words: tuple[str, ...]
) -> None:
    error = config_error(hooks, "type: hmac\nheader: X-Sig\nsecret: s\n" + block)
    assert_problem(error, "x.yaml:3: $.sources.acme.verify", *words)


def test_a_malformed_tolerance_is_refused_at_its_own_line(hooks: Hooks) -> None:
    error = config_error(
        hooks,
        """\
        type: hmac
        header: X-Sig
        secret: s
        signed_content: "{timestamp}.{body}"
        timestamp_header: X-Ts
        tolerance: 5 minutes
        """,
    )
    assert_problem(error, "x.yaml:9: $.sources.acme.verify.tolerance", "duration")


def test_an_unknown_template_option_is_refused(hooks: Hooks) -> None:
    error = config_error(hooks, "type: hmac\nheader: X-Sig\nsecret: s\nsigned_contents: '{body}'\n")
    assert_problem(error, "x.yaml:7: $.sources.acme.verify.signed_contents", "signed_content")
