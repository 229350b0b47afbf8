"""The `hookgate` command: run, check, plugins, schema, and the API commands (see `commands`)."""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import msgspec
import trio

from hookgate import __version__, config, gateway, hookspecs, supervisor
from hookgate.cli import client, commands, docgen
from hookgate.observe import logs
from hookgate.observe.redact import redact_text, without_password
from hookgate.plugin_host.builders import build_signer, public_keys
from hookgate.plugin_host.hooks import Hooks
from hookgate.plugin_kit.units import format_duration, plural, seconds
from hookgate.transport.ssrf import EgressGuard, SsrfRefused
from hookgate.types import ComponentKind

Handler = Callable[[client.ApiClient, argparse.Namespace], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hookgate", description="A webhook gateway on NATS JetStream.")
    parser.add_argument("--version", action="version", version=f"hookgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            default=os.environ.get(client.CONFIG_ENV, client.DEFAULT_CONFIG),
            help=f"config file (default: ${client.CONFIG_ENV} or {client.DEFAULT_CONFIG})",
        )

    run = sub.add_parser("run", help="run the gateway: ingress, API, router and dispatcher")
    with_config(run)
    run.add_argument("--log-level", default=os.environ.get("HOOKGATE_LOG_LEVEL"), help="default: log.level")
    run.add_argument(
        "--workers",
        metavar="N",
        help="gateway processes under one supervisor: a number, or per role like ingress=1,delivery=1"
        " (default: server.workers, else the number of cores available; 1: no supervisor)",
    )
    run.add_argument(
        "--role",
        choices=config.ROLES,
        help="what each process runs: all, ingress (webhooks and the API) or delivery (the router and"
        " the dispatchers) (default: server.role, else all)",
    )
    check = sub.add_parser("check", help="validate a config file and summarise it")
    with_config(check)
    sub.add_parser("plugins", help="list loaded plugins, their hooks and components")
    _api_commands(sub)
    key = sub.add_parser(
        "endpoint-key", help="print the public key(s) receivers verify an endpoint's signatures with"
    )
    with_config(key)
    key.add_argument("endpoint")
    schema = sub.add_parser("schema", help="print the JSON Schema of the config")
    schema.add_argument("-o", "--output", help="write to this file instead of stdout")
    schema.add_argument(
        "--builtin-only",
        action="store_true",
        help="only the plugins shipped with hookgate, not others installed (config/hookgate.schema.json)",
    )
    schema.add_argument(
        "--markdown",
        action="store_true",
        help="the configuration reference in Markdown instead (docs/reference/configuration.md)",
    )
    return parser


def _connection() -> argparse.ArgumentParser:
    """The options every API command takes to find the API."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--url", help=f"the gateway's base URL (default: ${client.URL_ENV}, else the config's server.listen)"
    )
    group.add_argument(
        "--token",
        help=f"an API token (default: ${client.TOKEN_ENV}, else the config's first server.api_tokens)",
    )
    group.add_argument(
        "-c",
        "--config",
        help=(
            "the gateway's config, for URL and token "
            f"(default: ${client.CONFIG_ENV} or {client.DEFAULT_CONFIG})"
        ),
    )
    group.add_argument(
        "--cacert",
        metavar="FILE",
        help="CA certificates (PEM) to verify an https gateway with (default: $SSL_CERT_FILE, else certifi)",
    )
    return parent


def _api_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = [_connection()]

    def command(
        name: str, handler: Handler, help: str, *, json_output: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=conn)
        p.set_defaults(handler=handler)
        if json_output:
            p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
        return p

    def paging(p: argparse.ArgumentParser) -> None:
        p.add_argument("--since", help='RFC 3339, unix seconds, or a duration ago like "1h"')
        p.add_argument("--until", help="as --since")
        p.add_argument("--limit", type=int, help="rows per page (API default 50, at most 500)")
        p.add_argument("--cursor", help="continue from a previous page's cursor")
        p.add_argument("--all", action="store_true", help="follow the pages to the end")

    events = command("events", commands.events, "list events (oldest first)")
    events.add_argument("--source", help='only this source ("internal" for your services\' events)')
    paging(events)
    event = command("event", commands.event, "show one event with its headers and body")
    event.add_argument("id")

    deliveries = command("deliveries", commands.deliveries, "list deliveries with their status and attempts")
    deliveries.add_argument("--endpoint")
    deliveries.add_argument("--status", help="one or more, comma-separated: e.g. failed,dead")
    deliveries.add_argument("--event", help="only the deliveries of this event id")
    paging(deliveries)
    delivery = command("delivery", commands.delivery, "show one delivery and every attempt")
    delivery.add_argument("id")

    retry = command(
        "retry", commands.retry, "send one delivery again now (a new attempt, fresh retry schedule)"
    )
    retry.add_argument("id")
    retry.add_argument(
        "--now",
        action="store_true",
        help="for a delivery waiting to be retried: send its next attempt now instead of when it is due",
    )
    recover = command(
        "recover", commands.recover, "re-enqueue an endpoint's failed and dead deliveries in a time range"
    )
    recover.add_argument("endpoint")
    recover.add_argument("--since", required=True, help='RFC 3339, unix seconds, or a duration ago like "1h"')
    recover.add_argument("--until", help="as --since (default: now)")
    recover.add_argument(
        "--status", help="the statuses to re-enqueue, comma-separated (default: failed,dead)"
    )
    recover.add_argument("--no-wait", action="store_true", help="print the job and return at once")
    redrive = command("redrive", commands.redrive, "re-enqueue every dead letter of an endpoint")
    redrive.add_argument("endpoint")
    redrive.add_argument("--no-wait", action="store_true", help="print the job and return at once")
    job = command("job", commands.job, "show a recover or redrive job")
    job.add_argument("id")
    job.add_argument("--wait", action="store_true", help="wait until it ends, showing its progress")

    send = command("send", commands.send, "publish an internal event (POST /api/v1/events)")
    send.add_argument("type", help="the event type, e.g. order.created")
    send.add_argument("--data", required=True, help="JSON, @file.json, or - for stdin")
    send.add_argument("--id", help="the event id (an idempotency key); default: a new one")
    send.add_argument("--to", help="only these endpoints, comma-separated, instead of the routes")

    command("endpoints", commands.endpoints, "list endpoints and whether each is enabled")
    endpoint = command(
        "endpoint", commands.endpoint_state, "enable or disable an endpoint", json_output=False
    )
    endpoint.add_argument("action", choices=["enable", "disable"])
    endpoint.add_argument("name")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args.config, args.log_level, args.workers, args.role)
    if args.command == "check":
        return _check(args.config)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is not None:
        return _call_api(handler, args)
    if args.command == "endpoint-key":
        return _endpoint_key(args.config, args.endpoint)
    if args.command == "plugins":
        return _plugins()
    if args.command == "schema":
        hooks = _builtin_hooks() if args.builtin_only else Hooks()
        schema = config.json_schema(hooks.registry)
        text = docgen.markdown(schema) if args.markdown else json.dumps(schema, indent=2) + "\n"
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        return 0
    return 2


def _builtin_hooks() -> Hooks:
    """The plugins of the hookgate distribution itself, whatever else is installed."""
    plugins = [
        ep.load()
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)
        if ep.dist is not None and ep.dist.name == "hookgate"
    ]
    return Hooks(plugins, load_entry_points=False)


def _load(path: str, hooks: Hooks) -> config.LoadedConfig | None:
    try:
        return config.load(path, hooks.registry)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _check(path: str) -> int:
    hooks = Hooks()
    loaded = _load(path, hooks)
    if loaded is None:
        return 1
    c = loaded.config
    if c.broker.url is None:
        # Relative to the config file, as the gateway resolves it.
        broker = f"embedded nats-server, data in {loaded.path.parent / c.broker.data_dir}"
    else:
        urls = [c.broker.url] if isinstance(c.broker.url, str) else c.broker.url
        broker = ", ".join(without_password(url) for url in urls)
    print(f"{path}: OK")
    print(f"  listen:    {c.server.listen}{' (TLS)' if c.server.tls else ''}")
    print(f"  workers:   {_describe_workers(c.server)}")
    print(f"  broker:    {broker}, retention {c.broker.retention}")
    print(f"  sources:   {len(c.sources)}")
    for name in c.sources:
        verify = loaded.verifiers.get(name)
        print(f"    {name:<20} POST /webhooks/{name}  verify: {verify.type if verify else 'none'}")
    print(f"  endpoints: {len(c.endpoints)}")
    for name, endpoint in c.endpoints.items():
        target = without_password(endpoint.url) if endpoint.url else f"subject {endpoint.subject}"
        attempts = len(endpoint.retry.delays()) + 1
        signer = loaded.signers.get(name)
        print(
            f"    {name:<20} {target}  timeout {format_duration(seconds(endpoint.timeout))}, "
            f"{plural(attempts, 'attempt')}, signing: {signer.type if signer else 'none'}"
        )
    print(f"  routes:    {len(c.routes)}")
    for i, route in enumerate(c.routes):
        origin = ", ".join(route.from_) if route.from_ else "any source"
        types = ", ".join(route.types) if route.types else "all types"
        print(f"    {route.name or f'route-{i}':<20} {origin} [{types}] -> {', '.join(route.to)}")
    for warning in _egress_warnings(loaded):
        print(warning)
    return 0


def _describe_workers(server: config.ServerConfig) -> str:
    roles = supervisor.worker_roles(server)
    counts = ", ".join(f"{roles.count(role)} {role}" for role in config.ROLES if role in roles)
    origin = " (the cores available)" if server.workers is None else ""
    return f"{len(roles)}{origin}: {counts}"


def _egress_warnings(loaded: config.LoadedConfig) -> list[str]:
    """One line per endpoint that the SSRF guard would refuse every delivery to, under this
    config's own egress settings: such a config loads, but delivers nothing."""
    egress = loaded.config.egress
    guard = EgressGuard(egress.allow_networks, https_only=egress.https_only)
    warnings = []
    for name, endpoint in loaded.config.endpoints.items():
        if endpoint.url is None:
            continue
        try:
            guard.vet_url(endpoint.url)
        except SsrfRefused as exc:
            path = f"$.endpoints.{name}.url"
            where = f"{loaded.path}:{loaded.line_of(path)}: {path}"
            # The guard's message may quote the URL: hide its password, as the summary above does.
            reason = redact_text(str(exc), url=endpoint.url)
            warnings.append(f"{where}: warning: every delivery will be refused: {reason}")
        except (OSError, ValueError):
            continue  # a name this host cannot resolve is vetted where the gateway runs
    return warnings


def _call_api(handler: Handler, args: argparse.Namespace) -> int:
    try:
        target = client.resolve(args.url, args.token, args.config)
        with client.ApiClient(target, cacert=args.cacert) as api:
            return handler(api, args)
    except client.ApiError as exc:
        print(f"hookgate: {exc}", file=sys.stderr)
        return 1


def _endpoint_key(path: str, endpoint: str) -> int:
    hooks = Hooks()
    loaded = _load(path, hooks)
    if loaded is None:
        return 1
    if endpoint not in loaded.config.endpoints:
        known = ", ".join(sorted(loaded.config.endpoints)) or "none"
        print(f"{path}: no endpoint named {endpoint!r} (endpoints: {known})", file=sys.stderr)
        return 1
    component = loaded.signers.get(endpoint)
    signer = build_signer(hooks.registry, component)
    if component is None or signer is None:
        print(f"{path}: endpoint {endpoint!r} has no signing", file=sys.stderr)
        return 1
    keys = public_keys(signer)
    if not keys:
        print(
            f"{path}: endpoint {endpoint!r} signs with scheme {component.type!r}, which has no public key "
            "(a shared secret: give the receiver the secret itself)",
            file=sys.stderr,
        )
        return 1
    for public_key in keys:
        print(public_key)  # one per line; two while an ed25519 key is being rotated
    return 0


def _plugins() -> int:
    hooks = Hooks()
    for info in hooks.plugins():
        origin = f" ({info.distribution})" if info.distribution else ""
        print(f"{info.name}{origin}")
        print(f"  hooks: {', '.join(info.hooks) or 'none'}")
        components = [
            f"{ctype.kind} {ctype.name}"
            for ctype in hooks.registry.types.values()
            if ctype.plugin == info.name
        ]
        if components:
            print(f"  components: {', '.join(sorted(components))}")
    print()
    for kind in ComponentKind:
        print(f"{kind}s: {', '.join(hooks.registry.names(kind)) or 'none'}")
    return 0


def _run(path: str, log_level: str | None, workers: str | None, role: str | None) -> int:
    logs.configure(log_level or "info")
    hooks = Hooks()
    loaded = _load(path, hooks)
    if loaded is None:
        return 1
    # The command line (or HOOKGATE_LOG_LEVEL) overrides the config's level.
    logs.configure(log_level or loaded.config.log.level, loaded.config.log.format)
    try:
        server = _server_overrides(loaded.config.server, workers, role)
    except ValueError as exc:
        print(f"hookgate: {exc}", file=sys.stderr)
        return 2
    seated = supervisor.seat_from_env()
    roles = supervisor.worker_roles(server)
    if seated is None and len(roles) > 1:
        loaded.config.server = server
        return _guarded(lambda: trio.run(supervisor.supervise, loaded, roles, log_level))
    # One process, as it always was: no supervisor in between.
    loaded.config.server = msgspec.structs.replace(server, role=roles[0])
    return _guarded(lambda: trio.run(_run_until_signalled, loaded, hooks, seated))


def _server_overrides(
    server: config.ServerConfig, workers: str | None, role: str | None
) -> config.ServerConfig:
    """server.workers and server.role as --workers and --role override them."""
    if workers is not None:
        server = msgspec.structs.replace(server, workers=_parse_workers(workers), role="all")
    if role is not None:
        if isinstance(server.workers, config.WorkerCounts):
            raise ValueError(
                "--role: the workers are given per role (server.workers); use --workers N with it"
            )
        server = msgspec.structs.replace(server, role=role)
    return server


def _parse_workers(text: str) -> int | config.WorkerCounts:
    """--workers 4, or --workers ingress=1,delivery=1."""
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= config.MAX_WORKERS:
            raise ValueError(f"--workers: expected 1 to {config.MAX_WORKERS}, got {text}")
        return count
    counts: dict[str, int] = {}
    for part in text.split(","):
        name, _, number = part.partition("=")
        if name.strip() not in config.ROLES or not number.strip().isdigit():
            roles = ", ".join(config.ROLES)
            raise ValueError(f"--workers: expected N or role=N,... (roles: {roles}), got {text!r}")
        counts[name.strip()] = int(number)
    parsed = msgspec.convert(counts, config.WorkerCounts)
    if not parsed.roles() or len(parsed.roles()) > config.MAX_WORKERS:
        raise ValueError(f"--workers: expected 1 to {config.MAX_WORKERS} workers in all, got {text!r}")
    return parsed


def _guarded(run: Callable[[], int | None]) -> int:
    """Run the gateway or the supervisor; a failure to start is one line, not a traceback."""
    try:
        code = run()
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # Nurseries wrap errors in groups; a broker that cannot start is a plain message, not a trace.
        unavailable, rest = group.split(_STARTUP_ERRORS)
        if rest is not None or unavailable is None:
            raise
        for exc in _leaves(unavailable):
            print(f"hookgate: {exc}", file=sys.stderr)
        return 1
    except _STARTUP_ERRORS as exc:
        print(f"hookgate: {exc}", file=sys.stderr)
        return 1
    return code or 0


# Failures to start that are told in one line: a broker that cannot be reached or refuses us, a
# certificate that cannot be used.
_STARTUP_ERRORS = (gateway.BrokerUnavailable, gateway.StartupError)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _run_until_signalled(
    loaded: config.LoadedConfig, hooks: Hooks, seated: tuple[gateway.Seat, int] | None
) -> None:
    seat, ready_fd = seated if seated is not None else (None, None)
    stopping = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    if stopping.is_set():
                        logging.getLogger("hookgate").warning("second signal: stopping now")
                        nursery.cancel_scope.cancel()
                        return
                    logging.getLogger("hookgate").info("received %s", signal.Signals(signum).name)
                    stopping.set()

            nursery.start_soon(watch)
            async with trio.open_nursery() as running:
                run = functools.partial(gateway.run, loaded, hooks, stopping=stopping, seat=seat)
                await running.start(run)
                if ready_fd is not None:
                    supervisor.tell_ready(ready_fd)
            nursery.cancel_scope.cancel()
