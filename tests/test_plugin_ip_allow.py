"""The `ip_allow` access rule: IPv4/IPv6 networks, trusted proxies and X-Forwarded-For, config errors.

The last test runs the real gateway, where the peer is the loopback address.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from hookgate.config import ConfigError
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import IngressRequest
from tests.plugin_support import (
    assert_forbidden,
    assert_http_error,
    assert_problem,
    ingress_request,
    load_access_rule,
    load_error,
    nested,
    sources_config,
)
from tests.support import NatsServer, receiver, run_gateway, stream_messages


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_rule(hooks: Hooks, **options: Any) -> Any:
    return load_access_rule(hooks, "ip_allow", **options)


def request(client: str | None, *forwarded_for: str) -> IngressRequest:
    headers = [("x-forwarded-for", value) for value in forwarded_for]
    return ingress_request("acme", headers=headers, client=client)


# --- the peer address --------------------------------------------------------------------------


def test_ipv4_peers_inside_the_networks_pass(hooks: Hooks) -> None:
    rule = make_rule(hooks, networks=["192.0.2.0/24", "198.51.100.7"])
    assert rule.check(request("192.0.2.0")) is None
    assert rule.check(request("192.0.2.255")) is None
    assert rule.check(request("198.51.100.7")) is None  # a bare address is a /32
    assert_forbidden(rule.check(request("192.0.3.1")), "192.0.3.1", "not allowed")
    assert_forbidden(rule.check(request("198.51.100.8")), "not allowed")


def test_ipv6_peers_inside_the_networks_pass(hooks: Hooks) -> None:
    rule = make_rule(hooks, networks=["2001:db8:abcd::/48", "::1"])
    assert rule.check(request("2001:db8:abcd:12::1")) is None
    assert rule.check(request("2001:DB8:ABCD:0:0:0:0:ff")) is None
    assert rule.check(request("::1")) is None
    assert_forbidden(rule.check(request("2001:db8:abce::1")), "not allowed")
    assert_forbidden(rule.check(request("192.0.2.1")), "not allowed")  # IPv4 is not in IPv6 networks


def test_an_ipv4_mapped_ipv6_peer_counts_as_its_ipv4_address(hooks: Hooks) -> None:
    rule = make_rule(hooks, networks=["192.0.2.0/24"])
    assert rule.check(request("::ffff:192.0.2.9")) is None
    assert_forbidden(rule.check(request("::ffff:192.0.3.9")))


@pytest.mark.parametrize(
    "client", [None, "", "not-an-ip", "192.0.2.300", "192.0.2.1:443", "[::1]", "unix:/x"]
)
def test_an_unknown_or_malformed_peer_is_forbidden(hooks: Hooks, client: str | None) -> None:
    rule = make_rule(hooks, networks=["0.0.0.0/0", "::/0"])
    assert_forbidden(rule.check(request(client)))


# --- X-Forwarded-For ---------------------------------------------------------------------------


def test_forwarded_for_from_an_untrusted_peer_is_ignored(hooks: Hooks) -> None:
    rule = make_rule(hooks, networks=["192.0.2.0/24"], trusted_proxies=["10.0.0.0/8"])
    # A spoofed header cannot make an outsider an insider...
    assert_forbidden(rule.check(request("203.0.113.5", "192.0.2.1")), "203.0.113.5")
    # ...nor an insider an outsider, and garbage in it is not even read.
    assert rule.check(request("192.0.2.1", "203.0.113.5")) is None
    assert rule.check(request("192.0.2.1", "garbage, ,,")) is None


def test_forwarded_for_is_read_from_a_trusted_proxy(hooks: Hooks) -> None:
    rule = make_rule(hooks, networks=["192.0.2.0/24"], trusted_proxies=["10.0.0.0/8"])
    assert rule.check(request("10.0.0.1", "192.0.2.44")) is None
    assert_forbidden(rule.check(request("10.0.0.1", "203.0.113.5")), "203.0.113.5")
    # Without the header, the proxy itself is the client (health checks and such).
    assert_forbidden(rule.check(request("10.0.0.1")), "10.0.0.1")


def test_forwarded_for_is_walked_from_the_right_skipping_trusted_proxies(hooks: Hooks) -> None:
    rule = make_rule(hooks, networks=["192.0.2.0/24"], trusted_proxies=["10.0.0.0/8", "fd00::/8"])
    # The client put an allowed address on the left itself: the first untrusted one from the right wins.
    assert_forbidden(rule.check(request("10.0.0.1", "192.0.2.1, 203.0.113.5, 10.0.0.2")), "203.0.113.5")
    assert rule.check(request("10.0.0.1", "203.0.113.5, 192.0.2.1, 10.0.0.2, fd00::7")) is None
    # Several headers are one list, in order.
    assert rule.check(request("10.0.0.1", "203.0.113.5", "192.0.2.1", "10.0.0.2")) is None
    assert_forbidden(rule.check(request("10.0.0.1", "192.0.2.1", "203.0.113.5", "10.0.0.2")))
    # Every hop trusted: the leftmost one is the client.
    assert_forbidden(rule.check(request("10.0.0.1", "10.0.0.3, 10.0.0.2")), "10.0.0.3")


def test_forwarded_for_with_ipv6_and_mapped_addresses(hooks: Hooks) -> None:
    rule = make_rule(hooks, networks=["2001:db8::/32", "192.0.2.0/24"], trusted_proxies=["::1", "127.0.0.1"])
    assert rule.check(request("::1", "2001:db8::5")) is None
    assert rule.check(request("::ffff:127.0.0.1", "::ffff:192.0.2.3")) is None
    assert rule.check(request("::1", "2001:db8::5 ,  127.0.0.1")) is None  # spaces around hops
    assert_forbidden(rule.check(request("::1", "2001:db9::5")), "2001:db9::5")


def test_empty_list_elements_are_ignored(hooks: Hooks) -> None:
    rule = make_rule(hooks, networks=["192.0.2.0/24"], trusted_proxies=["10.0.0.0/8"])
    assert rule.check(request("10.0.0.1", ",192.0.2.1,,  ,")) is None
    assert_forbidden(rule.check(request("10.0.0.1", "")), "10.0.0.1")


@pytest.mark.parametrize(
    "forwarded",
    [
        "unknown",
        "192.0.2.1:443",  # ports are not addresses
        "[2001:db8::1]",
        "192.0.2.1/32",
        "_hidden",
        "192.0.2.1 192.0.2.2",
        "192.0.2.01\x00",
        "192.0.2.1, garbage",  # garbage to the right of the real client
        "for=192.0.2.1",  # the Forwarded header's syntax
        "☃",
        "1" * 10_000,
    ],
)
def test_garbage_in_forwarded_for_from_a_trusted_proxy_is_forbidden(hooks: Hooks, forwarded: str) -> None:
    rule = make_rule(hooks, networks=["0.0.0.0/0", "::/0"], trusted_proxies=["10.0.0.0/8"])
    assert_forbidden(rule.check(request("10.0.0.1", forwarded)), "malformed")


def test_garbage_left_of_the_client_is_never_read(hooks: Hooks) -> None:
    rule = make_rule(hooks, networks=["192.0.2.0/24"], trusted_proxies=["10.0.0.0/8"])
    assert rule.check(request("10.0.0.1", "garbage, 192.0.2.1, 10.0.0.9")) is None


# --- config ------------------------------------------------------------------------------------


def config_error(hooks: Hooks, rule: str) -> ConfigError:
    return load_error(hooks, nested("sources:\n  acme:\n    auth:\n      - type: ip_allow\n", rule, 8))


@pytest.mark.parametrize(
    ("rule", "where", "message"),
    [
        ("networks: [10.0.0.0/8, bogus]\n", "x.yaml:5: $.sources.acme.auth[0].networks[1]", '"bogus"'),
        (
            "networks:\n  - 10.0.0.0/8\n  - 10.0.0.1/8\n",
            "x.yaml:7: $.sources.acme.auth[0].networks[1]",
            "did you mean 10.0.0.0/8?",
        ),
        ("networks: [10.0.0.0/33]\n", "x.yaml:5: $.sources.acme.auth[0].networks[0]", '"10.0.0.0/33"'),
        ("networks: ['2001:db8::/129']\n", "x.yaml:5: $.sources.acme.auth[0].networks[0]", "2001:db8::/129"),
        ("networks: ['2001:db8::1/32']\n", "x.yaml:5: $.sources.acme.auth[0].networks[0]", "2001:db8::/32?"),
        (
            "networks: ['::/0']\ntrusted_proxies: [10.0.0.0/8, 300.1.1.1]\n",
            "x.yaml:6: $.sources.acme.auth[0].trusted_proxies[1]",
            '"300.1.1.1"',
        ),
        ("networks: []\n", "x.yaml:5: $.sources.acme.auth[0].networks", "length >= 1"),
        (
            "trusted_proxies: [10.0.0.0/8]\n",
            "x.yaml:4: $.sources.acme.auth[0]",
            'missing required key "networks"',
        ),
        ("networks: 10.0.0.0/8\n", "x.yaml:5: $.sources.acme.auth[0].networks", "expected a list"),
        (
            "networks: [10.0.0.0/8]\nnetwork: ['::/0']\n",
            "x.yaml:6: $.sources.acme.auth[0].network",
            "unknown key",
        ),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, rule: str, where: str, message: str
) -> None:
    assert_problem(config_error(hooks, rule), where, message, ignore_case=False)


# --- through the gateway -----------------------------------------------------------------------


async def test_gateway_allows_by_peer_and_by_forwarded_for_from_a_trusted_proxy(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with trio.fail_after(30):
        async with receiver() as rx:
            text = sources_config(
                nats_server.url,
                rx.url,
                """
                direct:
                  auth: [{type: ip_allow, networks: [127.0.0.0/8, "::1"]}]
                elsewhere:
                  auth: [{type: ip_allow, networks: [192.0.2.0/24]}]
                proxied:
                  auth: [{type: ip_allow, networks: [192.0.2.0/24], trusted_proxies: [127.0.0.1/32]}]
                """,
            )
            async with run_gateway(tmp_path, text) as gw:

                async def post(source: str, body: bytes, forwarded: str | None = None) -> Any:
                    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
                    return await gw.http.post(f"{gw.url}/webhooks/{source}", content=body, headers=headers)

                direct = await post("direct", b"1", forwarded="203.0.113.1")
                elsewhere = await post("elsewhere", b"2")
                spoofed = await post("elsewhere", b"3", forwarded="192.0.2.1")
                proxied = await post("proxied", b"4", forwarded="203.0.113.1, 192.0.2.8")
                proxy_itself = await post("proxied", b"5")
                proxied_outsider = await post("proxied", b"6", forwarded="192.0.2.8, 203.0.113.1")
                proxied_garbage = await post("proxied", b"7", forwarded="192.0.2.8, nonsense")
                got = await rx.wait_for(2)
    assert direct.status_code == 202
    assert proxied.status_code == 202
    assert sorted(r.body for r in got) == [b"1", b"4"]
    for refused in (elsewhere, spoofed, proxy_itself, proxied_outsider, proxied_garbage):
        assert_http_error(refused, 403, "forbidden")
    assert "127.0.0.1" in spoofed.json()["message"]
    assert "203.0.113.1" in proxied_outsider.json()["message"]
    assert len(await stream_messages(nats_server.url, "HOOKGATE_EVENTS")) == 2
    assert len(rx.requests) == 2
