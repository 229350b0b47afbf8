"""`/api/v1/endpoints[/{name}]`: list, show, create, change and delete endpoints.

YAML endpoints are listed read-only. API endpoints are documents in JetStream KV (see
`hookgate.api.catalog`): a create is refused by the server itself when the name exists on any replica,
and a change applies only to the revision it was computed from. Each write answers once this
replica's catalog has applied it, so the caller can use the endpoint at once.

Secrets (signing keys, auth credentials) appear in one response only: the 201 of the create. In
the bucket, documents are sealed with the catalog's key (`hookgate.config.sealing`); a gateway without a
key (an external broker and no broker.secrets_keys) refuses to store a document that holds secrets.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
from typing import Any, Literal

import msgspec

from hookgate.api.catalog import Catalog, CatalogEntry, EndpointDocument, pack, unpack
from hookgate.broker import Broker
from hookgate.config import NAME_PATTERN, ConfigError, EndpointConfig
from hookgate.config.checks import MAX_ORDERED_ENDPOINTS, too_many_ordered
from hookgate.config.sealing import SealError
from hookgate.egress.state import EndpointStates
from hookgate.ingress.asgi import (
    TOO_DEEP,
    Receive,
    Scope,
    Send,
    read_body_or_answer,
    send_bytes,
    send_error,
    send_json,
)
from hookgate.observe.redact import placeholders, redact

log = logging.getLogger("hookgate.api")

PREFIX = "/api/v1/endpoints"
_NAME = re.compile(NAME_PATTERN.removeprefix("^").removesuffix("$"))
SUBSCRIPTION_KEYS = ("name", "types", "filter")
# How long a write waits for this replica's catalog to apply it before answering anyway.
APPLY_TIMEOUT = 5.0


class EndpointOut(msgspec.Struct, kw_only=True):
    """An endpoint as the API shows it."""

    name: str
    source: Literal["config", "api"]
    read_only: bool
    url: str | None
    subject: str | None
    types: list[str] | None
    filter: dict[str, Any] | None
    disabled: bool
    revision: int | None  # 1 when created through the API, one more per change; None for YAML endpoints
    config: dict[str, Any]  # every setting, secrets redacted (except in the create's answer)


class EndpointList(msgspec.Struct):
    """The same shape as the log's pages (`{"data", "next"}`), all in one page."""

    data: list[EndpointOut]
    next: str | None = None


def new_signing_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and the base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def show(
    name: str,
    source: Literal["config", "api"],
    config: EndpointConfig,
    *,
    disabled: bool,
    revision: int | None = None,
    reveal: bool = False,
) -> EndpointOut:
    settings = msgspec.to_builtins(config)
    for key in SUBSCRIPTION_KEYS:
        settings.pop(key, None)
    document = config if isinstance(config, EndpointDocument) else None
    return EndpointOut(
        name=name,
        source=source,
        read_only=source == "config",
        url=redact({"url": config.url})["url"],
        subject=config.subject,
        types=document.types if document else None,
        filter=document.filter if document else None,
        disabled=disabled,
        revision=revision,
        config=settings if reveal else redact(settings),
    )


class EndpointApi:
    def __init__(self, catalog: Catalog, states: EndpointStates, broker: Broker, max_body: int):
        self.catalog = catalog
        self.states = states
        self.broker = broker
        self.max_body = max_body
        self.bucket = broker.topology.endpoint_configs_bucket

    async def handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> bool:
        """Answer a request under /api/v1/endpoints; False when the path is not one of ours."""
        method = scope["method"]
        if path == PREFIX:
            if method == "GET":
                await send_json(send, 200, EndpointList([self._show(e) for e in self.catalog.entries()]))
            elif method == "POST":
                await self._create(scope, receive, send)
            else:
                await send_error(send, 405, "method_not_allowed", "GET or POST endpoints here")
            return True
        name = path[len(PREFIX) + 1 :] if path.startswith(PREFIX + "/") else ""
        if not name or "/" in name:
            return False
        if not _NAME.fullmatch(name):
            # Not a name any endpoint can have (`*`, `>`, non-ASCII...): it would otherwise reach
            # the KV store as a key, or a wildcard.
            await _not_found(send, name)
            return True
        if method == "GET":
            entry = self.catalog.get(name)
            if entry is None:
                await _not_found(send, name)
            else:
                await send_json(send, 200, self._show(entry))
        elif method == "PATCH":
            await self._change(scope, receive, send, name)
        elif method == "DELETE":
            await self._delete(send, name)
        else:
            await send_error(send, 405, "method_not_allowed", "GET, PATCH or DELETE an endpoint")
        return True

    def _show(self, entry: CatalogEntry) -> EndpointOut:
        return show(
            entry.name,
            entry.source,
            entry.config,
            disabled=self.states.disabled(entry.name),
            revision=None if entry.read_only else entry.revision,
        )

    async def _create(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await self._read_object(scope, receive, send)
        if raw is None:
            return
        if "signing" not in raw:
            # Every API endpoint is signed unless asked otherwise ("signing": null).
            raw["signing"] = {"scheme": "standard-webhooks", "secret": new_signing_secret()}
        document = await self._check(send, raw)
        if document is None:
            return
        name = document.name
        if name in self.catalog.config_entries:
            await send_error(send, 409, "conflict", f"endpoint {name!r} exists (in the config file)")
            return
        if await self._refuse_unsealed(send, raw):
            return
        try:
            kv_revision = await self.broker.kv_create(self.bucket, name, self._pack(raw, 1, name))
        except Exception as exc:
            await _unavailable(send, f"could not store endpoint {name}", exc)
            return
        if kv_revision is None:
            await send_error(send, 409, "conflict", f"endpoint {name!r} exists")
            return
        await self.catalog.wait_for(kv_revision, APPLY_TIMEOUT)
        log.info("endpoint %s created through the API", name)
        view = show(name, "api", document, disabled=self.states.disabled(name), revision=1, reveal=True)
        await send_json(send, 201, view, headers=[(b"location", f"{PREFIX}/{name}".encode())])

    async def _change(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        if await self._refuse_read_only(send, name):
            return
        try:
            stored = await self.broker.kv_get(self.bucket, name)
        except Exception as exc:
            await _unavailable(send, f"could not read endpoint {name}", exc)
            return
        if stored is None:
            await _not_found(send, name)
            return
        patch = await self._read_object(scope, receive, send)
        if patch is None:
            return
        if "name" in patch and patch["name"] != name:
            await send_error(send, 422, "invalid_endpoint", "$.name: an endpoint cannot be renamed")
            return
        try:
            current, revision = unpack(stored.value or b"{}", stored.revision, self.catalog.sealer, name)
        except msgspec.DecodeError:
            # Not written by us: the patch must then give a whole document.
            current, revision = {}, stored.revision
        except SealError as exc:
            log.error("endpoint %s: its stored document %s", name, exc)
            await send_error(
                send,
                500,
                "secrets_key",
                f"endpoint {name!r} cannot be changed here: its stored document {exc}",
            )
            return
        raw = merge_patch(current, patch)
        document = await self._check(send, raw)
        if document is None:
            return
        if await self._refuse_unsealed(send, raw):
            return
        revision += 1
        try:
            # Only over the version the patch was applied to: a change made meanwhile (through
            # any replica) moved the key's KV revision on, and this write is refused. The document
            # is sealed with the current key, so a change completes a key rotation for it.
            kv_revision = await self.broker.kv_update(
                self.bucket, name, self._pack(raw, revision, name), stored.revision
            )
        except Exception as exc:
            await _unavailable(send, f"could not store endpoint {name}", exc)
            return
        if kv_revision is None:
            await send_error(
                send,
                409,
                "conflict",
                f"endpoint {name!r} was changed or deleted meanwhile; read it and retry",
            )
            return
        await self.catalog.wait_for(kv_revision, APPLY_TIMEOUT)
        log.info("endpoint %s changed through the API (revision %d)", name, revision)
        await send_json(
            send, 200, show(name, "api", document, disabled=self.states.disabled(name), revision=revision)
        )

    async def _delete(self, send: Send, name: str) -> None:
        if await self._refuse_read_only(send, name):
            return
        topology = self.broker.topology
        try:
            stored = await self.broker.kv_get(self.bucket, name)
            kv_revision = (
                None if stored is None else await self.broker.kv_delete(self.bucket, name, stored.revision)
            )
        except Exception as exc:
            await _unavailable(send, f"could not delete endpoint {name}", exc)
            return
        if stored is None:
            await _not_found(send, name)
            return
        if kv_revision is None:
            await send_error(send, 409, "conflict", f"endpoint {name!r} was changed meanwhile; retry")
            return
        await self.catalog.wait_for(kv_revision, APPLY_TIMEOUT)
        # Every replica stops its lane or worker when it sees the delete; the consumers of its own,
        # what is still queued or parked for the endpoint and its state go once, here, so a new
        # endpoint of the same name starts empty. Another replica still pulling finds a consumer
        # gone and waits quietly.
        try:
            for durable in (topology.ordered_consumer(name), topology.parked_consumer(name)):
                await self.broker.delete_consumer(topology.deliveries_stream, durable)
            for subject in (
                topology.delivery_subject(name),
                topology.delivery_subject(name, ordered=True),
                topology.parked_subject(name),
                f"{topology.prefix}.schedules.{name}.>",
            ):
                await self.broker.purge_subject(topology.deliveries_stream, subject)
            await self.broker.kv_delete(topology.endpoints_bucket, name)
            self.states.limits.remove(name)  # its circuit and failing streak, for every replica
        except Exception as exc:
            # The endpoint is deleted; leftovers expire with the streams' retention.
            log.warning("endpoint %s deleted; cleaning up after it failed: %s", name, exc)
        log.info("endpoint %s deleted through the API", name)
        await send_bytes(send, 204, b"")

    def _pack(self, raw: dict[str, Any], revision: int, name: str) -> bytes:
        return pack(raw, revision, self.catalog.sealer, name)

    async def _refuse_unsealed(self, send: Send, raw: dict[str, Any]) -> bool:
        """Refuse (403) to store secrets in the clear: a gateway with no key to seal them."""
        if self.catalog.sealer.can_seal or redact(raw) == raw:
            return False
        await send_error(
            send,
            403,
            "secrets_key_missing",
            "this gateway has no key to seal endpoint secrets with, and will not store them in the "
            "clear: its operator sets broker.secrets_keys (or create the endpoint without secrets, "
            'e.g. with "signing": null)',
        )
        return True

    async def _refuse_read_only(self, send: Send, name: str) -> bool:
        if name in self.catalog.config_entries:
            await send_error(
                send, 409, "read_only", f"endpoint {name!r} is defined in the config file; change it there"
            )
            return True
        return False

    async def _read_object(self, scope: Scope, receive: Receive, send: Send) -> dict[str, Any] | None:
        body = await read_body_or_answer(scope, receive, send, self.max_body)
        if body is None:
            return None
        try:
            value = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            await send_error(send, 400, "malformed_body", f"the body is not valid JSON: {exc}")
            return None
        except RecursionError:
            await send_error(send, 400, "malformed_body", TOO_DEEP)
            return None
        if not isinstance(value, dict):
            await send_error(send, 422, "invalid_endpoint", "$: expected a JSON object")
            return None
        return value

    async def _check(self, send: Send, raw: dict[str, Any]) -> EndpointDocument | None:
        """The checked document, or None once a 422 naming every problem's path was sent."""
        redacted = placeholders(raw)
        if redacted:
            message = "; ".join(
                f"{path}: this is a redacted placeholder; send the secret itself, or leave the key out"
                for path in redacted
            )
            await send_error(send, 422, "invalid_endpoint", message)
            return None
        try:
            document = self.catalog.check(raw).config
        except ConfigError as exc:
            message = "; ".join(f"{p.at}: {p.message}" for p in exc.problems)
            await send_error(send, 422, "invalid_endpoint", message)
            return None
        if document.ordered:
            ordered = [e.name for e in self.catalog.entries() if e.config.ordered and e.name != document.name]
            if len(ordered) >= MAX_ORDERED_ENDPOINTS:
                message = f"$.ordered: {too_many_ordered(len(ordered) + 1, MAX_ORDERED_ENDPOINTS)}"
                await send_error(send, 422, "invalid_endpoint", message)
                return None
        return document


async def _not_found(send: Send, name: str) -> None:
    await send_error(send, 404, "not_found", f"no endpoint named {name!r}")


async def _unavailable(send: Send, what: str, exc: Exception) -> None:
    log.error("%s: %s", what, exc)
    await send_error(send, 503, "broker_unavailable", f"{what}; retry later")
