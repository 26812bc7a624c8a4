"""The address a node advertises, and the warning when other hosts could not reach it."""

from __future__ import annotations

import pytest

from p2psched.addresses import advertised_host, is_loopback, route_source
from p2psched.core.config import NodeConfig, SchedulerConfig


def node(host: str = "0.0.0.0", advertise: str = "", redis: str = "127.0.0.1", name: str = "global") -> NodeConfig:
    return NodeConfig(host=host, advertise_host=advertise, scheduler=SchedulerConfig(name=name, host=redis))  # type: ignore[arg-type]


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("10.0.0.5", False), ("0.0.0.0", False), ("::", False), ("no-such-host.invalid", False),
])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_the_route_to_a_loopback_redis_starts_at_loopback():
    assert route_source("127.0.0.1", 6379) == "127.0.0.1"
    assert route_source("no-such-host.invalid", 6379) is None


def test_a_wildcard_bind_advertises_the_address_that_routes_to_redis():
    assert advertised_host(node()).host == "127.0.0.1"  # Redis on this host: loopback is right
    assert advertised_host(node()).warning == ""
    assert advertised_host(node(name="local", redis="10.9.9.9")).host == "127.0.0.1"  # no registry: nobody dials it


def test_an_explicit_address_wins():
    assert advertised_host(node(advertise="10.0.0.7", redis="10.0.0.1")) == advertised_host(node(host="10.0.0.7"))
    assert advertised_host(node(host="10.0.0.7", advertise="node7.internal")).host == "node7.internal"


@pytest.mark.parametrize("config, source", [
    (node(host="127.0.0.1", redis="10.0.0.1"), "--host"),
    (node(advertise="127.0.0.1", redis="10.0.0.1"), "--advertise-host"),
])
def test_loopback_into_a_remote_redis_is_warned_about(config, source):
    advertised = advertised_host(config)
    assert advertised.host == "127.0.0.1"
    assert f"from {source}" in advertised.warning and "10.0.0.1" in advertised.warning
    assert "other hosts cannot" in advertised.warning


def test_loopback_is_fine_for_a_local_node_or_a_local_redis():
    assert advertised_host(node(host="127.0.0.1", redis="10.0.0.1", name="local")).warning == ""
    assert advertised_host(node(host="127.0.0.1", redis="localhost")).warning == ""


def test_an_ipv6_address_is_advertised_in_brackets():
    assert advertised_host(node(advertise="fd00::7", redis="fd00::1")).host == "[fd00::7]"
    assert advertised_host(node(host="[fd00::7]")).host == "[fd00::7]"
    loopback = advertised_host(node(host="::1", redis="fd00::1"))
    assert loopback.host == "[::1]" and "cannot" in loopback.warning
