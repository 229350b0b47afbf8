"""Rules that span fields: references between sections, url xor subject, limits that must agree, ..."""

from __future__ import annotations

import re

import httpx

from hookgate.config.filters import FilterError, compile_filter
from hookgate.config.paths import child
from hookgate.config.problems import Report, show
from hookgate.config.schema import (
    BrokerConfig,
    Config,
    EgressConfig,
    EndpointConfig,
    ServerConfig,
    WorkerCounts,
)
from hookgate.config.sealing import parse_key
from hookgate.config.subjects import is_subject_pattern, subject_refusal
from hookgate.observe import tracing
from hookgate.plugin_kit.units import format_duration, seconds, size_bytes
from hookgate.transport.fields import sendable_value
from hookgate.transport.proxy import parse_proxy
from hookgate.transport.ssrf import EgressGuard
from hookgate.transport.url import parse_url
from hookgate.types import INTERNAL_SOURCE

_LISTEN = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})")
_HTTP_URL = re.compile(r"https?://[^/\s?#]+\S*")
_SUBJECT = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_BROKER_AUTH = ("token", "user", "password", "creds", "nkey_seed")
# An nkey seed: "S", its role, and base32 (58 characters in all).
_NKEY_SEED = re.compile(r"S[UAONCX][A-Z2-7]{56}")
# Headers every delivery carries already; a second copy would contradict them.
_OWN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "user-agent",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)


# Each ordered endpoint has a JetStream consumer of its own, and nats-server allows a stream 1,000
# by default; the rest share sixteen shard consumers. The margin leaves room for the shards, the
# short-lived consumers that move parked deliveries back, and an operator's own.
MAX_ORDERED_ENDPOINTS = 900


def too_many_ordered(count: int, limit: int) -> str:
    return (
        f"{count} endpoints have ordered: true, and at most {limit} may: each has a "
        "JetStream consumer of its own, and a stream allows 1,000"
    )


def check_rules(
    problem: Report,
    config: Config,
    valid: set[str],
    sources: set[str],
    endpoints: set[str],
    route_indexes: list[int],
) -> None:
    """Check the rules that span fields; `valid` names the sections that converted, and `sources`
    and `endpoints` every name declared, converted or not, so a reference to a bad one is not
    reported as unknown."""
    if "server" in valid:
        check_server(problem, config.server)
    if "broker" in valid:
        check_broker(problem, config.broker)
    # When the broker section failed, its defaults stand in: rules that read it would mislead.
    broker = config.broker if "broker" in valid else None
    _check_selectors(problem, config)
    egress = config.egress if "egress" in valid else None
    for name, endpoint in config.endpoints.items():
        check_endpoint(problem, child("$.endpoints", name), endpoint, broker, egress)
    ordered = [name for name, endpoint in config.endpoints.items() if endpoint.ordered]
    if len(ordered) > MAX_ORDERED_ENDPOINTS:
        problem("$.endpoints", too_many_ordered(len(ordered), MAX_ORDERED_ENDPOINTS))
    _check_proxies(problem, config, egress)
    if "ops" in valid and config.ops.endpoint is not None and config.ops.endpoint not in endpoints:
        problem("$.ops.endpoint", f"no endpoint named {show(config.ops.endpoint)}")
    if "tracing" in valid and config.tracing.enabled and not tracing.available():
        problem("$.tracing.enabled", tracing.INSTALL_HINT)
    if "egress" in valid:
        _check_egress(problem, config.egress)
    _check_routes(problem, config, sources, endpoints, route_indexes)


def _check_selectors(problem: Report, config: Config) -> None:
    for name, source in config.sources.items():
        path = child("$.sources", name)
        for key in ("event_type", "event_id"):
            selector = getattr(source, key)
            if selector in ("body.", "header."):
                problem(f"{path}.{key}", f"{show(selector)} needs a name after the dot")


def _check_proxies(problem: Report, config: Config, egress: EgressConfig | None) -> None:
    proxies = [("$.egress.proxy", egress.proxy if egress is not None else None)]
    proxies += [(f"$.egress.proxies[{i}]", proxy) for i, proxy in enumerate(egress.proxies if egress else [])]
    proxies += [(f"{child('$.endpoints', n)}.proxy", e.proxy) for n, e in config.endpoints.items()]
    for proxy_path, proxy in proxies:
        if proxy:
            try:
                parse_proxy(proxy)
            except ValueError as exc:
                problem(proxy_path, str(exc))


def _check_egress(problem: Report, egress: EgressConfig) -> None:
    for i, cidr in enumerate(egress.allow_networks):
        try:
            EgressGuard([cidr])
        except ValueError as exc:
            problem(f"$.egress.allow_networks[{i}]", str(exc).removeprefix("egress.allow_networks: "))
    for i, pattern in enumerate(egress.allow_subjects):
        if not is_subject_pattern(pattern):
            problem(
                f"$.egress.allow_subjects[{i}]",
                'expected a NATS subject pattern like "$JS.EVENT.ADVISORY.>" (tokens separated by dots; '
                f'"*" for one token, ">" for the rest), got {show(pattern)}',
            )


def _check_routes(
    problem: Report, config: Config, sources: set[str], endpoints: set[str], route_indexes: list[int]
) -> None:
    route_names: dict[str, int] = {}
    for i, route in zip(route_indexes, config.routes, strict=True):
        if route.filter is not None:
            try:
                compile_filter(route.filter, f"$.routes[{i}].filter")
            except FilterError as exc:
                for error in exc.errors:
                    problem(error.path, error.message)
        if route.name is not None:
            if route.name in route_names:
                problem(
                    f"$.routes[{i}].name", f"duplicate route name (also $.routes[{route_names[route.name]}])"
                )
            route_names.setdefault(route.name, i)
        for j, target in enumerate(route.to):
            if target not in endpoints:
                known = ", ".join(sorted(endpoints)) or "none"
                problem(f"$.routes[{i}].to[{j}]", f"no endpoint named {show(target)} (endpoints: {known})")
        for j, origin in enumerate(route.from_ or []):
            if origin != INTERNAL_SOURCE and origin not in sources:
                problem(
                    f"$.routes[{i}].from[{j}]",
                    f"no source named {show(origin)} "
                    f"(use {show(INTERNAL_SOURCE)} for events from your services)",
                )


def check_server(problem: Report, server: ServerConfig) -> None:
    match = _LISTEN.fullmatch(server.listen)
    if not server.listen.startswith(("unix:", "fd://")) and (match is None or int(match.group(1)) > 65535):
        problem("$.server.listen", f'expected host:port like "127.0.0.1:8080", got {show(server.listen)}')
    if size_bytes(server.max_body) == 0:
        problem("$.server.max_body", "must be more than 0")
    if seconds(server.publish_timeout) == 0:
        problem("$.server.publish_timeout", "must be more than 0")
    if isinstance(server.workers, WorkerCounts):
        if not server.workers.roles():
            problem("$.server.workers", "give at least one worker, e.g. {ingress: 1, delivery: 1}")
        if server.role != "all":
            problem(
                "$.server.role",
                "with workers given per role, each worker's role is its count's key: remove server.role",
            )


def check_broker(problem: Report, broker: BrokerConfig) -> None:
    urls = [broker.url] if isinstance(broker.url, str) else broker.url
    if urls is not None:
        _check_external_broker(problem, broker, urls)
    else:
        _check_embedded_broker(problem, broker)
    if urls is not None and broker.sync is not None:
        problem(
            "$.broker.sync",
            "only used with the embedded broker: an external server syncs as its own "
            "jetstream.sync_interval says",
        )
    _check_secrets_keys(problem, broker)
    if broker.password is not None and broker.user is None:
        problem("$.broker.password", "set user with password")
    if broker.nkey_seed is not None and _NKEY_SEED.fullmatch(broker.nkey_seed.strip()):
        # Never echoed: it is a secret.
        problem(
            "$.broker.nkey_seed",
            "this is a seed itself, not a file: put the seed in a file readable only by hookgate "
            "and give its path",
        )
    if broker.tls is not None and broker.tls.key_file is not None and broker.tls.cert_file is None:
        problem("$.broker.tls.key_file", "set cert_file with key_file")
    retention = seconds(broker.retention)
    if retention == 0:
        problem("$.broker.retention", "must be more than 0")
    elif seconds(broker.dedup_window) > retention:
        # JetStream refuses a duplicate window longer than the stream's max age.
        problem("$.broker.dedup_window", f"must not be longer than broker.retention ({broker.retention})")


def _check_external_broker(problem: Report, broker: BrokerConfig, urls: list[str]) -> None:
    if not urls or not all(urls):
        problem("$.broker.url", "expected a NATS URL or a list of them (omit url for the embedded server)")
    for i, url in enumerate(urls):
        scheme = url.split("://", 1)[0] if "://" in url else None
        if scheme is not None and scheme not in _NATS_SCHEMES:
            where = "$.broker.url" if isinstance(broker.url, str) else f"$.broker.url[{i}]"
            problem(where, f"expected a nats://, tls://, ws:// or wss:// URL, got {show(url)}")
    # A NATS connection authenticates one way; a second one set would be silently ignored.
    ways = [key for key in ("token", "user", "creds", "nkey_seed") if getattr(broker, key) is not None]
    for key in ways[1:]:
        problem(f"$.broker.{key}", f"set one way to authenticate: {ways[0]} is set already")


def _check_embedded_broker(problem: Report, broker: BrokerConfig) -> None:
    # These settings only reach an external server; the embedded one would silently ignore them.
    for key in (*_BROKER_AUTH, "tls"):
        if getattr(broker, key) is not None:
            problem(f"$.broker.{key}", "only used with an external broker: set broker.url")
    if broker.replicas != 1:
        problem("$.broker.replicas", "the embedded broker is a single server: replicas must be 1")
    if broker.sync is not None and broker.sync != "always":
        try:
            interval = seconds(broker.sync)
        except ValueError:
            got = show(broker.sync)
            problem("$.broker.sync", f'expected "always" or a duration like "1s", got {got}')
        else:
            if interval == 0:
                problem("$.broker.sync", 'must be "always" or more than 0')


def _check_secrets_keys(problem: Report, broker: BrokerConfig) -> None:
    keys = [broker.secrets_keys] if isinstance(broker.secrets_keys, str) else broker.secrets_keys
    for i, key in enumerate(keys):
        if key.strip():
            try:
                parse_key(key)
            except ValueError as exc:
                # Never echoed: it is a secret, or meant to be one.
                where = "$.broker.secrets_keys"
                if not isinstance(broker.secrets_keys, str):
                    where += f"[{i}]"
                problem(where, str(exc))


def check_endpoint(
    problem: Report,
    path: str,
    endpoint: EndpointConfig,
    broker: BrokerConfig | None,
    egress: EgressConfig | None = None,
) -> None:
    if (endpoint.url is None) == (endpoint.subject is None):
        problem(path, "set exactly one of url or subject", missing="url" if endpoint.url is None else None)
    if endpoint.url is not None:
        _check_url(problem, f"{path}.url", endpoint.url)
    if endpoint.subject is not None:
        _check_subject(problem, f"{path}.subject", endpoint.subject, broker, egress)
    if seconds(endpoint.timeout) == 0:
        problem(f"{path}.timeout", "must be more than 0")
    _check_headers(problem, f"{path}.headers", endpoint.headers)
    _check_retries_fit(problem, path, endpoint, broker)


def _check_url(problem: Report, path: str, url: str) -> None:
    if not _HTTP_URL.fullmatch(url):
        problem(path, f"expected an http:// or https:// URL, got {show(url)}")
    else:
        # The transport's own parser: a URL accepted here is one every delivery can be sent to.
        try:
            parse_url(url)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            problem(path, f"not a URL hookgate can send to: {exc}")


def _check_subject(
    problem: Report, path: str, subject: str, broker: BrokerConfig | None, egress: EgressConfig | None
) -> None:
    if not _SUBJECT.fullmatch(subject):
        problem(
            path,
            f'expected a NATS subject like "billing.events" (no spaces or wildcards), got {show(subject)}',
        )
    else:
        why = subject_refusal(
            subject,
            broker.prefix if broker is not None else None,
            egress.allow_subjects if egress is not None else [],
        )
        if why is not None:
            problem(path, why)


def _check_headers(problem: Report, path: str, headers: dict[str, str]) -> None:
    for header, value in headers.items():
        if not _HEADER_NAME.fullmatch(header):
            problem(child(path, header), "not a valid header name")
        elif header.lower() in _OWN_HEADERS or header.lower().startswith("hookgate-"):
            problem(child(path, header), "hookgate sets this header itself")
        elif not sendable_value(value):
            # Not echoed: a header value may be a credential.
            problem(
                child(path, header),
                "the value holds a control character or is not ISO-8859-1; it could not be sent",
            )


def _check_retries_fit(
    problem: Report, path: str, endpoint: EndpointConfig, broker: BrokerConfig | None
) -> None:
    # A retry is a scheduled message in a stream whose max age is the retention: a longer delay
    # would expire before it fires, and the delivery would silently stop.
    retention = seconds(broker.retention) if broker is not None else 0
    if retention and endpoint.retry.exponential is not None:
        longest_delay = max(endpoint.retry.delays(), default=0) * (1 + endpoint.retry.jitter)
        if longest_delay >= retention:
            problem(
                f"{path}.retry.exponential.max",
                f"retries up to {format_duration(round(longest_delay))} apart (with jitter) must be shorter "
                f"than broker.retention ({broker.retention if broker else ''}), or they expire before due",
            )
    elif retention and endpoint.retry.schedule:
        delays = [seconds(d) * (1 + endpoint.retry.jitter) for d in endpoint.retry.schedule]
        longest = max(range(len(delays)), key=delays.__getitem__)
        if delays[longest] >= retention:
            problem(
                f"{path}.retry.schedule[{longest}]",
                f"{endpoint.retry.schedule[longest]} (up to {format_duration(round(delays[longest]))} with "
                f"jitter) must be shorter than broker.retention ({broker.retention if broker else ''}), "
                "or the retry expires before it is due",
            )
