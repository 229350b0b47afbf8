"""The gateway process: broker (embedded or external), HTTP server, router and dispatcher, in one nursery.

`server.role` picks what runs: ingress (webhooks, the API and its replays), delivery (the router
and the dispatcher), or all of it. Catalog, endpoint states, /healthz, /readyz and /metrics run in
every role. A worker started by the supervisor gets a `Seat`: the listening socket it shares with
the other workers (or none) and the broker the supervisor started.

Shutdown order: stop accepting HTTP, stop fetching, let in-flight deliveries finish within the grace
period (the rest are nak'ed for prompt redelivery), close the NATS connection, stop the embedded
server.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig

from hookgate import __version__
from hookgate.api.app import Api
from hookgate.api.catalog import Catalog
from hookgate.api.endpoints import EndpointApi
from hookgate.api.log import LogApi
from hookgate.app import App
from hookgate.broker import Broker, BrokerRefused, BrokerUnavailable
from hookgate.broker.embedded import embedded_nats, generated_secrets_key
from hookgate.config import DEFAULT_SYNC, LoadedConfig, Role, ServerConfig
from hookgate.config.sealing import Sealer, parse_key
from hookgate.egress.dispatcher import Dispatcher
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.state import EndpointStates
from hookgate.ingress.admission import Admission
from hookgate.ingress.handler import Ingress, Source
from hookgate.ingress.server import KEEP_ALIVE_TIMEOUT, HttpServer, Limits
from hookgate.log.query import DeliveryLog
from hookgate.log.replay import Replayer
from hookgate.observe.metrics import Metrics
from hookgate.observe.tracing import tracing_for
from hookgate.plugin_host.builders import build_access_rule, build_handshake, build_transform, build_verifier
from hookgate.plugin_host.components import ConfiguredComponents
from hookgate.plugin_host.hooks import Hooks
from hookgate.plugin_kit.units import seconds, size_bytes
from hookgate.routing.router import Router
from hookgate.transport.ssrf import EgressGuard

log = logging.getLogger("hookgate")

ROLE_NAMES: dict[Role, str] = {"all": "ingress and delivery", "ingress": "ingress", "delivery": "delivery"}

# Room above server.max_body for the event envelope (headers, ids) in one NATS message.
ENVELOPE_ALLOWANCE = 256 * 1024
MIN_MAX_PAYLOAD = 8 * 1024 * 1024


class StartupError(Exception):
    """A setting the gateway cannot start with; its text is one line for the user."""


@dataclass(frozen=True)
class Running:
    """What a started gateway tells its caller."""

    url: str  # the HTTP base URL it listens on
    broker_url: str | list[str]
    broker: Broker
    # The embedded broker's credentials: a file holding the user nkey seed it accepts (owner-only).
    broker_nkey_seed_file: str | None = None


@dataclass(frozen=True)
class Seat:
    """What the supervisor hands one of its workers."""

    # The listening socket every serving worker shares; None: this worker serves no HTTP.
    http_fd: int | None
    # The embedded nats-server the supervisor started, and the file holding the user nkey seed it
    # accepts; None: the config's broker.url.
    broker_url: str | None = None
    nkey_seed_file: str | None = None


@dataclass(frozen=True)
class BrokerTarget:
    """Where the broker is, and for an embedded one, how to reach it and its generated key."""

    url: str | list[str]
    nkey_seed_file: str | None = None
    generated_key: bytes | None = None  # an embedded broker's key for endpoint secrets


async def run(
    loaded: LoadedConfig,
    hooks: Hooks,
    *,
    stopping: trio.Event | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
    tracer_provider: Any = None,
    seat: Seat | None = None,
) -> None:
    """Run until `stopping` is set (or the task is cancelled), then shut down gracefully.

    `tracer_provider`: an OpenTelemetry TracerProvider for `tracing:` (else the global one, or
    its own). `seat`: given when this process is one of the supervisor's workers.
    """
    config = loaded.config
    check_server_tls(config.server)
    role = config.server.role
    ingress_role, delivery_role = role in ("all", "ingress"), role in ("all", "delivery")
    stopping = stopping if stopping is not None else trio.Event()
    hooks.register(ConfiguredComponents(), name="hookgate.core.components")
    max_body = size_bytes(config.server.max_body)
    publish_timeout = seconds(config.server.publish_timeout)

    async with (
        tracing_for(config.tracing, tracer_provider) as tracing,
        _seated_target(loaded, seat) if seat and seat.broker_url else broker_target(loaded) as target,
        _connect(loaded, target, publish_timeout) as broker,
    ):
        url = target.url
        registry = hooks.registry
        sources = {
            name: Source.build(
                name,
                source,
                verifier=build_verifier(registry, loaded.verifiers.get(name)),
                access_rules=tuple(build_access_rule(registry, r) for r in loaded.access_rules.get(name, [])),
                handshake=build_handshake(registry, loaded.handshakes.get(name)),
            )
            for name, source in config.sources.items()
        }
        guard = EgressGuard(config.egress.allow_networks, https_only=config.egress.https_only)
        # The YAML endpoints, and those created through the API (followed in JetStream KV).
        catalog = Catalog(loaded, hooks, broker, guard, _sealer(loaded, target))
        metrics = Metrics()
        # One view of endpoint states for the API and the dispatcher: a change made here applies
        # here at once, and reaches other replicas as soon as their watch sees it stored.
        states = EndpointStates(broker, config.ops.endpoint)
        transforms = {i: build_transform(registry, c) for i, c in loaded.transforms.items()}
        router = Router(
            broker,
            hooks,
            config.routes,
            set(catalog.config_entries),
            transforms,
            ordered=_ordered(catalog.endpoints()),
        )
        delivery_log = DeliveryLog(broker, states, size_bytes(config.log.body_excerpt))
        replayer = Replayer(
            broker,
            delivery_log,
            router.event_for,
            endpoint_exists=lambda name: name in catalog,
            endpoint_ordered=lambda name: (entry := catalog.get(name)) is not None and entry.config.ordered,
        )
        admission = Admission(config.server.max_in_flight, config.server.max_unrouted, metrics)
        ingress = Ingress(sources, hooks, broker, max_body, metrics, tracing, admission)
        app = App(
            ingress,
            Api(
                broker,
                config.server.api_tokens,
                catalog,
                max_body,
                states,
                LogApi(delivery_log, replayer, lambda name: name in catalog),
                metrics,
                tracing,
                EndpointApi(catalog, states, broker, max_body),
                admission,
            ),
            broker,
            metrics,
            serves_ingress=ingress_role,
        )
        dispatcher = Dispatcher(
            broker,
            hooks,
            catalog.endpoints(),
            seconds(config.server.shutdown_grace),
            metrics,
            states,
            tracing,
        )
        catalog.subscribe(
            lambda c: router.update(set(c.endpoints()), c.implicit_routes(), _ordered(c.endpoints()))
        )
        if delivery_role:
            catalog.subscribe(lambda c: dispatcher.update(c.endpoints()))

        async with trio.open_nursery() as nursery:
            # The stored endpoints are known before anything routes or delivers.
            await nursery.start(catalog.run, stopping)
            # Endpoint states, followed by one watch for the API and the dispatcher alike.
            await nursery.start(states.run, stopping)
            binds: list[str] = []
            if seat is None or seat.http_fd is not None:
                http_fd = seat.http_fd if seat is not None else None
                binds = await nursery.start(_serve_http, app, loaded, metrics, stopping, http_fd)
            if delivery_role:
                # Consumers exist (created or updated) before the gateway reports itself started.
                await nursery.start(router.run, stopping)
                await nursery.start(dispatcher.run, stopping)
            if ingress_role:
                if admission.max_unrouted:
                    nursery.start_soon(
                        _follow_router_backlog, _router_backlog(router, broker, role), admission, stopping
                    )
                nursery.start_soon(ingress.rejections.run, stopping)
                await nursery.start(replayer.run, stopping)
            http_url = binds[0] if binds else ""
            log.info(
                "hookgate %s (%s) %s (broker %s)",
                __version__,
                ROLE_NAMES[role],
                f"listening on {http_url}" if http_url else "serving no HTTP",
                url,
            )
            await hooks.call("hookgate_startup", info={"listen": http_url, "version": __version__})
            # What startup built (the config, every endpoint, the plugins) lives as long as the
            # process: out of the cyclic collector's reach, its full passes do not walk it all
            # (with 10,000 endpoints they added 100-400 ms pauses to p99 delivery latency).
            gc.collect()
            gc.freeze()
            task_status.started(Running(http_url, url, broker, target.nkey_seed_file))
            await stopping.wait()
            log.info("shutting down: finishing in-flight deliveries")
        ingress.rejections.flush()
        await hooks.call("hookgate_shutdown")


async def _serve_http(
    app: App,
    loaded: LoadedConfig,
    metrics: Metrics,
    stopping: trio.Event,
    http_fd: int | None,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    server = loaded.config.server
    hc = HypercornConfig()
    # A worker serves the socket the supervisor bound and every worker shares.
    hc.bind = [server.listen if http_fd is None else f"fd://{http_fd}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hookgate.http")
    hc.graceful_timeout = seconds(server.shutdown_grace)
    hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    if server.tls is not None:
        hc.certfile = server.tls.certfile
        hc.keyfile = server.tls.keyfile
    limits = Limits(
        max_connections=server.max_connections,
        backlog=server.backlog,
        header_timeout=seconds(server.header_timeout),
        body_timeout=seconds(server.body_timeout),
        grace=seconds(server.shutdown_grace),
    )
    await HttpServer(app, hc, limits, metrics).serve(stopping, task_status)


ROUTER_BACKLOG_POLL = 1.0


async def _follow_router_backlog(
    backlog_of_router: Callable[[], Awaitable[int | None]], admission: Admission, stopping: trio.Event
) -> None:
    """Keep admission control's view of the router's backlog current (one consumer info a second)."""
    while not stopping.is_set():
        try:
            backlog = await backlog_of_router()
        except Exception as exc:
            log.debug("could not read the router's backlog: %s", exc)
        else:
            if backlog is not None:
                admission.unrouted = backlog
        with trio.move_on_after(ROUTER_BACKLOG_POLL):
            await stopping.wait()


def _router_backlog(router: Router, broker: Broker, role: Role) -> Callable[[], Awaitable[int | None]]:
    """How this process reads the router's backlog: from the consumer it pulls for, or, where no
    router runs (role ingress), by the consumer's name."""
    if role == "all":
        return router.backlog
    topology = broker.topology
    return lambda: broker.consumer_backlog(topology.events_stream, topology.router_consumer())


def check_server_tls(server: ServerConfig) -> None:
    """Refuse unusable certificate files before anything starts (hypercorn would fail later, with
    a traceback)."""
    if server.tls is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            server.tls.certfile, server.tls.keyfile
        )
    except (OSError, ssl.SSLError) as exc:
        reason = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
        raise StartupError(
            f"server.tls: cannot use the certificate {server.tls.certfile} with the key "
            f"{server.tls.keyfile}: {reason or exc}"
        ) from None


@contextlib.asynccontextmanager
async def broker_target(loaded: LoadedConfig, *, supervised: bool = False) -> AsyncIterator[BrokerTarget]:
    """The config's external broker, or an embedded nats-server started for as long as this lasts
    (`supervised`: for the supervisor's workers, in a process group of its own)."""
    broker = loaded.config.broker
    if broker.url is not None:
        yield BrokerTarget(broker.url)
        return
    max_payload = max(MIN_MAX_PAYLOAD, size_bytes(loaded.config.server.max_body) + ENVELOPE_ALLOWANCE)
    sync = nats_sync_interval(broker.sync)
    async with embedded_nats(_data_dir(loaded), max_payload, sync, own_process_group=supervised) as server:
        key = generated_secrets_key(server.data_dir, create=not broker.secrets_key_texts())
        yield BrokerTarget(server.url, str(server.seed_file), key)


@contextlib.asynccontextmanager
async def _seated_target(loaded: LoadedConfig, seat: Seat) -> AsyncIterator[BrokerTarget]:
    """The embedded nats-server the supervisor started (it made the generated key, if any)."""
    assert seat.broker_url is not None
    key = generated_secrets_key(Path(_data_dir(loaded)).resolve(), create=False)
    yield BrokerTarget(seat.broker_url, seat.nkey_seed_file, key)


def _data_dir(loaded: LoadedConfig) -> str | Path:
    data_dir = loaded.config.broker.data_dir
    return data_dir if data_dir.startswith("/") else loaded.path.parent / data_dir


def nats_sync_interval(sync: str | None) -> str:
    """broker.sync as nats-server's jetstream.sync_interval: "always", or a Go duration."""
    sync = sync or DEFAULT_SYNC
    if sync == "always":
        return sync
    return f"{max(1, round(seconds(sync) * 1000))}ms"


def _sealer(loaded: LoadedConfig, target: BrokerTarget) -> Sealer:
    """The configured keys (the first seals), then an embedded broker's generated key."""
    keys = [parse_key(key) for key in loaded.config.broker.secrets_key_texts()]
    if target.generated_key is not None:
        keys.append(target.generated_key)
    return Sealer(keys)


@contextlib.asynccontextmanager
async def _connect(
    loaded: LoadedConfig, target: BrokerTarget, publish_timeout: float
) -> AsyncIterator[Broker]:
    """Connect, retrying while an external NATS is not up yet (a sidecar may start first)."""
    delay = 0.5
    async with contextlib.AsyncExitStack() as stack:
        while True:
            try:
                broker = await stack.enter_async_context(
                    Broker.connect(
                        loaded.config.broker,
                        target.url,
                        publish_timeout,
                        nkey_seed_file=target.nkey_seed_file,
                    )
                )
                break
            except BrokerUnavailable as exc:
                # Refused (credentials, TLS, permissions, version): the same settings cannot
                # succeed later. The embedded server was started for us and should work at once.
                if isinstance(exc, BrokerRefused) or loaded.config.broker.url is None:
                    raise
                log.warning("%s; retrying in %.0fs", exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 10)
        yield broker


def _ordered(endpoints: dict[str, Endpoint]) -> frozenset[str]:
    return frozenset(name for name, endpoint in endpoints.items() if endpoint.config.ordered)
