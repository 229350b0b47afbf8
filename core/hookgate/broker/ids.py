"""Identifiers: time-ordered random ids for new events, deterministic ids where retries must agree."""

from __future__ import annotations

import hashlib
import secrets
import time


def new_event_id() -> str:
    """A fresh event id, sortable by creation time: `evt_` + 12 hex digits of ms + 16 random."""
    return f"evt_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def event_id_for(source: str, external_id: str) -> str:
    """The event id of a provider's delivery: the same provider id on a source always maps to it."""
    digest = hashlib.blake2b(f"{source}\0{external_id}".encode(), digest_size=12).hexdigest()
    return f"evt_{digest}"


def event_id_for_body(source: str, body: bytes) -> str:
    """The event id of a request deduplicated by its body (`dedup: body`): the same bytes on a
    source always map to it, whatever delivery id came with them."""
    return event_id_for(source, "\0body:sha256:" + hashlib.sha256(body).hexdigest())


def delivery_id(event_id: str, endpoint: str) -> str:
    """One delivery per (event, endpoint); the router's redelivery lands on the same id."""
    return "dlv_" + hashlib.blake2b(f"{event_id}\0{endpoint}".encode(), digest_size=12).hexdigest()
