"""``--scheduler-sentinels`` and ``--scheduler-sentinel-master``: validation, the client they
build, and how errors on the Sentinel path are sorted (no server: nothing connects)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import redis.exceptions as rex
from redis.asyncio.sentinel import MasterNotFoundError, SentinelConnectionPool

from p2psched.core.config import SchedulerConfig
from p2psched.core.errors import ConfigError, RegistryUnavailable
from p2psched.registry import access_error, connect

SENTINELS = "10.0.0.1:26379,sentinel-b:26380,[fd00::3]:26381"


def test_sentinel_addresses_are_parsed_ipv6_without_brackets():
    cfg = SchedulerConfig(sentinels=f" {SENTINELS.replace(',', ', ')} ")
    assert (("10.0.0.1", 26379), ("sentinel-b", 26380), ("fd00::3", 26381)) == cfg.sentinel_addresses
    assert () == SchedulerConfig().sentinel_addresses
    assert "mymaster" == SchedulerConfig().sentinel_master


@pytest.mark.parametrize("sentinels, message", [
    ("s1", "'s1' must be host:port with a port in 1..65535"),
    ("s1:0", "'s1:0' must be host:port"),
    ("s1:65536", "'s1:65536' must be host:port"),
    ("s1:x", "'s1:x' must be host:port"),
    (":26379", "':26379' must be host:port"),
    ("s1:26379,,s2:26379", "have an empty entry"),
    ("s1:26379,", "have an empty entry"),
    ("fd00::3:26379", "write an IPv6 address as \\[addr\\]:port"),
    ("[s1]:26379", "brackets are for IPv6 addresses"),
    ("s1:26379,s1:26379", "'s1:26379' is given twice"),
])
def test_bad_sentinel_lists_are_rejected_in_one_line(sentinels, message):
    with pytest.raises(ConfigError, match=message) as caught:
        SchedulerConfig(sentinels=sentinels)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["", "my master", "x" * 129, "tab\there"])
def test_bad_sentinel_master_names_are_rejected(name):
    with pytest.raises(ConfigError, match="scheduler sentinel master must be a name"):
        dataclasses.replace(SchedulerConfig(), sentinel_master=name)


def test_connect_builds_a_fail_fast_client_of_the_named_master():
    """The master's connections get the login, the database and no retries; the sentinels the
    same timeouts and no login (p2psched sends sentinels none)."""
    cfg = SchedulerConfig(sentinels=SENTINELS, sentinel_master="reg", db=3, username="p2p", password="s3cret")

    async def scenario() -> None:
        client = connect(cfg, timeout=0.25)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.is_master and "reg" == pool.service_name
        kwargs = pool.connection_kwargs
        assert (3, "p2p", "s3cret") == (kwargs["db"], kwargs["username"], kwargs["password"])
        assert 0.25 == kwargs["socket_timeout"] == kwargs["socket_connect_timeout"]
        assert 0 == kwargs["retry"].get_retries()
        manager = pool.sentinel_manager
        assert [("10.0.0.1", 26379), ("sentinel-b", 26380), ("fd00::3", 26381)] == [
            (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in manager.sentinels]
        sentinel_kwargs = manager.sentinels[0].connection_pool.connection_kwargs
        assert sentinel_kwargs.get("password") is None and 0.25 == sentinel_kwargs["socket_timeout"]
        assert 0 == sentinel_kwargs["retry"].get_retries()
        await client.aclose()
        await manager.aclose()

    asyncio.run(scenario())


def test_sentinel_errors_are_outages_and_messages_name_the_sentinels():
    """No live master, and READONLY from a master that a failover demoted (inside the heartbeat
    script it is a plain ResponseError), pass: they are outages under Sentinel. Without
    Sentinel READONLY means Redis is a replica: a configuration to fix."""
    cfg = SchedulerConfig(sentinels=SENTINELS, sentinel_master="reg")
    readonly = [rex.ReadOnlyError("You can't write against a read only replica."),
                rex.ResponseError("Error running script (call to f_ae34): @user_script:1: @user_script: 1: "
                                  "-READONLY You can't write against a read only replica.")]
    no_master = access_error(MasterNotFoundError("No master found for 'reg' : <long reprs>"), cfg)
    assert isinstance(no_master, RegistryUnavailable)
    assert f"no sentinel of {SENTINELS} named a live master 'reg'" in str(no_master)
    for exc in readonly:
        demoted = access_error(exc, cfg)
        assert isinstance(demoted, RegistryUnavailable), exc
        assert f"Redis master 'reg' of the sentinels {SENTINELS} was demoted by a failover" in str(demoted)
        assert isinstance(access_error(exc, SchedulerConfig()), ConfigError)
    refused = access_error(rex.AuthenticationError("WRONGPASS invalid username-password pair"), cfg)
    assert isinstance(refused, ConfigError)
    assert str(refused).startswith(f"Redis master 'reg' of the sentinels {SENTINELS} refused")
    not_a_sentinel = access_error(rex.ResponseError("unknown command `SENTINEL`, with args beginning with: "
                                                    "`masters`, "), cfg)
    assert isinstance(not_a_sentinel, ConfigError) and "is a Redis, not a sentinel" in str(not_a_sentinel)
