"""The command line's API commands: each calls the API through `ApiClient`, prints a table or
the JSON, and returns the exit code. `hookgate.cli.entry` parses the arguments and calls these."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from hookgate.cli import tables
from hookgate.cli.client import ApiClient, ApiError, Params, Reply, check_page
from hookgate.cli.progress import JobProgress

POLL_INTERVAL = 0.5
# With --all, large pages mean fewer requests; a given --limit is kept (it is the page size).
ALL_PAGE_SIZE = 500


def print_json(body: Any) -> None:
    print(json.dumps(body, indent=2, ensure_ascii=False))


def _show(args: argparse.Namespace, body: Any, render: Callable[[Any], str]) -> None:
    if args.json:
        print_json(body)
    else:
        print(render(body))


# --- lists ---------------------------------------------------------------------------------


def events(client: ApiClient, args: argparse.Namespace) -> int:
    params: Params = {"source": args.source, "since": args.since, "until": args.until}
    return _list(client, args, "/events", params, "events", tables.events)


def deliveries(client: ApiClient, args: argparse.Namespace) -> int:
    params: Params = {
        "endpoint": args.endpoint,
        "status": args.status,
        "event": args.event,
        "since": args.since,
        "until": args.until,
    }
    return _list(client, args, "/deliveries", params, "deliveries", tables.deliveries)


def _list(
    client: ApiClient,
    args: argparse.Namespace,
    path: str,
    params: Params,
    noun: str,
    render: Callable[[list[Any]], str],
) -> int:
    limit = args.limit or (ALL_PAGE_SIZE if args.all else None)
    params = {**params, "limit": limit, "cursor": args.cursor}
    if args.all:
        rows = [row for page in client.pages(path, params) for row in page["data"]]
        page: dict[str, Any] = {"data": rows, "next": None}
    else:
        page = client.page(path, params)
        rows = page["data"]
    if args.json:
        print_json(page)
    elif rows:
        print(render(rows))
    else:
        print(f"no {noun}", file=sys.stderr)
    if page.get("next") and not args.json:
        # On stderr, so that the table on stdout stays clean for `grep` and friends.
        print(f"more {noun}: add --cursor {page['next']} for the next page, or --all", file=sys.stderr)
    return 0


def event(client: ApiClient, args: argparse.Namespace) -> int:
    body = client.get(f"/events/{args.id}")
    _show(args, body, tables.event_detail)
    return 0


def delivery(client: ApiClient, args: argparse.Namespace) -> int:
    body = client.get(f"/deliveries/{args.id}")
    _show(args, body, tables.delivery_detail)
    return 0


def endpoints(client: ApiClient, args: argparse.Namespace) -> int:
    try:
        body = client.page("/endpoints")
    except ApiError as exc:
        if exc.status in (404, 405):
            raise ApiError(
                f"this gateway does not list endpoints ({exc}); it may be older than this command line. "
                "`hookgate check -c CONFIG` lists the endpoints of a config file"
            ) from None
        raise
    _show(args, body, _endpoints_table)
    return 0


def _endpoints_table(body: Any) -> str:
    rows = endpoint_rows(body)
    return tables.endpoints(rows) if rows else "no endpoints"


def endpoint_rows(body: Any) -> list[dict[str, Any]]:
    """The endpoints in `GET /api/v1/endpoints`'s answer, `{"data": [...]}`."""
    return [item for item in check_page("GET /api/v1/endpoints", body)["data"] if isinstance(item, dict)]


def endpoint_state(client: ApiClient, args: argparse.Namespace) -> int:
    client.post(f"/endpoints/{args.name}/{args.action}")
    print(f"endpoint {args.name} {args.action}d")
    return 0


# --- publishing and replays ----------------------------------------------------------------


def send(client: ApiClient, args: argparse.Namespace) -> int:
    data = read_data(args.data)  # before any request: a typo must not half-happen
    body: dict[str, Any] = {"type": args.type, "data": data}
    if args.id:
        body["id"] = args.id
    if args.to:
        body["to"] = _split(args.to)
    accepted = client.post("/events", body).object()
    _show(args, accepted, lambda b: f"event {b.get('id')} accepted ({args.type})")
    return 0


def read_data(spec: str) -> Any:
    """`--data`: JSON text, `@file.json`, or `-` for stdin."""
    if spec == "-":
        text, where = sys.stdin.read(), "stdin"
    elif spec.startswith("@"):
        try:
            with open(spec[1:], encoding="utf-8") as f:
                text, where = f.read(), spec[1:]
        except OSError as exc:
            raise ApiError(f"--data: cannot read {spec[1:]}: {exc.strerror}") from None
    else:
        text, where = spec, "--data"
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ApiError(f"{where} is not valid JSON: {exc}") from None


def retry(client: ApiClient, args: argparse.Namespace) -> int:
    try:
        reply = client.request(
            "POST", f"/deliveries/{args.id}/retry", params={"now": "true" if args.now else None}
        )
    except ApiError as exc:
        if exc.status == 409 and exc.code == "delivery_active" and not args.now:
            hint = "wait for it to finish, or send a retrying one's next attempt now with --now"
            raise ApiError(f"{exc}. Nothing was queued; {hint}") from None
        if exc.status == 409:
            raise ApiError(f"{exc}. Nothing was queued") from None
        raise

    def done(b: dict[str, Any]) -> str:
        what = (
            "attempt {attempt} pulled forward: sent now"
            if b.get("pulled_forward")
            else "queued as attempt {attempt}"
        )
        return f"delivery {b.get('delivery')} to {b.get('endpoint')} " + what.format(attempt=b.get("attempt"))

    _show(args, reply.object(), done)
    return 0


def recover(client: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"since": args.since}
    if args.until:
        body["until"] = args.until
    if args.status:
        body["status"] = _split(args.status)
    reply = client.post(f"/endpoints/{args.endpoint}/recover", body)
    return _follow(client, args, reply)


def redrive(client: ApiClient, args: argparse.Namespace) -> int:
    return _follow(client, args, client.post(f"/endpoints/{args.endpoint}/redrive"))


def job(client: ApiClient, args: argparse.Namespace) -> int:
    found = client.request("GET", f"/jobs/{args.id}").object()
    if args.wait and found.get("state") == "running":
        found = wait_for_job(client, found)
    _show(args, found, tables.job_summary)
    return 1 if found.get("state") == "failed" else 0


def _follow(client: ApiClient, args: argparse.Namespace, reply: Reply) -> int:
    started = reply.object()
    if reply.status == 200:
        # The API hands back the same job when it is already running, rather than a second one.
        print(f"the same job is already running: {started.get('id')}", file=sys.stderr)
    if args.no_wait:
        _show(args, started, tables.job_summary)
        return 0
    final = wait_for_job(client, started)
    if args.json:
        print_json(final)
    return 1 if final.get("state") == "failed" else 0


def wait_for_job(
    client: ApiClient, found: dict[str, Any], sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """Poll a job until it ends, drawing its progress on stderr; the final job."""
    progress = JobProgress(sys.stderr)
    try:
        while found.get("state") == "running":
            progress.show(found)
            sleep(POLL_INTERVAL)
            found = client.request("GET", f"/jobs/{found['id']}").object()
    except KeyboardInterrupt:
        # The job runs in the gateway: leaving only stops watching it.
        raise ApiError(
            f"stopped waiting; job {found.get('id')} goes on: see `hookgate job {found.get('id')}`"
        ) from None
    progress.finish(found)
    return found


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]
