"""The catalog of endpoints: the YAML ones (read-only) and those created through the API.

API endpoints are JSON documents in the `<PREFIX>ENDPOINT_CONFIGS` KV bucket, one per name, each
stored with its own revision (see `pack`: the bucket's revisions count every endpoint's writes). Every
replica follows the bucket with a KV watch, so an endpoint created, changed or deleted through any
replica's API reaches the router and dispatcher of all of them without a restart. A document is
checked on the way in (by the API) and again on the way out (here), with the same code that checks
a YAML endpoint: a replica whose plugins cannot build an endpoint skips it and says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import trio

from hookgate.broker import Broker, KvUpdate
from hookgate.config import (
    CheckedEndpoint,
    Component,
    ConfigError,
    EndpointConfig,
    LoadedConfig,
    Name,
    Problem,
    RouteConfig,
    listed_proxy,
    load_endpoint,
)
from hookgate.config.filters import FilterError, compile_filter
from hookgate.config.sealing import Sealer, SealError
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.watching import cancel_when_set, follow_bucket
from hookgate.observe.redact import redact
from hookgate.plugin_host.builders import build_endpoint_auth, build_signer
from hookgate.plugin_host.hooks import Hooks
from hookgate.routing.routes import CompiledRoute
from hookgate.transport.ssrf import EgressGuard
from hookgate.types import ComponentRegistry

log = logging.getLogger("hookgate.catalog")


class EndpointDocument(EndpointConfig, kw_only=True):  # type: ignore[call-arg]
    """An endpoint created through the API: a YAML endpoint's keys plus its name and subscription.

    The subscription acts as an implicit route, `{name: "endpoint:<name>", types, filter, to: [name]}`,
    after the YAML routes.
    """

    name: Name
    types: Annotated[list[str], msgspec.Meta(min_length=1)] | None = None
    filter: dict[str, Any] | None = None


Source = Literal["config", "api"]


def pack(document: dict[str, Any], revision: int, sealer: Sealer | None = None, name: str = "") -> bytes:
    """What the bucket holds for an API endpoint: its document and its own revision (1 when
    created, one more per change of it). KV revisions count every write to the whole bucket.

    With a sealer that has a key, the document is sealed (`{"revision", "sealed"}`): it holds the
    endpoint's secrets. `name` is its key in the bucket, which a sealed document is bound to."""
    if sealer is not None and sealer.can_seal:
        return msgspec.json.encode({"revision": revision, "sealed": sealer.seal(document, name)})
    return msgspec.json.encode({"revision": revision, "endpoint": document})


def unpack(value: bytes, kv_revision: int, sealer: Sealer | None = None, name: str = "") -> tuple[Any, int]:
    """The document and its revision; raises msgspec.DecodeError when the value is not JSON, and
    SealError when it is sealed and does not open with the sealer's keys.

    A bare document, stored before endpoints had their own revision, counts its KV revision: the
    number the API showed for it then, so its revision never goes back."""
    stored = msgspec.json.decode(value)
    if isinstance(stored, dict) and type(stored.get("revision")) is int and len(stored) == 2:
        if isinstance(stored.get("endpoint"), dict):
            return stored["endpoint"], stored["revision"]
        if "sealed" in stored:
            return (sealer or Sealer([])).open(stored["sealed"], name), stored["revision"]
    return stored, kv_revision


def stale_seal(value: bytes, sealer: Sealer) -> bool:
    """Whether a stored document should be sealed again with the sealer's current key: it is
    sealed with an older key, or stored in the clear and holds secrets."""
    if not sealer.can_seal:
        return False
    try:
        stored = msgspec.json.decode(value)
    except msgspec.DecodeError:
        return False
    if isinstance(stored, dict) and isinstance(stored.get("sealed"), dict):
        return stored["sealed"].get("kid") != sealer.current_kid
    document = stored.get("endpoint", stored) if isinstance(stored, dict) else stored
    return bool(document != redact(document))


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: Source
    config: EndpointConfig  # an EndpointDocument for API endpoints
    endpoint: Endpoint
    route: CompiledRoute | None = None  # the subscription of an API endpoint
    revision: int = 0  # of an API endpoint: 1 when created, one more per change
    kv_revision: int = 0  # of its document in the bucket
    stale_seal: bool = False  # stored in the clear or with an older key: sealed again at startup

    @property
    def read_only(self) -> bool:
        return self.source == "config"


Listener = Callable[["Catalog"], None]


class Catalog:
    def __init__(
        self,
        loaded: LoadedConfig,
        hooks: Hooks,
        broker: Broker,
        guard: EgressGuard,
        sealer: Sealer | None = None,
    ):
        self.registry: ComponentRegistry = hooks.registry
        self.broker = broker
        self.guard = guard
        # Seals API endpoints' documents (they hold secrets) and opens them.
        self.sealer = sealer if sealer is not None else Sealer([])
        self.bucket = broker.topology.endpoint_configs_bucket
        self._config = loaded.config
        self.config_entries = {
            name: CatalogEntry(
                name,
                "config",
                endpoint,
                self._build(name, endpoint, loaded.signers.get(name), loaded.endpoint_auth.get(name)),
            )
            for name, endpoint in loaded.config.endpoints.items()
        }
        self.api_entries: dict[str, CatalogEntry] = {}
        self.kv_revision = 0  # the latest KV revision applied
        self._applied = trio.Event()
        self._listeners: list[Listener] = []

    # --- reading ------------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self.config_entries or name in self.api_entries

    def get(self, name: str) -> CatalogEntry | None:
        return self.config_entries.get(name) or self.api_entries.get(name)

    def entries(self) -> list[CatalogEntry]:
        """The YAML endpoints in file order, then the API ones by name."""
        return [*self.config_entries.values(), *(self.api_entries[n] for n in sorted(self.api_entries))]

    def endpoints(self) -> dict[str, Endpoint]:
        return {entry.name: entry.endpoint for entry in self.entries()}

    def implicit_routes(self) -> list[CompiledRoute]:
        return [entry.route for entry in self.entries() if entry.route is not None]

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(catalog)` now and after every change."""
        self._listeners.append(listener)
        listener(self)

    # --- checking and building ----------------------------------------------------------------

    def check(self, value: Any) -> CheckedEndpoint[EndpointDocument]:
        """A document checked as a YAML endpoint is, plus its filter; raises ConfigError."""
        checked = load_endpoint(
            value, EndpointDocument, self.registry, self._config.broker, self._config.egress
        )
        if checked.config.filter is not None:
            try:
                compile_filter(checked.config.filter, "$.filter")
            except FilterError as exc:
                raise ConfigError(
                    [Problem("<request>", None, e.path, e.message) for e in exc.errors]
                ) from None
        return checked

    def _build(
        self,
        name: str,
        config: EndpointConfig,
        signer: Component | None,
        auth: Component | None,
        *,
        from_api: bool = False,
    ) -> Endpoint:
        egress = self._config.egress
        proxy = config.proxy if config.proxy is not None else egress.proxy
        if from_api and config.proxy:
            # An API endpoint names a proxy the config lists (checked): use the config's URL,
            # with the credentials the operator gave it.
            proxy = listed_proxy(config.proxy, egress)
        return Endpoint.build(
            name,
            config,
            signer=build_signer(self.registry, signer),
            guard=self.guard,
            auth=build_endpoint_auth(self.registry, auth),
            proxy=proxy or None,
        )

    def _entry(self, update: KvUpdate) -> CatalogEntry | None:
        """The entry for a stored document, or None (logged) when this replica cannot use it."""
        name = update.key
        if name in self.config_entries:
            log.warning("endpoint %s is in the config file and in the API's store; the config wins", name)
            return None
        try:
            document, revision = unpack(update.value or b"", update.revision, self.sealer, name)
            checked = self.check(document)
        except msgspec.DecodeError:
            log.error("endpoint %s: its stored document is not JSON; skipped", name)
            return None
        except SealError as exc:
            log.error("endpoint %s cannot be used on this replica: its stored document %s", name, exc)
            return None
        except ConfigError as exc:
            # The API checked the document before storing it, so this is a replica without the
            # plugin it names, or with another version of it: paths and messages say which.
            problems = "; ".join(f"{p.at}: {p.message}" for p in exc.problems)
            log.error("endpoint %s cannot be used on this replica: %s", name, problems)
            return None
        config = checked.config
        if config.name != name:
            log.error("endpoint %s: its stored document names %r; skipped", name, config.name)
            return None
        try:
            endpoint = self._build(name, config, checked.signer, checked.auth, from_api=True)
        except Exception as exc:
            log.error("endpoint %s cannot be built: %s", name, type(exc).__name__)
            return None
        route = CompiledRoute.compile(
            0, RouteConfig(to=[name], name=f"endpoint:{name}", types=config.types, filter=config.filter)
        )
        stale = stale_seal(update.value or b"", self.sealer)
        return CatalogEntry(name, "api", config, endpoint, route, revision, update.revision, stale)

    # --- following the store -------------------------------------------------------------------

    def apply(self, updates: list[KvUpdate], *, snapshot: bool = False) -> None:
        """Apply a batch from the watch; a snapshot replaces every API endpoint known so far."""
        before = self.api_entries
        entries = {} if snapshot else dict(before)
        for update in updates:
            self.kv_revision = max(self.kv_revision, update.revision)
            entries.pop(update.key, None)
            unchanged = before.get(update.key)
            if unchanged is not None and unchanged.kv_revision == update.revision:
                entries[update.key] = unchanged  # a snapshot after a re-watch: keep its worker
            elif update.value is not None and (entry := self._entry(update)) is not None:
                entries[update.key] = entry
        for name in sorted(before.keys() - entries.keys()):
            log.info("endpoint %s removed", name)
        for name, entry in entries.items():
            if before.get(name) is not entry:
                log.info(
                    "endpoint %s %s (revision %d)",
                    name,
                    "changed" if name in before else "added",
                    entry.revision,
                )
        self.api_entries = entries
        for listener in self._listeners:
            listener(self)
        self._applied.set()
        self._applied = trio.Event()

    async def wait_for(self, kv_revision: int, timeout: float = 5.0) -> bool:
        """Whether this replica applied `kv_revision` within `timeout` (read-your-writes for the API)."""
        with trio.move_on_after(timeout):
            while self.kv_revision < kv_revision:
                await self._applied.wait()
            return True
        return False

    async def run(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the bucket until `stopping`; started once the current documents are applied."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_set, stopping, nursery.cancel_scope)
            await nursery.start(self._follow)
            task_status.started()
            nursery.start_soon(self.seal_again)

    async def seal_again(self) -> int:
        """Seal again, with the current key, the documents stored in the clear or with an older
        key (a key rotation, or a key set for the first time); returns how many were.

        Runs once at startup, on what the first snapshot found. Each write is conditional on the
        revision read, so of replicas starting together one wins and the others find it done; the
        document's own revision does not change."""
        done = 0
        for entry in list(self.api_entries.values()):
            if not entry.stale_seal:
                continue
            try:
                stored = await self.broker.kv_get(self.bucket, entry.name)
                if stored is None or stored.revision != entry.kv_revision:
                    continue
                document, revision = unpack(stored.value or b"{}", stored.revision, self.sealer, entry.name)
                written = await self.broker.kv_update(
                    self.bucket,
                    entry.name,
                    pack(document, revision, self.sealer, entry.name),
                    stored.revision,
                )
            except Exception as exc:
                log.warning("endpoint %s: sealing its stored document again failed: %s", entry.name, exc)
                continue
            if written is not None:
                done += 1
        if done:
            log.info("sealed %d endpoint document(s) again with key %s", done, self.sealer.current_kid)
        return done

    async def _follow(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        def apply(batch: list[KvUpdate], snapshot: bool) -> None:
            self.apply(batch, snapshot=snapshot)

        await follow_bucket(self.broker, self.bucket, apply, log, "endpoint documents", task_status)
