"""A real network partition of one Redis Cluster primary, with the L2 on (both drivers).

The cluster here is its own (``ClusterTopology(bus_proxied=True)``): every node has a loopback
address of its own and its cluster bus behind a :class:`~tests.servers.TcpProxy`, so one
node's bus can be cut off from the others while its clients still reach it. A primary cut off
that way is the minority case no frozen or killed node shows: it is alive, reports
``cluster_state:fail`` and answers ``CLUSTERDOWN`` to every keyed command, still names
itself for its slots in ``CLUSTER SLOTS``, while the majority fails its slots over to its
replica.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nearcache._core import l2
from nearcache._core.codec import channel_name
from nearcache._core.topology import key_slot
from tests.servers import RedisServer, wait_until
from tests.test_conformance import Driver
from tests.test_l2_topologies import TopologyFleet
from tests.topologies import ClusterTopology

STALENESS = 1.0
FLUSH_TIMEOUT = 10.0  # generous for 2 loaded cores; the fixed code needs a few retries at most


@pytest.fixture
def partitionable_cluster(tmp_path: Path, redis_binary: str) -> Iterator[ClusterTopology]:
    topology = ClusterTopology(tmp_path / "cluster", binary=redis_binary, bus_proxied=True)
    with topology:
        yield topology


@pytest.fixture
def drivers() -> Iterator[tuple[Driver, Driver]]:
    pair = (Driver("sync"), Driver("async"))
    yield pair
    for driver in pair:
        driver.stop()


def _channel_off_the_first_node(cluster: ClusterTopology, channel: str) -> tuple[str, int]:
    """A channel (and its slot) whose primary is not the connection string's first node: that
    node stays in the majority, so whoever asks it learns where the slot went."""
    for i in range(100):
        name = f"{channel}-{i}"
        slot = key_slot("{" + channel_name(name) + "}")
        if cluster.owner(slot) is not cluster.nodes[0]:
            return name, slot
    raise AssertionError("every channel tried lives on the first node")


def _keys_on(cluster: ClusterTopology, wire: str, node: RedisServer, prefix: str) -> str:
    """A key whose L2 value lives on ``node`` too: a write's prepare and commit (one pipeline
    per node) go there as well as its publish."""
    for i in range(500):
        key = f"{prefix}{i}"
        if cluster.owner(key_slot(l2.value_keys(wire, None, key)[0])) is node:
            return key
    raise AssertionError(f"no key of {wire} found on {node!r}")


def _failed_over(cluster: ClusterTopology, slot: int, old: RedisServer, new: RedisServer) -> bool:
    """The cut-off primary reports cluster_state:fail, and every other primary is ok and
    names its former replica as the slot's owner."""
    if cluster.cluster_state(old) != "fail":
        return False
    majority = [node for node in cluster.nodes[: ClusterTopology.PRIMARIES] if node is not old]
    return all(
        cluster.cluster_state(node) == "ok" and cluster.owner(slot, node) is new
        for node in majority
    )


def test_l2_writes_and_reads_leave_a_primary_cut_off_in_a_minority(
    partitionable_cluster: ClusterTopology, drivers: tuple[Driver, Driver], channel: str
) -> None:
    """A threaded and an asyncio instance with the L2 wrote and read through the primary of
    the channel's slot (their values' slots too); its cluster bus is cut off and the majority
    promotes its replica, while it keeps answering ``CLUSTERDOWN``. A write on either instance
    must then be published where the slots live now: ``flush()`` returns (before the fix the
    routers kept their slot map, every publish went to the cut-off node until the partition
    healed, and ``flush()`` timed out), and the other instance reads the new value from the
    L2 through the new owner (its read router leaves the cut-off node as well)."""
    cluster = partitionable_cluster
    name, slot = _channel_off_the_first_node(cluster, channel)
    owner = cluster.owner(slot)
    replica = cluster.replica_of(owner)
    connection = cluster.connection_string()
    sync, aio = (TopologyFleet(driver, cluster, name) for driver in drivers)
    try:
        # Invalidations, not updates: the reader's next get is an L2 read, every time.
        a = sync.make(connection, propagate="invalidate", max_staleness=STALENESS)
        b = aio.make(connection, propagate="invalidate", max_staleness=STALENESS)
        a_key, b_key = (_keys_on(cluster, sync.wire, owner, p) for p in ("a", "b"))
        source = {a_key: "v1", b_key: "w1"}
        loads: list[str] = []  # keys the source was asked for: an L2 read failed

        def load(key: str) -> Any:
            return lambda: loads.append(key) or source[key]

        def prime(*caches: Any) -> None:
            """A log entry every cache has applied: a write then has a position to be
            checked from (on a brand-new channel, or from a former reign, it would store
            no value)."""
            before = [cache._backplane.log_position() for cache in caches]
            sync.run(a.remove("__prime__"))
            sync.run(a.flush(timeout=FLUSH_TIMEOUT))
            for cache, old in zip(caches, before, strict=True):
                wait_until(lambda c=cache, o=old: c._backplane.log_position() not in (None, o), 10)

        prime(a, b)
        # Each instance writes (a pipeline per node for the value, a script for the publish)
        # and reads the other's value from L2 (scripts on the channel's and the value's
        # slots), so all four routers hold the slot map naming the channel's primary.
        sync.run(a.set(a_key, "v1"))
        sync.run(a.flush())
        aio.run(b.set(b_key, "w1"))
        aio.run(b.flush())
        assert aio.run(b.get_or_set(a_key, load(a_key))) == "v1"
        assert sync.run(a.get_or_set(b_key, load(b_key))) == "w1"
        assert loads == []

        cluster.cut_bus(owner)
        wait_until(
            lambda: _failed_over(cluster, slot, owner, replica),
            30,
            interval=0.05,
            message="the majority to fail the cut-off primary's slots over",
        )

        # Each instance removes a key whose value lives on the cut-off node too, and flushes:
        # its publish must reach the new owner (a pipeline to the value's slot, then a
        # script on the channel's). Before the fix both flushes timed out here.
        sync.run(a.remove(a_key))
        aio.run(b.remove(b_key))
        sync.run(a.flush(timeout=FLUSH_TIMEOUT))
        aio.run(b.flush(timeout=FLUSH_TIMEOUT))
        # Both have applied an entry of the new reign: a write is checked from there and
        # stores its value (from a position of the former reign it would store nothing).
        prime(a, b)
        source[a_key], source[b_key] = "v2", "w2"
        sync.run(a.set(a_key, "v2"))
        aio.run(b.set(b_key, "w2"))
        sync.run(a.flush(timeout=FLUSH_TIMEOUT))
        aio.run(b.flush(timeout=FLUSH_TIMEOUT))
        # The other instance drops its copy (the invalidation, or the bound) and reads the
        # new value from L2, never from the source: the L2 read reached the new owner.
        wait_until(
            lambda: aio.run(b.get_or_set(a_key, load(a_key))) == "v2",
            STALENESS + 5,
            interval=0.05,
            message="the asyncio instance to see v2",
        )
        wait_until(
            lambda: sync.run(a.get_or_set(b_key, load(b_key))) == "w2",
            STALENESS + 5,
            interval=0.05,
            message="the threaded instance to see w2",
        )
        assert loads == []
        # An instance whose connection string names the cut-off node first (every instance
        # of an app has the same string) starts on the new owner: that node's map, which
        # still names itself for the slot, is used only if no other node gives one. Before,
        # it subscribed there again and again, and its start failed (abortConnect).
        others = [node for node in cluster.nodes if node is not owner]
        late = [
            fleet.make(
                cluster.connection_string(owner, *others),
                propagate="invalidate",
                max_staleness=STALENESS,
            )
            for fleet in (sync, aio)
        ]
        for fleet, cache in zip((sync, aio), late, strict=True):
            assert cache.backplane_state.value == "connected"
            assert fleet.run(cache.get_or_set(a_key, load(a_key))) == "v2"  # from L2
        received = [cache.stats().invalidations_received for cache in late]
        sync.run(a.remove(a_key))
        sync.run(a.flush(timeout=FLUSH_TIMEOUT))
        for cache, before in zip(late, received, strict=True):
            wait_until(
                lambda c=cache, b=before: c.stats().invalidations_received > b,
                STALENESS + 5,
                message="a late instance to receive a's invalidation on the new owner",
            )
        assert loads == []
        # Healed, the cut-off node learns that its replica took over and follows it.
        cluster.heal()
        assert cluster.replica_of(replica) is owner
    finally:
        sync.close()
        aio.close()
