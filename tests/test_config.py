"""Config loading: Structs, defaults, `${VAR}` interpolation, and file:line: $.path: errors."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
import yaml

from hookgate.config import (
    DEFAULT_RETRY_SCHEDULE,
    UNSUPPORTED,
    Config,
    ConfigError,
    EndpointConfig,
    LoadedConfig,
    json_schema,
    load,
    load_server,
    loads,
)
from hookgate.hookspecs import hookimpl
from hookgate.plugin_host.hooks import Hooks
from hookgate.plugin_kit.units import Duration
from hookgate.types import ComponentKind, ComponentRegistry
from hookgate_builtins import hmac as hmac_plugin
from hookgate_builtins import standard_webhooks

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Depth(msgspec.Struct, forbid_unknown_fields=True):
    depth: int


class ProbeOptions(msgspec.Struct, kw_only=True):
    """A plugin's options; deliberately without forbid_unknown_fields (the loader refuses anyway)."""

    token: str
    mode: Literal["strict", "lax"] = "strict"
    window: Duration = "5m"
    nested: Depth | None = None
    port: int = 0

    def __post_init__(self) -> None:
        if self.token == "revoked":
            raise ValueError("token is revoked")


class ProbePlugin:
    @hookimpl
    def hookgate_register_components(self, registry: ComponentRegistry) -> None:
        registry.add_verifier("probe", ProbeOptions, lambda options: options)
        registry.add_signer("probe-signer", ProbeOptions, lambda options: options)


@pytest.fixture(scope="module")
def registry() -> ComponentRegistry:
    # Only known plugins, so that what else is installed cannot change the messages.
    return Hooks([hmac_plugin, standard_webhooks, ProbePlugin()], load_entry_points=False).registry


def cfg(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def ok(registry: ComponentRegistry, text: str, env: dict[str, str] | None = None) -> LoadedConfig:
    return loads(cfg(text), registry, file="hookgate.yaml", env=env or {})


def problems(registry: ComponentRegistry, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(cfg(text), registry, file="hookgate.yaml", env=env or {})
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


# --- defaults -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n"])
def test_an_empty_file_means_every_default(registry: ComponentRegistry, text: str) -> None:
    loaded = loads(text, registry, file="hookgate.yaml", env={})
    assert loaded.config == Config()
    assert loaded.verifiers == {} and loaded.signers == {}


def test_defaults(registry: ComponentRegistry) -> None:
    config = ok(
        registry,
        """
        endpoints:
          a: {url: "http://a.test/hooks"}
          b: {url: "http://b.test/hooks"}
        """,
    ).config
    assert config.server.listen == "127.0.0.1:8080"
    assert config.server.max_body == "1MiB"
    assert config.server.api_tokens == []
    assert config.server.publish_timeout == "5s"
    assert config.server.shutdown_grace == "10s"
    assert config.broker.url is None
    assert config.broker.data_dir == ".hookgate"
    assert config.broker.replicas == 1
    assert config.broker.retention == "72h"
    assert config.broker.dedup_window == "24h"
    assert config.broker.prefix == "hookgate"
    a = config.endpoints["a"]
    assert a.timeout == "15s"
    assert a.retry.schedule == ["5s", "5m", "30m", "2h", "5h", "10h", "10h"] == DEFAULT_RETRY_SCHEDULE
    assert a.retry.jitter == 0.2
    assert a.concurrency == 10
    assert a.headers == {} and a.signing is None and a.subject is None
    # Each endpoint has its own default list: changing one must not change the other.
    a.retry.schedule.append("1d")
    assert config.endpoints["b"].retry.schedule == DEFAULT_RETRY_SCHEDULE
    assert EndpointConfig().retry.schedule == DEFAULT_RETRY_SCHEDULE


def test_a_full_config_converts_into_the_structs(registry: ComponentRegistry) -> None:
    loaded = ok(
        registry,
        f"""
        server:
          listen: 0.0.0.0:9090
          tls: {{certfile: c.pem, keyfile: k.pem}}
          max_body: 64KiB
          api_tokens: [t1, t2]
        broker:
          url: [nats://n1:4222, nats://n2:4222]
          user: u
          password: p
          replicas: 3
          retention: 5d
        sources:
          acme:
            verify: {{type: hmac, header: X-Sig, secret: s3cret, algorithm: sha512, encoding: base64}}
            event_type: header.X-Event
            event_id: body.id
            response: {{status: 200, body: '{{"ok":true}}'}}
        endpoints:
          billing:
            url: https://billing.test/hooks
            timeout: 1m30s
            headers: {{X-Team: billing}}
            signing: {{scheme: standard-webhooks, secret: {WHSEC}}}
            retry: {{schedule: [1s, 1m], jitter: 0}}
            concurrency: 4
          audit: {{subject: audit.events}}
        routes:
          - name: invoices
            from: [acme, internal]
            types: ["invoice.*"]
            to: [billing, audit]
          - to: [audit]
        """,
    )
    c = loaded.config
    assert c.server.tls is not None and c.server.tls.keyfile == "k.pem"
    assert c.broker.url == ["nats://n1:4222", "nats://n2:4222"]
    assert c.broker.replicas == 3
    assert c.sources["acme"].response is not None and c.sources["acme"].response.status == 200
    assert c.endpoints["billing"].retry.schedule == ["1s", "1m"]
    assert c.endpoints["billing"].retry.jitter == 0.0
    assert c.endpoints["audit"].subject == "audit.events"
    assert [r.name for r in c.routes] == ["invoices", None]
    assert c.routes[0].from_ == ["acme", "internal"]
    verifier = loaded.verifiers["acme"]
    assert (verifier.kind, verifier.type) == (ComponentKind.VERIFIER, "hmac")
    assert isinstance(verifier.config, hmac_plugin.HmacConfig)
    assert verifier.config.algorithm == "sha512"
    signer = loaded.signers["billing"]
    assert signer.type == "standard-webhooks"
    assert isinstance(signer.config, standard_webhooks.StandardWebhooksConfig)
    assert set(loaded.signers) == {"billing"}


@pytest.mark.parametrize("section", ["server", "broker", "sources", "endpoints", "routes"])
def test_a_null_section_means_its_defaults(registry: ComponentRegistry, section: str) -> None:
    assert ok(registry, f"{section}:\n").config == Config()


def test_null_values_mean_defaults(registry: ComponentRegistry) -> None:
    config = ok(
        registry,
        """
        sources:
          github:
        endpoints:
          a:
            url: http://a.test
            timeout:
            retry:
        """,
    ).config
    assert config.sources["github"].verify is None
    assert config.endpoints["a"].timeout == "15s"
    assert config.endpoints["a"].retry.schedule == DEFAULT_RETRY_SCHEDULE


# --- the shape of the file ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "hookgate.yaml:1: $: expected a mapping of sections, got a list"),
        ("hello\n", 'hookgate.yaml:1: $: expected a mapping of sections, got "hello"'),
    ],
)
def test_the_top_level_must_be_a_mapping(registry: ComponentRegistry, text: str, expected: str) -> None:
    assert problems(registry, text) == [expected]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("server:\n  listen: [\n", 3),
        ("server:\n  listen: a\n bad: x\n", 3),
        ("server:\n\tlisten: a\n", 2),
        ("a: 1\n---\nb: 2\n", 2),
        ('server:\n  listen: "unterminated\n', 3),
    ],
)
def test_yaml_syntax_errors_have_a_line(registry: ComponentRegistry, text: str, line: int) -> None:
    (problem,) = problems(registry, text)
    assert problem.startswith(f"hookgate.yaml:{line}: $: invalid YAML: ")


def test_an_unquoted_variable_in_a_flow_mapping_gets_a_hint(registry: ComponentRegistry) -> None:
    (problem,) = problems(registry, "endpoints:\n  a: {url: http://a.test, concurrency: ${N}}\n")
    assert problem.startswith("hookgate.yaml:2: $: invalid YAML: ")
    assert 'quote values that use variables: "${VAR}"' in problem


def test_duplicate_keys_are_errors(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        server:
          listen: 127.0.0.1:1
          listen: 127.0.0.1:2
        endpoints:
          a: {url: "http://a.test"}
          a: {url: "http://b.test"}
        """,
    ) == [
        "hookgate.yaml:3: $.server.listen: duplicate key",
        "hookgate.yaml:6: $.endpoints.a: duplicate key",
    ]


def test_an_unknown_key_names_its_path_and_suggests(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        server:
          lisen: 127.0.0.1:8080
        brokers: {}
        endpoints:
          a:
            url: http://a.test
            xyzzy: 1
        """,
    ) == [
        'hookgate.yaml:2: $.server.lisen: unknown key; did you mean "listen"?',
        'hookgate.yaml:3: $.brokers: unknown key; did you mean "broker"?',
        "hookgate.yaml:7: $.endpoints.a.xyzzy: unknown key; expected one of: "
        "url, subject, timeout, headers, signing, auth, retry, concurrency, rate_limit, "
        "circuit_breaker, ordered, proxy, disable_after",
    ]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("endpoints:\n  a:\n    url: http://a.test\n    concurrency: many\n",
         'hookgate.yaml:4: $.endpoints.a.concurrency: expected an integer, got "many"'),
        ("endpoints:\n  a:\n    url: http://a.test\n    concurrency: 0\n",
         "hookgate.yaml:4: $.endpoints.a.concurrency: expected an integer >= 1, got 0"),
        ("endpoints:\n  a:\n    url: http://a.test\n    concurrency: 2.5\n",
         "hookgate.yaml:4: $.endpoints.a.concurrency: expected an integer, got 2.5"),
        ("server:\n  api_tokens: abc\n", 'hookgate.yaml:2: $.server.api_tokens: expected a list, got "abc"'),
        ("server:\n  max_body: 5\n",
         'hookgate.yaml:2: $.server.max_body: expected a size like "64KiB", got 5'),
        ("server:\n  max_body: 1 MiB\n",
         'hookgate.yaml:2: $.server.max_body: expected a size like "64KiB", got "1 MiB"'),
        ("server:\n  publish_timeout: 5\n",
         'hookgate.yaml:2: $.server.publish_timeout: expected a duration like "5m", got 5'),
        ("server: [a]\n", "hookgate.yaml:1: $.server: expected a mapping, got a list"),
        ("sources: [a]\n", "hookgate.yaml:1: $.sources: expected a mapping, got a list"),
        ("routes: {a: 1}\n", "hookgate.yaml:1: $.routes: expected a list, got a mapping"),
        ("routes: [a]\n", 'hookgate.yaml:1: $.routes[0]: expected a mapping, got "a"'),
        ("sources:\n  a:\n    verify: hmac\n",
         'hookgate.yaml:3: $.sources.a.verify: expected a mapping or null, got "hmac"'),
        ("sources:\n  a:\n    response: {status: 500}\n",
         "hookgate.yaml:3: $.sources.a.response.status: expected an integer <= 299, got 500"),
        ("endpoints:\n  a:\n    url: http://a.test\n    retry: {jitter: 1.5}\n",
         "hookgate.yaml:4: $.endpoints.a.retry.jitter: expected a number < 1.0, got 1.5"),
        ("endpoints:\n  a:\n    url: http://a.test\n    headers: {X-N: 1}\n",
         "hookgate.yaml:4: $.endpoints.a.headers.X-N: expected a string, got 1"),
        ("broker:\n  prefix: a b\n",
         'hookgate.yaml:2: $.broker.prefix: expected dot-separated names like "hookgate" '
         '(letters, digits, "-" and "_"), got "a b"'),
    ],
)  # fmt: skip
def test_wrong_types_name_the_path_and_the_value(
    registry: ComponentRegistry, yaml_text: str, expected: str
) -> None:
    assert problems(registry, yaml_text) == [expected]


def test_the_design_example_error(registry: ComponentRegistry) -> None:
    text = "\n" * 9 + cfg(
        """
        endpoints:
          billing:
            url: http://billing.test/hooks
            retry:
              schedule: [5s, 5m, 5 minutes]
        """
    )
    with pytest.raises(ConfigError) as info:
        loads(text, registry, file="hookgate.yaml", env={})
    assert str(info.value) == (
        "hookgate.yaml:14: $.endpoints.billing.retry.schedule[2]: "
        'expected a duration like "5m", got "5 minutes"'
    )


def test_independent_problems_are_reported_together(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        server:
          max_body: lots
        sources:
          acme:
            verify: {type: hmac, header: X, secret: s, algorithm: md5}
        endpoints:
          billing:
            url: http://billing.test
            timeout: 5 s
            concurrency: many
            retry: {schedule: [1x, 5s, 2y]}
          shipping:
            url: http://shipping.test
            timeout: forever
          fine: {url: "http://fine.test"}
        routes:
          - to: [billing, nowhere]
          - from: [acme]
        """,
    ) == [
        'hookgate.yaml:2: $.server.max_body: expected a size like "64KiB", got "lots"',
        'hookgate.yaml:5: $.sources.acme.verify.algorithm: expected one of "sha1", "sha256", "sha512", '
        'got "md5"',
        'hookgate.yaml:9: $.endpoints.billing.timeout: expected a duration like "5m", got "5 s"',
        'hookgate.yaml:10: $.endpoints.billing.concurrency: expected an integer, got "many"',
        'hookgate.yaml:11: $.endpoints.billing.retry.schedule[0]: expected a duration like "5m", got "1x"',
        'hookgate.yaml:11: $.endpoints.billing.retry.schedule[2]: expected a duration like "5m", got "2y"',
        'hookgate.yaml:14: $.endpoints.shipping.timeout: expected a duration like "5m", got "forever"',
        # billing failed to convert but is declared: the route must not call it unknown.
        'hookgate.yaml:17: $.routes[0].to[1]: no endpoint named "nowhere" '
        "(endpoints: billing, fine, shipping)",
        'hookgate.yaml:18: $.routes[1]: missing required key "to"',
    ]


# --- names and references -------------------------------------------------------------------


def test_internal_is_a_reserved_source_name(registry: ComponentRegistry) -> None:
    assert problems(registry, "sources:\n  internal: {}\n") == [
        'hookgate.yaml:2: $.sources.internal: "internal" is reserved for events published by your services'
    ]


def test_names_must_be_subject_safe(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        sources:
          "a.b": {}
          "x y": {}
          "*": {}
        endpoints:
          "billing>": {url: "http://a.test"}
          ok-name_1: {url: "http://a.test"}
        """,
    ) == [
        "hookgate.yaml:2: $.sources[\"a.b\"]: names may use only letters, digits, '-' and '_' "
        "(they become NATS subjects)",
        "hookgate.yaml:3: $.sources[\"x y\"]: names may use only letters, digits, '-' and '_' "
        "(they become NATS subjects)",
        "hookgate.yaml:4: $.sources[\"*\"]: names may use only letters, digits, '-' and '_' "
        "(they become NATS subjects)",
        "hookgate.yaml:6: $.endpoints[\"billing>\"]: names may use only letters, digits, '-' and '_' "
        "(they become NATS subjects)",
    ]


def test_keys_are_taken_as_written(registry: ComponentRegistry) -> None:
    # YAML 1.1 would turn these keys into True, False and 1.
    config = ok(registry, "sources:\n  yes: {}\n  off: {}\n  1: {}\n").config
    assert list(config.sources) == ["yes", "off", "1"]


def test_endpoints_need_exactly_one_of_url_and_subject(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        endpoints:
          both: {url: "http://a.test", subject: a.b}
          neither: {timeout: 5s}
          bad-url: {url: "ftp://a.test"}
          bad-subject: {subject: "a.*"}
          loops: {subject: hookgate.publish.x}
        """,
    ) == [
        "hookgate.yaml:2: $.endpoints.both: set exactly one of url or subject",
        "hookgate.yaml:3: $.endpoints.neither: set exactly one of url or subject",
        'hookgate.yaml:4: $.endpoints.bad-url.url: expected an http:// or https:// URL, got "ftp://a.test"',
        'hookgate.yaml:5: $.endpoints.bad-subject.subject: expected a NATS subject like "billing.events" '
        '(no spaces or wildcards), got "a.*"',
        'hookgate.yaml:6: $.endpoints.loops.subject: subjects under "hookgate" are hookgate\'s own: '
        "it would loop",
    ]


def test_routes_must_reference_declared_names(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        sources:
          acme: {}
        endpoints:
          billing: {url: "http://billing.test"}
        routes:
          - name: r
            from: [acme, internal, nobody]
            to: [billing, nowhere]
          - name: r
            to: [billing]
          - {to: [], from: [], types: []}
        """,
    ) == [
        'hookgate.yaml:7: $.routes[0].from[2]: no source named "nobody" '
        '(use "internal" for events from your services)',
        'hookgate.yaml:8: $.routes[0].to[1]: no endpoint named "nowhere" (endpoints: billing)',
        "hookgate.yaml:9: $.routes[1].name: duplicate route name (also $.routes[0])",
        # An empty list would silently mean "everything" (from, types) or "nothing" (to).
        "hookgate.yaml:11: $.routes[2].to: expected a list of length >= 1",
        "hookgate.yaml:11: $.routes[2].from: expected a list of length >= 1",
        "hookgate.yaml:11: $.routes[2].types: expected a list of length >= 1",
    ]


# --- environment variables ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${HOST}", "h.test"),
        ('"${HOST}"', "h.test"),
        ("'${HOST}'", "h.test"),
        ("${HOST}:${PORT}", "h.test:8080"),
        ("${NOPE:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),  # as in the shell, `:-` also covers an empty variable
        ("${HOST:-fallback}", "h.test"),
        ("${NOPE:-${HOST}}", "h.test"),
        ("${NOPE:-${ALSO_NOPE:-deep}}", "deep"),
        ("${NOPE:-a b:c}", "a b:c"),
        ('"a$$b"', "a$b"),
        ('"$${HOST}"', "${HOST}"),
        ('"^price$"', "^price$"),
        ('"${YAMLY}"', "a: [b] #c"),
        ('"${EMPTY}"', ""),
        ('"${NOPE:-}"', ""),
    ],
)
def test_interpolation(registry: ComponentRegistry, value: str, expected: str) -> None:
    env = {"HOST": "h.test", "PORT": "8080", "EMPTY": "", "YAMLY": "a: [b] #c"}
    config = ok(registry, f"server:\n  api_tokens:\n    - {value}\n", env).config
    assert config.server.api_tokens == [expected]


def test_a_variable_takes_the_type_of_its_field(registry: ComponentRegistry) -> None:
    env = {"PORT": "8080", "NUM": "123456", "R": "3", "J": "0.5"}
    config = ok(
        registry,
        """
        broker:
          url: nats://n.test
          token: ${NUM}
          replicas: ${R}
        endpoints:
          a:
            url: http://a.test:${PORT}
            concurrency: ${PORT}
            retry: {jitter: "${J}"}
        """,
        env,
    ).config
    assert config.endpoints["a"].concurrency == 8080
    assert config.endpoints["a"].url == "http://a.test:8080"
    assert config.endpoints["a"].retry.jitter == 0.5
    assert config.broker.replicas == 3
    assert config.broker.token == "123456"  # a secret made of digits stays a string
    loaded = ok(
        registry, "sources:\n  s:\n    verify:\n      type: probe\n      token: t\n      port: ${PORT}\n", env
    )
    assert loaded.verifiers["s"].config.port == 8080


def test_a_plain_value_that_expands_to_nothing_is_null(registry: ComponentRegistry) -> None:
    config = ok(registry, "broker:\n  url: ${NATS_URL:-}\n  replicas: ${R:-}\n").config
    assert config.broker.url is None  # so the embedded broker is used
    assert config.broker.replicas == 1
    assert problems(registry, "broker:\n  url: '${NATS_URL:-}'\n") == [
        "hookgate.yaml:2: $.broker.url: expected a NATS URL or a list of them "
        "(omit url for the embedded server)"
    ]


def test_a_missing_variable_is_named_with_its_line_and_path(registry: ComponentRegistry) -> None:
    text = """
        sources:
          acme:
            verify:
              type: hmac
              header: X-Sig
              secret: "${ACME_SECRET}"
        endpoints:
          a:
            url: ${A_URL}
            timeout: ${A_TIMEOUT}
            concurrency: ${A_CONCURRENCY}
            retry: {schedule: ["${A_RETRY}", 5s]}
            signing: {scheme: "${A_SCHEME}", secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}
        server:
          listen: ${HOST}:${PORT}
        """
    # Only the missing variables: not the empty values' knock-on errors (not a URL, not a
    # duration, an empty secret, an unknown signer "").
    assert problems(registry, text) == [
        "hookgate.yaml:6: $.sources.acme.verify.secret: environment variable ACME_SECRET is not set",
        "hookgate.yaml:9: $.endpoints.a.url: environment variable A_URL is not set",
        "hookgate.yaml:10: $.endpoints.a.timeout: environment variable A_TIMEOUT is not set",
        "hookgate.yaml:11: $.endpoints.a.concurrency: environment variable A_CONCURRENCY is not set",
        "hookgate.yaml:12: $.endpoints.a.retry.schedule[0]: environment variable A_RETRY is not set",
        "hookgate.yaml:13: $.endpoints.a.signing.scheme: environment variable A_SCHEME is not set",
        "hookgate.yaml:15: $.server.listen: environment variable HOST is not set",
        "hookgate.yaml:15: $.server.listen: environment variable PORT is not set",
    ]
    ok(registry, text, {"ACME_SECRET": "s", "A_URL": "http://a.test", "A_TIMEOUT": "5s",
                        "A_CONCURRENCY": "2", "A_RETRY": "1s", "A_SCHEME": "standard-webhooks",
                        "HOST": "127.0.0.1", "PORT": "0"})  # fmt: skip


@pytest.mark.parametrize("value", ["${1BAD}", "${UNCLOSED", "${A:-b", "${A-b}", "${A:?err}", "${}"])
def test_invalid_references_are_errors(registry: ComponentRegistry, value: str) -> None:
    (problem,) = problems(registry, f"server:\n  api_tokens: ['{value}']\n", {"A": "a"})
    assert problem.startswith(
        f'hookgate.yaml:2: $.server.api_tokens[0]: invalid variable reference in "{value}"'
    )


def test_variables_come_from_os_environ_by_default(
    registry: ComponentRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOKGATE_TEST_TOKEN", "from-env")
    config = loads("server:\n  api_tokens: ['${HOOKGATE_TEST_TOKEN}']\n", registry).config
    assert config.server.api_tokens == ["from-env"]


def test_keys_are_not_interpolated(registry: ComponentRegistry) -> None:
    config = ok(
        registry, "endpoints:\n  a:\n    url: http://a.test\n    headers: {X-$A: v}\n", {"A": "x"}
    ).config
    assert config.endpoints["a"].headers == {"X-$A": "v"}


# --- not supported yet ----------------------------------------------------------------------


def _place(data: dict[str, Any], pattern: str, value: Any) -> str:
    """Put `value` at a concrete path for `pattern` (`*` -> "x", `[*]` -> [0]); return the path."""
    steps = re.findall(r"\.([^.\[]+)|(\[\*\])", pattern)
    node: Any = data
    path = "$"
    for i, (key, index) in enumerate(steps):
        last = i == len(steps) - 1
        if index:
            node, path = node[0], f"{path}[0]"
            continue
        key = "x" if key == "*" else key
        path = f"{path}.{key}"
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})
    return path


# Every key of the contract is implemented now; the refusal stays for keys still to come.
EXAMPLE_UNSUPPORTED = {"$.broker.example_key": "an example", "$.endpoints.*.example_key": "an example"}


@pytest.mark.parametrize("pattern", list(EXAMPLE_UNSUPPORTED))
@pytest.mark.parametrize("value", [{"a": 1}, False, [], None])
def test_keys_not_supported_yet_are_refused_whatever_their_value(
    registry: ComponentRegistry, pattern: str, value: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hookgate.config.loading.UNSUPPORTED", EXAMPLE_UNSUPPORTED)
    data: dict[str, Any] = {
        "sources": {"x": {}},
        "endpoints": {"x": {"url": "http://x.test", "retry": {}}},
        "routes": [{"to": ["x"]}],
    }
    path = _place(data, pattern, value)
    with pytest.raises(ConfigError) as info:
        loads(yaml.safe_dump(data), registry, file="hookgate.yaml", env={})
    (problem,) = info.value.problems
    assert problem.path == path
    assert problem.line is not None
    assert problem.message == "not supported yet (an example); remove it"


def test_every_key_of_the_design_example_is_supported(registry: ComponentRegistry) -> None:
    assert UNSUPPORTED == {}
    config = ok(
        registry,
        """
        egress:
          allow_networks: []
          proxy: http://proxy.test:3128
        broker:
          url: [nats://n1.test:4222, nats://n2.test:4222]
          nkey_seed: secrets/hookgate.nk
          tls: {ca_file: ca.pem, cert_file: client.pem, key_file: client.key}
          replicas: 3
        endpoints:
          billing:
            url: http://billing.test
            rate_limit: {rate: 50, per: 1s, burst: 100}
            disable_after: 5d
        routes:
          - to: [billing]
        """,
    ).config
    # Config text without a file: paths stay as written (relative to the working directory).
    assert config.broker.nkey_seed == "secrets/hookgate.nk"
    assert config.broker.tls is not None and config.broker.tls.key_file == "client.key"


def test_route_filters_and_egress_networks_are_validated_with_their_paths(
    registry: ComponentRegistry,
) -> None:
    assert problems(
        registry,
        """
        egress:
          allow_networks: [10.0.0.0/8, 10.0.0.1/8]
        endpoints:
          billing: {url: http://billing.test}
        routes:
          - to: [billing]
            filter:
              amount: {$gte: 1000}
              kind: {$regex: "(unclosed"}
              other: {$foo: 1}
        """,
    ) == [
        "hookgate.yaml:2: $.egress.allow_networks[1]: '10.0.0.1/8' is not a valid CIDR network "
        "(10.0.0.1/8 has host bits set); did you mean 10.0.0.0/8?",
        'hookgate.yaml:9: $.routes[0].filter.kind["$regex"]: '
        "invalid regular expression: missing ), unterminated subpattern at position 0",
        'hookgate.yaml:10: $.routes[0].filter.other["$foo"]: unknown operator "$foo"; '
        "expected one of $eq, $ne, $gt, $gte, $lt, $lte, $in, $nin, $exists, $regex, $not",
    ]


# --- plugin components ----------------------------------------------------------------------


def test_component_options_get_the_same_error_format(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        sources:
          acme:
            verify: {type: hmac, header: X, secret: s, algorithm: md5}
          probe:
            verify:
              type: probe
              token: t
              mode: loose
              window: 5 minutes
              nested: {depth: deep}
              tokn: x
          missing:
            verify: {type: probe}
          revoked:
            verify: {type: probe, token: revoked}
        """,
    ) == [
        'hookgate.yaml:3: $.sources.acme.verify.algorithm: expected one of "sha1", "sha256", "sha512", '
        'got "md5"',
        'hookgate.yaml:8: $.sources.probe.verify.mode: expected one of "strict", "lax", got "loose"',
        'hookgate.yaml:9: $.sources.probe.verify.window: expected a duration like "5m", got "5 minutes"',
        'hookgate.yaml:10: $.sources.probe.verify.nested.depth: expected an integer, got "deep"',
        # ProbeOptions does not forbid unknown fields, but a typo must not pass unnoticed.
        # (token is set already, so it is not suggested.)
        "hookgate.yaml:11: $.sources.probe.verify.tokn: unknown key; "
        "expected one of: token, mode, window, nested, port",
        'hookgate.yaml:13: $.sources.missing.verify: missing required key "token"',
        "hookgate.yaml:15: $.sources.revoked.verify: token is revoked",
    ]


def test_unknown_component_types_list_the_installed_ones(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        sources:
          a:
            verify: {type: stripe, secret: s}
          b:
            verify: {header: X}
        endpoints:
          c:
            url: http://c.test
            signing: {scheme: hmac, secret: s}
          d:
            url: http://d.test
            signing: {type: standard-webhooks}
        """,
    ) == [
        'hookgate.yaml:3: $.sources.a.verify.type: unknown verifier "stripe" '
        "(installed verifiers: hmac, probe, standard-webhooks, svix)",
        'hookgate.yaml:5: $.sources.b.verify: missing required key "type" '
        "(installed verifiers: hmac, probe, standard-webhooks, svix)",
        'hookgate.yaml:9: $.endpoints.c.signing.scheme: unknown signer "hmac" '
        "(installed signers: probe-signer, standard-webhooks)",
        'hookgate.yaml:12: $.endpoints.d.signing: missing required key "scheme" '
        "(installed signers: probe-signer, standard-webhooks)",
    ]


def test_signer_options_are_converted(registry: ComponentRegistry) -> None:
    loaded = ok(
        registry,
        "endpoints:\n  a:\n    url: http://a.test\n"
        "    signing: {scheme: probe-signer, token: t, mode: lax}\n",
    )
    component = loaded.signers["a"]
    assert component.kind is ComponentKind.SIGNER
    assert component.config == ProbeOptions(token="t", mode="lax")


# --- rules that span fields -----------------------------------------------------------------


def test_broker_rules(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        broker:
          token: t
          replicas: 3
          dedup_window: 100h
        """,
    ) == [
        "hookgate.yaml:2: $.broker.token: only used with an external broker: set broker.url",
        "hookgate.yaml:3: $.broker.replicas: the embedded broker is a single server: replicas must be 1",
        "hookgate.yaml:4: $.broker.dedup_window: must not be longer than broker.retention (72h)",
    ]
    assert problems(
        registry, "broker:\n  url: [nats://a.test, http://b.test]\n  password: p\n  replicas: 6\n"
    ) == [
        "hookgate.yaml:4: $.broker.replicas: expected an integer <= 5, got 6",
    ]
    assert problems(registry, "broker:\n  url: [nats://a.test, http://b.test]\n  password: p\n") == [
        'hookgate.yaml:2: $.broker.url[1]: expected a nats://, tls://, ws:// or wss:// URL, got "http://b.test"',
        "hookgate.yaml:3: $.broker.password: set user with password",
    ]


def test_broker_credentials_need_an_external_broker_and_one_way_to_authenticate(
    registry: ComponentRegistry,
) -> None:
    assert problems(registry, "broker:\n  nkey_seed: user.nk\n  creds: user.creds\n") == [
        "hookgate.yaml:2: $.broker.nkey_seed: only used with an external broker: set broker.url",
        "hookgate.yaml:3: $.broker.creds: only used with an external broker: set broker.url",
    ]
    text = """
        broker:
          url: nats://n.test
          token: t
          user: u
          password: p
          nkey_seed: user.nk
          tls: {key_file: client.key}
        """
    assert problems(registry, text) == [
        "hookgate.yaml:4: $.broker.user: set one way to authenticate: token is set already",
        "hookgate.yaml:6: $.broker.nkey_seed: set one way to authenticate: token is set already",
        "hookgate.yaml:7: $.broker.tls.key_file: set cert_file with key_file",
    ]
    assert problems(registry, "broker:\n  url: nats://n.test\n  creds: ''\n") == [
        'hookgate.yaml:3: $.broker.creds: expected a string of length >= 1, got ""',
    ]
    assert problems(registry, text.replace("token: t", "")) == [
        "hookgate.yaml:6: $.broker.nkey_seed: set one way to authenticate: user is set already",
        "hookgate.yaml:7: $.broker.tls.key_file: set cert_file with key_file",
    ]


def test_a_seed_given_for_the_seed_file_is_refused_without_echoing_it(registry: ComponentRegistry) -> None:
    seed = "SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4"
    (problem,) = problems(registry, f"broker:\n  url: nats://n.test\n  nkey_seed: {seed}\n")
    assert problem.startswith("hookgate.yaml:3: $.broker.nkey_seed: this is a seed itself, not a file")
    assert seed not in problem and seed[:12] not in problem


def test_load_resolves_file_paths_against_the_config_files_directory(
    registry: ComponentRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc" / "hookgate"
    conf.mkdir(parents=True)
    (conf / "hookgate.yaml").write_text(
        cfg(
            """
            server:
              tls: {certfile: tls/cert.pem, keyfile: /abs/key.pem}
            broker:
              url: nats://n.test
              data_dir: data
              nkey_seed: ../secrets/hookgate.nk
              tls: {ca_file: ca.pem, cert_file: ./client.pem, key_file: client.key}
            """
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = load(Path("..") / "etc" / "hookgate" / "hookgate.yaml", registry, env={}).config
    base = str(conf)
    assert c.server.tls is not None and c.broker.tls is not None
    assert (c.server.tls.certfile, c.server.tls.keyfile) == (f"{base}/tls/cert.pem", "/abs/key.pem")
    assert c.broker.data_dir == f"{base}/data"
    assert c.broker.nkey_seed == f"{tmp_path}/etc/secrets/hookgate.nk"
    assert (c.broker.tls.ca_file, c.broker.tls.cert_file, c.broker.tls.key_file) == (
        f"{base}/ca.pem",
        f"{base}/client.pem",
        f"{base}/client.key",
    )
    monkeypatch.chdir(tmp_path)
    c = load(conf / "hookgate.yaml", registry, env={}).config
    assert c.broker.creds is None and c.broker.nkey_seed == f"{tmp_path}/etc/secrets/hookgate.nk"


def test_a_retry_delay_must_fit_in_the_retention(registry: ComponentRegistry) -> None:
    text = """
        broker:
          retention: 12h
          dedup_window: 1h
        endpoints:
          a:
            url: http://a.test
            retry: {schedule: [1m, 10h, 1h]}
        """
    assert problems(registry, text) == [
        "hookgate.yaml:7: $.endpoints.a.retry.schedule[1]: 10h (up to 12h with jitter) must be shorter than "
        "broker.retention (12h), or the retry expires before it is due",
    ]
    ok(registry, text.replace("12h", "13h"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  listen: localhost\n",
         'hookgate.yaml:2: $.server.listen: expected host:port like "127.0.0.1:8080", got "localhost"'),
        ("server:\n  listen: 127.0.0.1:99999\n",
         'hookgate.yaml:2: $.server.listen: expected host:port like "127.0.0.1:8080", got "127.0.0.1:99999"'),
        ("server:\n  max_body: 0KiB\n", "hookgate.yaml:2: $.server.max_body: must be more than 0"),
        ("server:\n  publish_timeout: 0s\n",
         "hookgate.yaml:2: $.server.publish_timeout: must be more than 0"),
        ("endpoints:\n  a: {url: 'http://a.test', timeout: 0ms}\n",
         "hookgate.yaml:2: $.endpoints.a.timeout: must be more than 0"),
        ("endpoints:\n  a:\n    url: http://a.test\n    headers: {Webhook-Signature: x}\n",
         "hookgate.yaml:4: $.endpoints.a.headers.Webhook-Signature: hookgate sets this header itself"),
        ("endpoints:\n  a:\n    url: http://a.test\n    headers: {hookgate-attempt: x}\n",
         "hookgate.yaml:4: $.endpoints.a.headers.hookgate-attempt: hookgate sets this header itself"),
        ("endpoints:\n  a:\n    url: http://a.test\n    headers: {'X Team': x}\n",
         'hookgate.yaml:4: $.endpoints.a.headers["X Team"]: not a valid header name'),
        ('endpoints:\n  a:\n    url: http://a.test\n    headers: {X-Team: "tok\\x01en"}\n',
         "hookgate.yaml:4: $.endpoints.a.headers.X-Team: the value holds a control character or is not "
         "ISO-8859-1; it could not be sent"),
        ("sources:\n  a: {event_id: 'header.'}\n",
         'hookgate.yaml:2: $.sources.a.event_id: "header." needs a name after the dot'),
    ],
)  # fmt: skip
def test_value_rules(registry: ComponentRegistry, text: str, expected: str) -> None:
    assert problems(registry, text) == [expected]


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:0", "0.0.0.0:8080", "[::1]:8080", "localhost:80", "unix:/tmp/s"]
)
def test_listen_forms(registry: ComponentRegistry, listen: str) -> None:
    assert ok(registry, f"server:\n  listen: '{listen}'\n").config.server.listen == listen


# --- YAML features --------------------------------------------------------------------------


def test_merge_keys_and_anchors(registry: ComponentRegistry) -> None:
    config = ok(
        registry,
        """
        endpoints:
          a: &defaults
            url: http://a.test
            timeout: 5s
            concurrency: 3
          b:
            <<: *defaults
            url: http://b.test
            concurrency: 7
          c:
            <<: [{timeout: 9s}, *defaults]
          d: *defaults
        """,
    ).config
    e = config.endpoints
    assert (e["b"].url, e["b"].timeout, e["b"].concurrency) == ("http://b.test", "5s", 7)
    assert (e["c"].url, e["c"].timeout, e["c"].concurrency) == ("http://a.test", "9s", 3)
    assert e["d"] == e["a"]


def test_a_merged_mapping_keeps_the_lines_of_its_own_keys(registry: ComponentRegistry) -> None:
    assert problems(
        registry,
        """
        endpoints:
          a: &defaults
            url: http://a.test
            timeout: 5 s
          b:
            <<: *defaults
            concurrency: none
        """,
    ) == [
        'hookgate.yaml:4: $.endpoints.a.timeout: expected a duration like "5m", got "5 s"',
        'hookgate.yaml:4: $.endpoints.b.timeout: expected a duration like "5m", got "5 s"',
        'hookgate.yaml:7: $.endpoints.b.concurrency: expected an integer, got "none"',
    ]


def test_a_recursive_alias_is_an_error(registry: ComponentRegistry) -> None:
    assert problems(registry, "server:\n  api_tokens: &a [*a]\n") == [
        "hookgate.yaml:2: $.server.api_tokens[0]: an alias refers to a node that contains it",
    ]


def test_alias_bombs_are_refused(registry: ComponentRegistry) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    assert problems(registry, "\n".join(lines) + "\n") == [
        "hookgate.yaml: $: more than 200,000 values once aliases are expanded"
    ]


def test_unknown_tags_are_errors(registry: ComponentRegistry) -> None:
    assert problems(registry, "server:\n  listen: !env HOOKGATE_LISTEN\n") == [
        "hookgate.yaml:2: $.server.listen: "
        "invalid value: could not determine a constructor for the tag '!env'"
    ]


# --- files ----------------------------------------------------------------------------------


def test_load_reads_a_file_and_names_it(registry: ComponentRegistry, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("server:\n  listen: 127.0.0.1:1\n  nope: 1\n")
    with pytest.raises(ConfigError) as info:
        load(path, registry, env={})
    assert str(info.value) == (
        f"{path}:3: $.server.nope: unknown key; "
        "expected one of: workers, role, listen, tls, max_body, api_tokens, publish_timeout, shutdown_grace, "
        "header_timeout, body_timeout, max_connections, backlog, max_in_flight, max_unrouted"
    )
    path.write_text("server:\n  listen: 127.0.0.1:1\n")
    loaded = load(path, registry, env={})
    assert loaded.path == path
    assert loaded.config.server.listen == "127.0.0.1:1"


def test_unreadable_files(registry: ComponentRegistry, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.yaml", registry)
    assert str(info.value) == f"{tmp_path / 'missing.yaml'}: $: cannot read config: No such file or directory"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"server:\n  listen: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(latin1, registry)


# --- JSON Schema ----------------------------------------------------------------------------


def test_the_json_schema_offers_each_components_options(registry: ComponentRegistry) -> None:
    schema = json_schema(registry)
    defs = schema["$defs"]
    verify = defs["SourceConfig"]["properties"]["verify"]["anyOf"]
    refs = sorted(v["$ref"].split("/")[-1] for v in verify if "$ref" in v)
    assert refs == ["HmacConfig", "ProbeOptions", "StandardWebhooksVerifyConfig", "SvixVerifyConfig"]
    assert defs["HmacConfig"]["properties"]["type"] == {"const": "hmac"}
    assert "type" in defs["HmacConfig"]["required"]
    signing = defs["EndpointConfig"]["properties"]["signing"]["anyOf"]
    assert {"type": "null"} in signing
    assert defs["StandardWebhooksConfig"]["properties"]["scheme"] == {"const": "standard-webhooks"}
    assert defs["Config"]["properties"]["sources"]["propertyNames"]["not"] == {"const": "internal"}
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_the_json_schema_validates_what_the_loader_accepts(registry: ComponentRegistry) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema(registry))
    good = yaml.safe_load(
        cfg(
            """
            server: {listen: "127.0.0.1:8080", max_body: 64KiB}
            sources:
              acme: {verify: {type: hmac, header: X, secret: s}}
            endpoints:
              a: {url: "http://a.test", timeout: 1m30s, retry: {schedule: [5s]}}
            routes:
              - {to: [a], from: [acme]}
            """
        )
    )
    assert list(validator.iter_errors(good)) == []
    bad_configs: list[dict[str, Any]] = [
        {"server": {"lisen": "x"}},
        {"endpoints": {"a": {"timeout": "5 minutes"}}},
        {"sources": {"internal": {}}},
        {"sources": {"a.b": {}}},
        {"sources": {"a": {"verify": {"type": "hmac", "header": "X", "secret": "s", "algorithm": "md5"}}}},
        {"routes": [{"to": []}]},
    ]
    for bad in bad_configs:
        assert list(validator.iter_errors(bad)), bad


def test_a_typo_of_a_required_key_is_reported_once(registry: ComponentRegistry) -> None:
    assert problems(registry, "sources:\n  s:\n    verify: {type: probe, tokne: t}\n") == [
        'hookgate.yaml:3: $.sources.s.verify.tokne: unknown key; did you mean "token"?'
    ]
    assert problems(registry, "routes:\n  - {too: [a]}\n") == [
        'hookgate.yaml:2: $.routes[0].too: unknown key; did you mean "to"?'
    ]


def test_load_server_reads_only_the_server_section(tmp_path: Path) -> None:
    path = tmp_path / "hookgate.yaml"
    path.write_text(
        "server:\n  listen: 0.0.0.0:9000\n  api_tokens: ['${TOKEN}']\n"
        "sources:\n  acme: {verify: {type: hmac, header: X, secret: '${UNSET_SECRET}'}}\n"
        "endpoints:\n  a: {timeout: soon}\n"
    )
    server = load_server(path, env={"TOKEN": "t"})
    assert (server.listen, server.api_tokens) == ("0.0.0.0:9000", ["t"])
    with pytest.raises(ConfigError) as raised:
        load_server(path, env={})
    assert [str(p) for p in raised.value.problems] == [
        f"{path}:3: $.server.api_tokens[0]: environment variable TOKEN is not set"
    ]
    path.write_text("server:\n  listen: nowhere\n")
    with pytest.raises(ConfigError, match=r":2: \$\.server\.listen: expected host:port"):
        load_server(path, env={})
