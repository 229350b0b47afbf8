"""Plain-text rendering of the API's JSON for people: aligned tables and key/value blocks.

Rows are the API's JSON objects as they came, so a field a gateway does not send shows as "-"
instead of failing: the command line may be newer or older than the gateway it talks to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]

ERROR_WIDTH = 60
_FRACTION = re.compile(r"(T\d\d:\d\d:\d\d)\.\d+")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns left-aligned, two spaces apart, with no trailing spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def short_time(value: Any) -> str:
    """RFC 3339 to the second: "2026-11-27T04:00:00.123Z" shows as "2026-11-27T04:00:00Z"."""
    return _FRACTION.sub(r"\1", value) if isinstance(value, str) else cell(value)


def clip(value: Any, width: int = ERROR_WIDTH) -> str:
    """One line of at most `width` characters, so that a long error keeps the table readable."""
    return one_line(cell(value), width)


def one_line(text: str, width: int | None = None) -> str:
    """`text` with its whitespace runs as single spaces, cut to `width` characters with "…"."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def latency(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return "-"
    return f"{ms:.0f}ms" if ms < 1000 else f"{ms / 1000:.2f}s"


# --- events --------------------------------------------------------------------------------


def events(rows: Sequence[Row]) -> str:
    return table(
        ["ID", "SOURCE", "TYPE", "RECEIVED", "ENDPOINTS"],
        [
            [
                cell(e.get("id")),
                cell(e.get("source")),
                cell(e.get("type")),
                short_time(e.get("received_at")),
                _routed_to(e),
            ]
            for e in rows
        ],
    )


def _routed_to(event: Row) -> str:
    if event.get("routing_error"):
        return f"routing failed: {clip(event['routing_error'])}"
    if event.get("routed") is False:
        return "(not routed yet)"
    endpoints = event.get("endpoints") or []
    return ", ".join(endpoints) if endpoints else "(no route)"


def event_detail(event: Row) -> str:
    lines = _fields(
        event,
        [
            ("id", "id"),
            ("source", "source"),
            ("type", "type"),
            ("received", "received_at"),
            ("routes", "routes"),
            ("endpoints", "endpoints"),
            ("routing error", "routing_error"),
            ("content type", "content_type"),
            ("size", "size"),
        ],
    )
    lines.append("headers:")
    lines += [f"  {name}: {value}" for name, value in event.get("headers") or []]
    if event.get("body") is not None:
        body, note = event["body"], ""
    elif event.get("body_base64") is not None:
        body, note = event["body_base64"], " (base64: not UTF-8)"
    else:
        body, note = "", ""
    if event.get("body_truncated"):
        note += " (truncated)"
    lines.append(f"body{note}:")
    lines.append(body)
    return "\n".join(lines)


# --- deliveries ----------------------------------------------------------------------------


def deliveries(rows: Sequence[Row]) -> str:
    return table(
        ["ID", "ENDPOINT", "STATUS", "ATTEMPTS", "CREATED", "LAST", "NEXT ATTEMPT"],
        [
            [
                cell(d.get("id")),
                cell(d.get("endpoint")),
                cell(d.get("status")),
                cell(d.get("attempts")),
                short_time(d.get("created_at")),
                _last(d.get("last_status"), d.get("last_error")),
                short_time(d.get("next_attempt_at")),
            ]
            for d in rows
        ],
    )


def _last(status: Any, error: Any) -> str:
    """The last answer: its status, or the error when there was none (a timeout, a refused connection)."""
    if status is not None:
        return cell(status)
    return clip(error) if error else "-"


def delivery_detail(delivery: Row) -> str:
    lines = _fields(
        delivery,
        [
            ("id", "id"),
            ("event", "event_id"),
            ("endpoint", "endpoint"),
            ("source", "source"),
            ("type", "type"),
            ("status", "status"),
            ("attempts", "attempts"),
            ("created", "created_at"),
            ("updated", "updated_at"),
            ("next attempt", "next_attempt_at"),
        ],
    )
    attempts = delivery.get("attempt_log") or []
    if attempts:
        lines += ["", attempt_table(attempts)]
    return "\n".join(lines)


def attempt_table(attempts: Sequence[Row]) -> str:
    return table(
        ["ATTEMPT", "STARTED", "LATENCY", "OUTCOME", "STATUS", "ERROR"],
        [
            [
                cell(a.get("attempt")),
                short_time(a.get("started_at")),
                latency(a.get("latency_ms")),
                cell(a.get("outcome")),
                cell(a.get("status")),
                _attempt_error(a),
            ]
            for a in attempts
        ],
    )


def _attempt_error(attempt: Row) -> str:
    kind, error = attempt.get("error_kind"), attempt.get("error")
    if kind and error:
        return clip(f"{kind}: {error}")
    return clip(kind or error)


# --- endpoints and jobs --------------------------------------------------------------------


def endpoints(rows: Sequence[Row]) -> str:
    return table(
        ["NAME", "TARGET", "FROM", "STATE"],
        [[cell(e.get("name")), _target(e), _origin(e), _state(e)] for e in rows],
    )


def _target(endpoint: Row) -> str:
    if endpoint.get("url"):
        return str(endpoint["url"])
    if endpoint.get("subject"):
        return f"subject {endpoint['subject']}"
    return "-"


def _origin(endpoint: Row) -> str:
    if endpoint.get("source"):
        return str(endpoint["source"])
    read_only = endpoint.get("read_only")
    return "-" if read_only is None else ("config" if read_only else "api")


def _state(endpoint: Row) -> str:
    disabled = endpoint.get("disabled")
    return "-" if disabled is None else ("disabled" if disabled else "enabled")


def job_summary(job: Row) -> str:
    """One line: what the job does, its state and its counts."""
    what = f"{cell(job.get('kind'))} {cell(job.get('endpoint'))}"
    counts = f"scanned {cell(job.get('scanned'))}, requeued {cell(job.get('requeued'))}"
    if job.get("skipped"):
        counts += f", skipped {job['skipped']} (event no longer retained)"
    error = f": {clip(job['error'])}" if job.get("error") else ""
    return f"job {cell(job.get('id'))} ({what}) {cell(job.get('state'))}{error}; {counts}"


def _fields(row: Row, names: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in names) + 1
    out = []
    for label, key in names:
        value = row.get(key)
        # Times in full: a detail view is where the milliseconds matter.
        shown = (", ".join(str(v) for v in value) or "-") if isinstance(value, list) else cell(value)
        out.append(f"{label + ':':<{width}} {shown}")
    return out
