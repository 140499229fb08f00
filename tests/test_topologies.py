"""The Sentinel and Cluster fixtures (tests/topologies.py) and the Redis behaviour nearcache
relies on, checked on real servers: what each fault does, seen from a plain client."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import redis

from tests.servers import HOST, RedisServer, TcpProxy, wait_until
from tests.topologies import SENTINEL_HOST, ClusterTopology, SentinelTopology, key_slot


def test_key_slot_matches_the_server(redis_cluster: ClusterTopology) -> None:
    """key_slot agrees with CLUSTER KEYSLOT, hash tags included."""
    with redis_cluster.node_client(redis_cluster.nodes[0]) as client:
        for key in ("a", "{user1000}.following", "{}x", "{a}{b}", "x{y", "nearcache:v1:{ch}:log"):
            assert key_slot(key) == client.cluster("KEYSLOT", key), key


def _ping_from(source: str, port: int) -> bytes:
    """Send PING from ``source`` (a loopback address) and return what comes back."""
    try:
        with socket.create_connection((HOST, port), 2, source_address=(source, 0)) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(100)
    except ConnectionResetError:
        return b""


def test_proxy_isolates_one_source_address(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy]
) -> None:
    """TcpProxy.isolate resets and refuses connections from one source address only."""
    proxy = tcp_proxy(redis_server.port)
    with socket.create_connection((HOST, proxy.port), source_address=(SENTINEL_HOST, 0)) as held:
        held.sendall(b"PING\r\n")
        assert held.recv(100) == b"+PONG\r\n"
        proxy.isolate(SENTINEL_HOST)
        with pytest.raises(ConnectionResetError):
            held.sendall(b"PING\r\n")
            if not held.recv(100):
                raise ConnectionResetError
    assert _ping_from(SENTINEL_HOST, proxy.port) == b""
    assert _ping_from(HOST, proxy.port) == b"+PONG\r\n"
    proxy.rejoin(SENTINEL_HOST)
    assert _ping_from(SENTINEL_HOST, proxy.port) == b"+PONG\r\n"


# -- Sentinel --------------------------------------------------------------------------------


def test_sentinel_failover_leaves_the_old_primary_writable(sentinel_set: SentinelTopology) -> None:
    """After SENTINEL FAILOVER every sentinel names the replica, while the old primary still
    says role:master and accepts writes (why a pong alone proves nothing on Sentinel)."""
    old = sentinel_set.primary()
    new = sentinel_set.failover()
    assert new is not old
    assert sentinel_set.role(new) == "master"
    with sentinel_set.node_client(old) as client:
        if client.info("replication")["role"] == "master":  # sentinel converts it ~10 s later
            assert client.set("still-writable", "1")


def test_sentinel_kill_of_the_primary_fails_over(sentinel_set: SentinelTopology) -> None:
    """kill -9 of the primary: the sentinels promote the replica."""
    old = sentinel_set.kill_primary()
    new = sentinel_set.wait_switched(old)
    assert new is not old and sentinel_set.role(new) == "master"


def test_primary_cut_off_from_the_sentinels_stays_reachable(
    sentinel_set: SentinelTopology,
) -> None:
    """Cut from the sentinels only, the primary is replaced while clients still reach it and
    it still answers as a master."""
    old = sentinel_set.cut_primary_from_sentinels()
    new = sentinel_set.wait_switched(old)
    assert new is not old
    with redis.Redis(host=HOST, port=sentinel_set.address(old)[1], password=old.password) as c:
        assert c.ping()
        assert c.info("replication")["role"] == "master"


# -- Cluster ---------------------------------------------------------------------------------


def test_cluster_slot_move_pushes_sunsubscribe(redis_cluster: ClusterTopology) -> None:
    """Moving a channel's slot pushes sunsubscribe to the old owner's shard subscribers,
    and the keys of the slot move with it."""
    channel = "{topology-test}"
    slot = key_slot(channel)
    owner = redis_cluster.owner(slot)
    with redis_cluster.node_client(owner) as setter:
        setter.set("{topology-test}:k", "v")
    with redis_cluster.node_client(owner) as client:
        pubsub = client.pubsub()
        pubsub.ssubscribe(channel)
        assert wait_until(lambda: pubsub.get_message(timeout=0.1), 5)["type"] == "ssubscribe"
        new = redis_cluster.move_slot(slot)
        assert new is not owner
        message = wait_until(lambda: pubsub.get_message(timeout=0.1), 5)
        assert message["type"] == "sunsubscribe"
        pubsub.close()
    assert redis_cluster.owner(slot) is new
    with redis_cluster.node_client(new) as client:
        assert client.get("{topology-test}:k") == b"v"


def test_cluster_kill_of_a_slot_owner_promotes_its_replica(
    redis_cluster: ClusterTopology,
) -> None:
    """kill -9 of a slot's owner: its replica takes the slot over."""
    slot = key_slot("{topology-kill}")
    owner = redis_cluster.owner(slot)
    replica = redis_cluster.replica_of(owner)
    redis_cluster.kill(owner)
    assert redis_cluster.wait_owner_changed(slot, owner) is replica


def test_cluster_minority_primary_answers_ping_and_spublish_but_refuses_writes(
    redis_cluster: ClusterTopology,
) -> None:
    """A primary alone in a minority reports cluster_state:fail and refuses keyed commands
    (CLUSTERDOWN) while it still answers PING and SPUBLISH."""
    slot = key_slot("{topology-minority}")
    owner = redis_cluster.owner(slot)
    redis_cluster.isolate_minority(owner)
    wait_until(lambda: redis_cluster.cluster_state(owner) == "fail", 10)
    with redis_cluster.node_client(owner) as client:
        assert client.ping()
        client.execute_command("SPUBLISH", "{topology-minority}", "x")
        with pytest.raises(redis.exceptions.ClusterDownError):  # -CLUSTERDOWN
            client.set("{topology-minority}:k", "v")
