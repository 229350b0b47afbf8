"""The API's parameters from a careless or hostile client: times and endpoint names that once gave
500s with tracebacks (or 503 `broker_unavailable`, or 200 with nothing) are answered 4xx with a
message that says what is wrong.

The property tests run against one real gateway, from a worker thread with a synchronous client
while the gateway serves on the test's trio loop. `HOOKGATE_FUZZ_EXAMPLES` sets how many examples
each one tries (default 100, a few seconds), for a longer run by hand.
"""

from __future__ import annotations

import logging
import math
import os
import urllib.parse
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hookgate.plugin_kit.units import EARLIEST_TIME, LATEST_TIME, parse_time
from tests.support import Gateway, NatsServer, base_config, run_gateway

AUTH = {"Authorization": "Bearer test-token"}
EXAMPLES = int(os.environ.get("HOOKGATE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Each of these gave a 500 with a traceback (or, for until=nan, a 200 with no data).
BAD_TIMES = [
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "1e20",
    "99999999999999999999",
    "-99999999999",
    "253402300800",  # 10000-01-01T00:00:00Z
    "-1",
    "0001-01-01T00:00:00+01:00",
    "99999999999d",
    "1_000",
    " ",
]
# Not a name any endpoint can have: each gave 503 broker_unavailable (the KV store refused the key).
BAD_NAMES = ["*", ">", "a.b", "café", "☃", "a b", "a*", "%", "x" * 300 + ".y"]


def _config(nats_url: str) -> str:
    return base_config(
        nats_url,
        """
        endpoints:
          svc: {url: "http://127.0.0.1:9/in"}
        routes:
          - {from: [internal], to: [svc]}
        """,
    )


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("hookgate") and (r.levelno >= logging.ERROR or r.exc_info)
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0.0),
        ("1795752000", 1795752000.0),
        ("1795752000.25", 1795752000.25),
        ("1.5e9", 1.5e9),
        ("2026-11-27T04:00:00Z", 1795752000.0),
        ("2026-11-27T05:00:00+01:00", 1795752000.0),
        ("253402300799", LATEST_TIME),
        ("9999-12-31T23:59:59Z", LATEST_TIME),
        ("1970-01-01T00:00:00Z", EARLIEST_TIME),
    ],
)
def test_times_in_range_are_read(text: str, expected: float) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", BAD_TIMES)
def test_times_out_of_range_or_not_numbers_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected a time") as info:
        parse_time(text)
    assert repr(text.strip()) in str(info.value)


async def test_bad_times_and_names_get_4xx_not_5xx(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "hookgate")
    answers: dict[tuple[str, ...], tuple[int, str, str]] = {}
    # A new connection per request: see _in_thread.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    async with (
        run_gateway(tmp_path, _config(nats_server.url)) as gw,
        httpx.AsyncClient(limits=no_reuse) as http,
    ):

        async def call(key: tuple[str, ...], method: str, path: str, **kwargs: object) -> None:
            r = await http.request(method, f"{gw.url}/api/v1{path}", headers=AUTH, **kwargs)  # type: ignore[arg-type]
            body = r.json() if r.content else {}
            answers[key] = (r.status_code, body.get("error", ""), body.get("message", ""))

        for value in BAD_TIMES:
            for path in ("/events", "/deliveries"):
                for param in ("since", "until"):
                    await call((path, param, value), "GET", path, params={param: value})
            for field in ("since", "until"):
                body = {"since": "1h", field: value}
                await call(("recover", field, value), "POST", "/endpoints/svc/recover", json=body)
        for name in BAD_NAMES:
            quoted = urllib.parse.quote(name, safe="")
            for method in ("GET", "PATCH", "DELETE"):
                await call((method, name), method, f"/endpoints/{quoted}", json={"timeout": "5s"})
            for action in ("enable", "disable", "redrive"):
                await call((action, name), "POST", f"/endpoints/{quoted}/{action}")
            await call(("recover", name), "POST", f"/endpoints/{quoted}/recover", json={"since": "1h"})
            await call(("delivery", name), "GET", f"/deliveries/{quoted}")
        # The edges of the range are fine.
        for value in ("0", "253402300799"):
            await call(("edge", value), "GET", "/events", params={"since": "0", "until": value})
    for key, (status, error, message) in answers.items():
        if key[0] in ("/events", "/deliveries"):
            param, value = key[1], key[2]
            assert (status, error) == (422, "invalid_query"), (key, message)
            assert message.startswith(f"{param}: expected a time"), (key, message)
            assert repr(value.strip()) in message, (key, message)
        elif key[0] == "recover" and len(key) == 3:
            assert (status, error) == (422, "invalid_request"), (key, message)
            assert message.endswith(f"- at `$.{key[1]}`"), (key, message)
        elif key[0] == "edge":
            assert status == 200, (key, message)
        else:
            assert (status, error) == (404, "not_found"), (key, message)
            what = "delivery" if key[0] == "delivery" else "endpoint"
            assert message.startswith(f"no {what} "), (key, message)
    assert _errors_logged(caplog) == []


# --- properties -------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_times = st.one_of(
    _text,
    st.floats().map(repr),
    st.floats().map(lambda f: f"{f:f}" if math.isfinite(f) else str(f)),
    st.integers().map(str),
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.from_regex(r"\A[0-9]{1,12}(ms|s|m|h|d)\Z"),
    st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})?\Z"),
    st.datetimes().map(lambda d: d.isoformat()),
).filter(lambda v: v != "")  # an empty parameter is an absent one


def _expected_to_parse(value: str) -> bool:
    try:
        parse_time(value)
    except ValueError:
        return False
    return True


async def _in_thread(gw: Gateway, check: object, *, keep_alive: bool = True) -> None:
    """Run a hypothesis test function (with a sync client on the gateway) in a worker thread.

    `keep_alive=False`: a new connection per request. hypercorn closes a connection, without
    saying so in the response, when the request's body was not read before the answer (a 404 or
    405 that needs no body), so a client reusing it can see the next request fail unanswered.
    """
    limits = httpx.Limits(max_keepalive_connections=None if keep_alive else 0)

    def run() -> None:
        with httpx.Client(base_url=f"{gw.url}/api/v1", headers=AUTH, timeout=10, limits=limits) as client:
            check(client)  # type: ignore[operator]

    await trio.to_thread.run_sync(run)


async def test_time_parameters_never_get_a_5xx(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    @FUZZ
    @given(value=_times, param=st.sampled_from(["since", "until"]))
    def check(client: httpx.Client, value: str, param: str) -> None:
        ok = _expected_to_parse(value)
        for path in ("/events", "/deliveries"):
            r = client.get(path, params={param: value})
            assert r.status_code == (200 if ok else 422), (path, param, value, r.text)
            if not ok:
                assert r.json()["error"] == "invalid_query" and r.json()["message"].startswith(param)
        # Recover: `until` defaults to now, so a valid `since` may still be refused as after it.
        r = client.post(
            "/endpoints/svc/recover",
            json={param: value, "since": "1h"} if param == "until" else {param: value},
        )
        assert r.status_code in ((200, 202, 422) if ok else (422,)), (param, value, r.text)

    async with run_gateway(tmp_path, _config(nats_server.url)) as gw:
        await _in_thread(gw, check)
        assert (await gw.http.get(f"{gw.url}/healthz")).status_code == 200
    assert _errors_logged(caplog) == []


async def test_endpoint_names_in_paths_never_get_a_5xx(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    @FUZZ
    @given(
        name=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30),
        method=st.sampled_from(["GET", "PATCH", "DELETE", "POST"]),
    )
    def check(client: httpx.Client, name: str, method: str) -> None:
        quoted = urllib.parse.quote(name, safe="")
        for suffix in ("", "/enable", "/recover"):
            r = client.request(method, f"/endpoints/{quoted}{suffix}", json={"since": "1h"})
            assert r.status_code < 500, (method, name, suffix, r.text)

    async with run_gateway(tmp_path, _config(nats_server.url)) as gw:
        await _in_thread(gw, check, keep_alive=False)
        assert (await gw.http.get(f"{gw.url}/healthz")).status_code == 200
    assert _errors_logged(caplog) == []
