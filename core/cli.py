"""The `hookgate` command: run, check, plugins, schema."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

import httpx
import trio

from hookgate import __version__, config, gateway, hookspecs, logs
from hookgate.hooks import Hooks
from hookgate.types import ComponentKind
from hookgate.units import format_duration, seconds

DEFAULT_CONFIG = "hookgate.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hookgate", description="A webhook gateway on NATS JetStream.")
    parser.add_argument("--version", action="version", version=f"hookgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            default=os.environ.get("HOOKGATE_CONFIG", DEFAULT_CONFIG),
            help=f"config file (default: $HOOKGATE_CONFIG or {DEFAULT_CONFIG})",
        )

    run = commands.add_parser("run", help="run the gateway: ingress, API, router and dispatcher")
    with_config(run)
    run.add_argument("--log-level", default=os.environ.get("HOOKGATE_LOG_LEVEL"), help="default: log.level")
    check = commands.add_parser("check", help="validate a config file and summarise it")
    with_config(check)
    commands.add_parser("plugins", help="list loaded plugins, their hooks and components")
    endpoint = commands.add_parser("endpoint", help="enable or disable an endpoint (through the API)")
    with_config(endpoint)
    endpoint.add_argument("action", choices=["enable", "disable"])
    endpoint.add_argument("name")
    endpoint.add_argument(
        "--url", default=os.environ.get("HOOKGATE_URL"), help="API base URL (default: from the config)"
    )
    endpoint.add_argument(
        "--token", default=os.environ.get("HOOKGATE_API_TOKEN"), help="API token (default: from the config)"
    )
    key = commands.add_parser(
        "endpoint-key", help="print the public key(s) receivers verify an endpoint's signatures with"
    )
    with_config(key)
    key.add_argument("endpoint")
    schema = commands.add_parser("schema", help="print the JSON Schema of the config")
    schema.add_argument("-o", "--output", help="write to this file instead of stdout")
    schema.add_argument(
        "--builtin-only",
        action="store_true",
        help="only the plugins shipped with hookgate, not others installed (config/hookgate.schema.json)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args.config, args.log_level)
    if args.command == "check":
        return _check(args.config)
    if args.command == "endpoint":
        return _endpoint_state(args.config, args.action, args.name, args.url, args.token)
    if args.command == "endpoint-key":
        return _endpoint_key(args.config, args.endpoint)
    if args.command == "plugins":
        return _plugins()
    if args.command == "schema":
        hooks = _builtin_hooks() if args.builtin_only else Hooks()
        text = json.dumps(config.json_schema(hooks.registry), indent=2) + "\n"
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
        broker = c.broker.url if isinstance(c.broker.url, str) else ", ".join(c.broker.url)
    print(f"{path}: OK")
    print(f"  listen:    {c.server.listen}{' (TLS)' if c.server.tls else ''}")
    print(f"  broker:    {broker}, retention {c.broker.retention}")
    print(f"  sources:   {len(c.sources)}")
    for name in c.sources:
        verify = loaded.verifiers.get(name)
        print(f"    {name:<20} POST /webhooks/{name}  verify: {verify.type if verify else 'none'}")
    print(f"  endpoints: {len(c.endpoints)}")
    for name, endpoint in c.endpoints.items():
        target = endpoint.url or f"subject {endpoint.subject}"
        attempts = len(endpoint.retry.delays()) + 1
        signer = loaded.signers.get(name)
        print(
            f"    {name:<20} {target}  timeout {format_duration(seconds(endpoint.timeout))}, "
            f"{attempts} attempts, signing: {signer.type if signer else 'none'}"
        )
    print(f"  routes:    {len(c.routes)}")
    for i, route in enumerate(c.routes):
        origin = ", ".join(route.from_) if route.from_ else "any source"
        types = ", ".join(route.types) if route.types else "all types"
        print(f"    {route.name or f'route-{i}':<20} {origin} [{types}] -> {', '.join(route.to)}")
    return 0


def _endpoint_state(path: str, action: str, name: str, url: str | None, token: str | None) -> int:
    if url is None or token is None:
        loaded = _load(path, Hooks())
        if loaded is None:
            return 1
        server = loaded.config.server
        scheme = "https" if server.tls else "http"
        url = url or f"{scheme}://{server.listen.replace('0.0.0.0', '127.0.0.1')}"
        token = token or (server.api_tokens[0] if server.api_tokens else "")
    try:
        response = httpx.post(
            f"{url.rstrip('/')}/api/v1/endpoints/{name}/{action}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        print(f"hookgate: cannot reach the API at {url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        print(f"hookgate: {action} {name}: {response.status_code} {message}", file=sys.stderr)
        return 1
    print(f"endpoint {name} {action}d")
    return 0


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
    ctype = hooks.registry.get(ComponentKind.SIGNER, component.type) if component else None
    if component is None or ctype is None:
        print(f"{path}: endpoint {endpoint!r} has no signing", file=sys.stderr)
        return 1
    signer = ctype.factory(component.config)
    keys = list(getattr(signer, "public_keys", list)())
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


def _run(path: str, log_level: str | None) -> int:
    logs.configure(log_level or "info")
    hooks = Hooks()
    loaded = _load(path, hooks)
    if loaded is None:
        return 1
    # The command line (or HOOKGATE_LOG_LEVEL) overrides the config's level.
    logs.configure(log_level or loaded.config.log.level, loaded.config.log.format)
    try:
        trio.run(_run_until_signalled, loaded, hooks)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # Nurseries wrap errors in groups; a broker that cannot start is a plain message, not a trace.
        unavailable, rest = group.split(gateway.BrokerUnavailable)
        if rest is not None or unavailable is None:
            raise
        for exc in _leaves(unavailable):
            print(f"hookgate: {exc}", file=sys.stderr)
        return 1
    except gateway.BrokerUnavailable as exc:
        print(f"hookgate: {exc}", file=sys.stderr)
        return 1
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _run_until_signalled(loaded: config.LoadedConfig, hooks: Hooks) -> None:
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
            await gateway.run(loaded, hooks, stopping=stopping)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(main())
