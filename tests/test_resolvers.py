"""Finding the node in charge on real topologies: Sentinel discovery (sync and asyncio),
cluster detection from any node, and the errors for what cannot work."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from nearcache._backplane.cluster import alocate, locate
from nearcache._backplane.sentinel import AsyncSentinelResolver, SentinelResolver
from nearcache._config import Endpoint, parse_connection_string
from nearcache._core.topology import Placement, ServerTraits, key_slot
from nearcache._exceptions import BackplaneUnavailableError, ConfigurationError
from tests.servers import HOST, RedisServer, TcpProxy, free_port, wait_until
from tests.topologies import SENTINEL_HOST, ClusterTopology, SentinelTopology, freeze, thaw

CHANNEL = "nearcache:v1:resolvers"


def _node(topology: SentinelTopology, node: RedisServer) -> Endpoint:
    return Endpoint(*topology.address(node))


# -- Sentinel --------------------------------------------------------------------------------


def test_sentinel_discovery_names_the_primary(sentinel_set: SentinelTopology) -> None:
    """The majority's primary is found, with the Sentinel password, and placed there."""
    settings = parse_connection_string(sentinel_set.connection_string())
    resolver = SentinelResolver(settings)
    try:
        claim = resolver.primary()
        assert claim.endpoint == _node(sentinel_set, sentinel_set.primary())
        placement = locate(settings, CHANNEL, resolver)
        assert placement.endpoint == claim.endpoint and placement.claim == claim
        assert placement.channel == CHANNEL and not placement.sharded
    finally:
        resolver.close()


def test_async_sentinel_discovery_names_the_primary(sentinel_set: SentinelTopology) -> None:
    """The asyncio resolver finds the same primary."""
    settings = parse_connection_string(sentinel_set.connection_string())

    async def main() -> Placement:
        resolver = AsyncSentinelResolver(settings)
        try:
            return await alocate(settings, CHANNEL, resolver)
        finally:
            await resolver.aclose()

    placement = asyncio.run(main())
    assert placement.endpoint == _node(sentinel_set, sentinel_set.primary())


def test_a_dead_sentinel_listed_first_is_asked_once(
    sentinel_set: SentinelTopology, tcp_proxy: Callable[[int], TcpProxy]
) -> None:
    """A refusing Sentinel listed first is tried once, never retried, and discovery still
    succeeds through the others."""
    dead = tcp_proxy(free_port())
    dead.refuse()
    text = sentinel_set.connection_string().replace(
        f"{SENTINEL_HOST}:{sentinel_set.sentinels[0].port}", f"{HOST}:{dead.port}"
    )
    resolver = SentinelResolver(parse_connection_string(text))
    try:
        claim = resolver.primary()
        assert claim.endpoint == _node(sentinel_set, sentinel_set.primary())
        resolver.wait(lambda: resolver.errors[0] is not None, 5.0)
        assert resolver.errors[0] is not None and dead.accepted == 1
    finally:
        resolver.close()


def test_unknown_service_name_is_a_configuration_error(sentinel_set: SentinelTopology) -> None:
    """A service the Sentinels do not know is refused naming serviceName."""
    text = sentinel_set.connection_string().replace("serviceName=mymaster", "serviceName=nope")
    resolver = SentinelResolver(parse_connection_string(text))
    try:
        with pytest.raises(ConfigurationError, match="'nope'") as info:
            resolver.primary()
        assert info.value.option == "serviceName"
    finally:
        resolver.close()


def test_unreachable_sentinels_are_reported_without_the_password() -> None:
    """No Sentinel answering: BackplaneUnavailableError naming each, never the password."""
    text = f"{HOST}:{free_port()},{HOST}:{free_port()},serviceName=m,password=Hunter2-secret"
    resolver = SentinelResolver(parse_connection_string(text))
    try:
        with pytest.raises(BackplaneUnavailableError, match="no majority of the 2") as info:
            resolver.primary()
        assert "Hunter2" not in str(info.value) and "ConnectionError" in str(info.value)
    finally:
        resolver.close()


def test_a_wrong_sentinel_password_is_reported(sentinel_set: SentinelTopology) -> None:
    """Sentinels refusing the credentials: a clear error, no crash, no password."""
    text = sentinel_set.connection_string().replace(
        sentinel_set.sentinel_password or "", "wrong-sentinel-pass"
    )
    resolver = SentinelResolver(parse_connection_string(text))
    try:
        with pytest.raises(BackplaneUnavailableError) as info:
            resolver.primary(timeout=2.0)
        assert "wrong-sentinel-pass" not in str(info.value)
    finally:
        resolver.close()


def test_after_a_failover_the_old_claim_is_no_longer_confirmed(
    sentinel_set: SentinelTopology,
) -> None:
    """After SENTINEL FAILOVER a majority names the new primary, the old claim's
    confirmation stops advancing, and +switch-master reaches the watcher."""
    settings = parse_connection_string(sentinel_set.connection_string())
    resolver = SentinelResolver(settings)
    switched = threading.Event()
    try:
        old = resolver.primary()
        resolver.watch(lambda _new: switched.set())
        after = resolver.ask()
        assert resolver.confirm(old, after, timeout=5.0)
        wait_until(lambda: sum(e is None for e in resolver.errors) == 3, 5)
        # The watchers' SUBSCRIBE is sent before the switch (it is announced once).
        wait_until(lambda: resolver.watching == 3, 5)
        new_node = sentinel_set.failover()
        assert switched.wait(10)
        new = resolver.primary()
        assert new.endpoint == _node(sentinel_set, new_node) and new.epoch > old.epoch
        later = resolver.ask()
        assert not resolver.confirm(old, later, timeout=5.0)
        assert resolver.confirm(new, later, timeout=5.0)
    finally:
        resolver.close()


def test_async_confirmation_follows_the_failover(sentinel_set: SentinelTopology) -> None:
    """The asyncio resolver stops confirming the old primary after a failover."""
    settings = parse_connection_string(sentinel_set.connection_string())

    async def main() -> None:
        resolver = AsyncSentinelResolver(settings)
        switched = asyncio.Event()
        try:
            old = await resolver.primary()
            resolver.watch(lambda _new: switched.set())
            assert await resolver.confirm(old, resolver.ask(), timeout=5.0)
            # The watchers' SUBSCRIBE is sent before the switch (it is announced once).
            deadline = asyncio.get_running_loop().time() + 5
            while resolver.watching < 3:
                assert asyncio.get_running_loop().time() < deadline, resolver.watching
                await asyncio.sleep(0.01)  # a poll that lets the watch tasks run
            await asyncio.to_thread(sentinel_set.failover)
            await asyncio.wait_for(switched.wait(), 10)
            later = resolver.ask()
            assert not await resolver.confirm(old, later, timeout=5.0)
            assert (await resolver.primary()).epoch > old.epoch
        finally:
            await resolver.aclose()

    asyncio.run(main())


def test_async_wait_sees_an_answer_landing_before_it_starts_waiting(
    sentinel_set: SentinelTopology,
) -> None:
    """An answer recorded after wait() checked its condition, but before its wait began,
    wakes it at once. (It was lost: under CPU load the second answer of a round landed just
    there, and the start of an AsyncNearCache waited out its whole connect timeout with a
    majority in hand: "could not subscribe ... within 5.0s (no answer)".) The Sentinels are
    frozen, so only that one answer can wake the waiter."""
    settings = parse_connection_string(sentinel_set.connection_string())

    async def main() -> tuple[bool, list[bool]]:
        resolver = AsyncSentinelResolver(settings)
        loop = asyncio.get_running_loop()
        try:
            claim = await resolver.primary()
            for sentinel in sentinel_set.sentinels:
                freeze(sentinel)
            since = resolver.ask()  # questions outstanding: wait() waits
            checks = 0

            def majority() -> bool:
                nonlocal checks
                checks += 1
                if checks == 1:
                    # Runs after this check returns and before the waiter's task starts.
                    for index in range(2):
                        loop.call_soon(resolver._answered_by, index, loop.time(), claim, None)
                return resolver.quorum.primary(since) == claim

            woke = await resolver.wait(majority, timeout=30.0)
            # Woken by that answer, not by a frozen question failing at its socket timeout.
            return woke, [task is not None and task.done() for task in resolver._asking]
        finally:
            for sentinel in sentinel_set.sentinels:
                thaw(sentinel)
            await resolver.aclose()

    woke, questions_done = asyncio.run(main())
    assert woke and questions_done == [False, False, False]


def test_standalone_endpoints_skip_a_replica(sentinel_set: SentinelTopology) -> None:
    """Without serviceName, endpoints are tried in order and a replica is skipped."""
    primary, replica = sentinel_set.primary(), sentinel_set.replica()
    text = (
        f"{HOST}:{free_port()},{HOST}:{replica.port},{HOST}:{primary.port},"
        f"password={sentinel_set.password}"
    )
    placement = locate(parse_connection_string(text), CHANNEL)
    assert placement.endpoint == Endpoint(HOST, primary.port)


def test_a_sentinel_named_as_a_server_is_refused(sentinel_set: SentinelTopology) -> None:
    """Pointing at a Sentinel without serviceName is a configuration error naming it."""
    sentinel = sentinel_set.sentinels[0]
    text = f"{SENTINEL_HOST}:{sentinel.port},password={sentinel_set.sentinel_password}"
    with pytest.raises(ConfigurationError, match="is a Sentinel") as info:
        locate(parse_connection_string(text), CHANNEL)
    assert info.value.option == "serviceName"


def test_only_replicas_is_reported(sentinel_set: SentinelTopology) -> None:
    """Endpoints that are all replicas: no primary, a clear reason per endpoint."""
    replica = sentinel_set.replica()
    text = f"{HOST}:{replica.port},password={sentinel_set.password}"
    with pytest.raises(BackplaneUnavailableError, match="a replica"):
        locate(parse_connection_string(text), CHANNEL)


# -- Cluster ---------------------------------------------------------------------------------


def test_cluster_is_detected_from_any_node(redis_cluster: ClusterTopology) -> None:
    """From any node the channel is tagged and placed on its slot's primary (sync and
    asyncio)."""
    for node in redis_cluster.nodes:
        settings = parse_connection_string(redis_cluster.connection_string(node))
        placement = locate(settings, CHANNEL)
        assert placement.sharded and placement.channel == "{" + CHANNEL + "}"
        assert placement.slot == key_slot(placement.channel)
        owner = redis_cluster.owner(placement.slot)
        assert placement.endpoint == Endpoint(*redis_cluster.address(owner))
        assert asyncio.run(alocate(settings, CHANNEL)) == placement


def test_cluster_placement_follows_a_slot_move(redis_cluster: ClusterTopology) -> None:
    """After the channel's slot moves, locating again names the new owner."""
    settings = parse_connection_string(redis_cluster.connection_string())
    before = locate(settings, CHANNEL)
    assert before.slot is not None
    new = redis_cluster.move_slot(before.slot)
    after = locate(settings, CHANNEL)
    assert after.endpoint == Endpoint(*redis_cluster.address(new)) != before.endpoint


@pytest.mark.parametrize(
    ("channel", "option", "extra"),
    [("nearcache:v1:{x}", "channel", ""), (CHANNEL, "defaultDatabase", ",defaultDatabase=2")],
)
def test_cluster_refusals_name_the_setting(
    redis_cluster: ClusterTopology, channel: str, option: str, extra: str
) -> None:
    """On a cluster, a braced channel and a database other than 0 are refused clearly."""
    settings = parse_connection_string(redis_cluster.connection_string() + extra)
    with pytest.raises(ConfigurationError) as info:
        locate(settings, channel)
    assert info.value.option == option


def test_cluster_on_redis_before_7_is_refused() -> None:
    """A cluster node older than Redis 7 (no sharded Pub/Sub) is refused naming it."""
    from nearcache._backplane.cluster import _decide

    settings = parse_connection_string("h:7000")
    old = ServerTraits((6, 2, 14), "cluster", "master")
    with pytest.raises(ConfigurationError, match=r"Redis 6\.2\.14.*7\.0"):
        _decide(settings, CHANNEL, settings.endpoints[0], old, [])
