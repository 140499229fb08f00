"""The shared L2 and value-carrying updates on Sentinel and on a Redis Cluster (real
topologies from tests/topologies.py, both drivers).

The core cases of ``tests/test_l2_cache.py`` run again here on each topology (hits, fills,
leases, writes, clears, the conflict rule); then the topology's own: on a cluster a value
lives in another slot (and node) than the channel, its slot and the channel's slot move, and
a write is split in steps; with Sentinel the L2 follows the primary through a failover, and a
value on a primary that is no longer in charge is never served past the bound.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from nearcache import MISSING, NearCache
from nearcache._core import l2
from nearcache._core.codec import channel_name
from nearcache._core.topology import key_slot
from tests.servers import TcpProxy, wait_until
from tests.test_conformance import Driver
from tests.test_l2_cache import (
    Fleet,
    test_a_load_overlapping_a_write_reaches_neither_l1_nor_l2,
    test_a_miss_is_loaded_once_and_then_served_from_l2,
    test_a_write_racing_another_instance_never_leaves_the_older_value,
    test_remove_and_clears_reach_l2,
    test_set_writes_l2_and_updates_other_copies,
    test_write_shares_the_value_it_wrote,
)
from tests.test_l2_processes import Process
from tests.topologies import SENTINEL_HOST, ClusterTopology, SentinelTopology

__all__ = [  # the core cases, collected here again on each topology
    "test_a_load_overlapping_a_write_reaches_neither_l1_nor_l2",
    "test_a_miss_is_loaded_once_and_then_served_from_l2",
    "test_a_write_racing_another_instance_never_leaves_the_older_value",
    "test_remove_and_clears_reach_l2",
    "test_set_writes_l2_and_updates_other_copies",
    "test_write_shares_the_value_it_wrote",
]

STALENESS = 1.0


@pytest.fixture(params=["sync", "async"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    d = Driver(request.param)
    yield d
    d.stop()


class TopologyFleet(Fleet):
    """:class:`tests.test_l2_cache.Fleet` on a Sentinel set or a cluster: the caches get the
    topology's connection string, and L2 keys are looked up where they live now."""

    def __init__(
        self, driver: Driver, topology: SentinelTopology | ClusterTopology, channel: str
    ) -> None:
        self.driver = driver
        self.topology = topology
        self.channel = channel
        self.cluster = isinstance(topology, ClusterTopology)
        wire = channel_name(channel)
        self.wire = "{" + wire + "}" if self.cluster else wire
        self.caches: list[Any] = []
        self.connection = topology.connection_string()

    def make(self, url: str | None = None, **kwargs: Any) -> Any:
        return super().make(url or self.connection, **kwargs)

    def node_of(self, key: str) -> Any:
        """The node holding ``key`` now (the cluster's slot owner, or the primary)."""
        topology = self.topology
        if isinstance(topology, ClusterTopology):
            return topology.owner(key_slot(key))
        return topology.primary()

    def get(self, key: str) -> bytes | None:
        with self.topology.node_client(self.node_of(key)) as client:
            return client.get(key)  # type: ignore[no-any-return]

    def in_l2(self, key: Any, region: str | None = None) -> bytes | None:
        """The key's value record if it is reachable now (its tags are the current ones):
        on a cluster a record left with stale tags (a fill racing a clear) is no value."""
        record = self.get(l2.value_keys(self.wire, region, key)[0])
        if record is None or not self.cluster:
            return record
        gen, rgen = l2.generation_keys(self.wire)
        with self.topology.node_client(self.node_of(gen)) as client:
            tokens = client.get(gen), client.hget(rgen, l2.region_field(region))
        tag, region_tag, _ = l2.split_record(record)
        return (
            record
            if tokens[0] and tag.startswith(tokens[0] + b"@") and region_tag == tokens[1]
            else None
        )

    def close(self) -> None:
        for cache in self.caches:
            self.driver.close(cache)


@pytest.fixture(params=["sentinel", "cluster"])
def fleet(driver: Driver, channel: str, request: pytest.FixtureRequest) -> Iterator[TopologyFleet]:
    topology = request.getfixturevalue(
        "sentinel_set" if request.param == "sentinel" else "redis_cluster"
    )
    f = TopologyFleet(driver, topology, channel)
    yield f
    f.close()


@pytest.fixture
def cluster_fleet(
    driver: Driver, channel: str, redis_cluster: ClusterTopology
) -> Iterator[TopologyFleet]:
    f = TopologyFleet(driver, redis_cluster, channel)
    yield f
    f.close()


def _key_elsewhere(fleet: TopologyFleet, region: str | None = None, avoid: Any = None) -> str:
    """A key whose L2 value lives on another node than the channel's slot (and than
    ``avoid``, a node)."""
    topology = fleet.topology
    assert isinstance(topology, ClusterTopology)
    channel_owner = topology.owner(key_slot(fleet.wire))
    for i in range(200):
        key = f"key{i}"
        owner = topology.owner(key_slot(l2.value_keys(fleet.wire, region, key)[0]))
        if owner is not channel_owner and owner is not avoid:
            return key
    raise AssertionError("no key found on another node")


# -- a cluster: values in their own slots ------------------------------------------------------


def test_cluster_values_live_in_their_own_slots(cluster_fleet: TopologyFleet) -> None:
    """The value and its lease live on the node serving the value's slot, the generations
    and the log on the channel's: a miss fills it there, another instance hits it there, a
    write replaces it there, and nothing of the value lands on the channel's node."""
    fleet = cluster_fleet
    a, b = fleet.make(), fleet.make()
    fleet.prime(a, b)
    key = _key_elsewhere(fleet)
    value_key = l2.value_keys(fleet.wire, None, key)[0]
    assert fleet.node_of(value_key) is not fleet.node_of(fleet.wire)
    calls: list[str] = []
    assert fleet.run(a.get_or_set(key, lambda: calls.append("db") or "v1")) == "v1"
    assert fleet.run(b.get_or_set(key, lambda: calls.append("other") or "x")) == "v1"
    assert calls == ["db"] and b.stats().l2_hits == 1
    record = fleet.in_l2(key)
    assert record is not None and b"v1" in record
    with fleet.topology.node_client(fleet.node_of(fleet.wire)) as client:
        assert client.exists(l2.generation_keys(fleet.wire)[0]) == 1
        with pytest.raises(redis.exceptions.MovedError):  # not its slot
            client.get(value_key)
    fleet.run(a.write(key, lambda: "v2"))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get(key)) == "v2")
    record = fleet.in_l2(key)
    assert record is not None and b"v2" in record
    # The write left no mark behind.
    assert fleet.get(l2.writers_key(value_key)) is None
    assert a.stats().l2_errors == 0 and b.stats().l2_errors == 0


def test_cluster_values_spread_over_the_slots(cluster_fleet: TopologyFleet) -> None:
    """Many keys' values land on every primary (their hash tag is per value)."""
    fleet = cluster_fleet
    a = fleet.make()
    fleet.prime(a)
    for i in range(30):
        fleet.run(a.set(f"k{i}", i))
    fleet.run(a.flush())
    owners = {id(fleet.node_of(l2.value_keys(fleet.wire, None, f"k{i}")[0])) for i in range(30)}
    assert len(owners) == 3
    assert all(fleet.in_l2(f"k{i}") is not None for i in range(30))


def test_cluster_writes_of_one_key_that_overlap_store_no_value(
    cluster_fleet: TopologyFleet,
) -> None:
    """A write's mark on the value's slot: while one write of the key is between its prepare
    and its commit, another write of it marks it contended, and neither stores its value
    (whichever publish came last, L2 ends empty, never with the older value)."""
    fleet = cluster_fleet
    key = _key_elsewhere(fleet)
    value, lease = l2.value_keys(fleet.wire, None, key)
    writers = l2.writers_key(value)
    node = fleet.node_of(value)
    with fleet.topology.node_client(node) as client:
        prepare = client.register_script(l2.PREPARE_SCRIPT)
        commit = client.register_script(l2.COMMIT_SCRIPT)
        store = l2.StoreValue(None, key, l2.encode_payload(1, None, key, b"x"), 60.0)
        tags = (b"1-0@c", l2.region_field(None))

        def run(script: Any, call: tuple[list[str], list[Any]]) -> Any:
            return script(keys=call[0], args=call[1])

        # One writer alone stores its value and leaves no mark.
        run(prepare, l2.prepare_call(fleet.wire, store, "A", ":c"))
        assert run(commit, l2.commit_call(fleet.wire, store, "A", tags, ":c")) == 1
        assert client.get(value) is not None and client.exists(writers) == 0
        # B prepares while A is under way: neither stores, in either commit order.
        for first, second in (("A", "B"), ("B", "A")):
            run(prepare, l2.prepare_call(fleet.wire, store, "A", ":c"))
            assert client.get(value) is None  # deleted before the publish
            run(prepare, l2.prepare_call(fleet.wire, store, "B", ":c"))
            assert run(commit, l2.commit_call(fleet.wire, store, first, tags, ":c")) == 0
            assert run(commit, l2.commit_call(fleet.wire, store, second, tags, ":c")) == 0
            assert client.get(value) is None and client.exists(writers) == 0
        # A writer that died after its prepare blocks the others' values until its mark
        # expires (a reader's lease still works: it loads after the write).
        run(prepare, l2.prepare_call(fleet.wire, store, "dead", ":c"))
        run(prepare, l2.prepare_call(fleet.wire, store, "C", ":c"))
        assert run(commit, l2.commit_call(fleet.wire, store, "C", tags, ":c")) == 0
        assert 0 < client.pttl(writers) <= l2.WRITE_MARK_TTL * 1000
        # A mark made before a failover (another reign) never stores after it.
        client.delete(writers)
        run(prepare, l2.prepare_call(fleet.wire, store, "D", ":c"))
        client.hset(writers, "D", b"u@another-replication-id:c")
        assert run(commit, l2.commit_call(fleet.wire, store, "D", tags, ":c")) == 0
        client.delete(value, lease, writers)


def test_cluster_reads_wait_for_a_write_under_way(cluster_fleet: TopologyFleet) -> None:
    """Between a write's prepare and its commit the value is gone: a reader waits for the
    commit (as for a lease) instead of loading from the source."""
    fleet = cluster_fleet
    key = _key_elsewhere(fleet)
    value = l2.value_keys(fleet.wire, None, key)[0]
    with fleet.topology.node_client(fleet.node_of(value)) as client:
        keys, args = l2.vread_call(fleet.wire, None, key, (b"g", b"r"), "reader", 5.0, ":c")
        vread = client.register_script(l2.VREAD_SCRIPT)
        prepare = client.register_script(l2.PREPARE_SCRIPT)
        store = l2.StoreValue(None, key, b"p", 60.0)
        call = l2.prepare_call(fleet.wire, store, "W", ":c")
        prepare(keys=call[0], args=call[1])
        assert int(vread(keys=keys, args=args)[0]) == l2.LEASE_HELD
        client.hset(l2.writers_key(value), "at", 0)  # marked long ago: its writer is gone
        assert int(vread(keys=keys, args=args)[0]) == l2.LEASED
        client.delete(*l2.value_keys(fleet.wire, None, key), l2.writers_key(value))


# -- a cluster: slot moves ---------------------------------------------------------------------


def test_a_move_of_a_values_slot_keeps_the_l2_working(cluster_fleet: TopologyFleet) -> None:
    """The slot of a cached value moves to another primary, first half-way (the value
    migrated, the slot not yet handed over: ``ASK``, then ``TRYAGAIN``), then fully
    (``MOVED``): reads and writes follow it, and no read returns a value a later write
    replaced."""
    fleet = cluster_fleet
    topology = fleet.topology
    assert isinstance(topology, ClusterTopology)
    a, b = fleet.make(), fleet.make()
    fleet.prime(a, b)
    key = _key_elsewhere(fleet)
    value_key = l2.value_keys(fleet.wire, None, key)[0]
    slot = key_slot(value_key)
    fleet.run(a.write(key, lambda: "v1"))
    fleet.run(a.flush())
    assert fleet.in_l2(key) is not None
    source = topology.owner(slot)
    target = next(p for p in topology.primaries() if p is not source)
    ids = topology.ids
    with topology.node_client(source) as src, topology.node_client(target) as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[id(source)])
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[id(target)])
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", value_key)
        # Half-way: the value is on the target; the source answers ASK for it, and the target
        # TRYAGAIN for a script naming keys it does not have yet: a read falls back to the
        # source of truth, a write's publish waits until the slot is handed over.
        assert fleet.run(b.get_or_set(key, lambda: "db")) in ("v1", "db")
        fleet.run(a.write(key, lambda: "v2"))
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[id(target)])
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[id(target)])
    for node in topology.primaries():
        with topology.node_client(node) as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[id(target)])
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get(key, MISSING)) in ("v2", MISSING))
    assert topology.owner(slot) is target
    c = fleet.make()
    assert fleet.run(c.get_or_set(key, lambda: "db")) in ("v2", "db")
    fleet.run(a.write(key, lambda: "v3"))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get(key, MISSING)) in ("v3", MISSING))
    d = fleet.make()
    assert fleet.run(d.get_or_set(key, lambda: "db")) == "v3"
    assert d.stats().l2_hits == 1  # stored on the new owner


def test_a_move_of_the_channels_slot_keeps_the_l2_working(cluster_fleet: TopologyFleet) -> None:
    """The channel's slot (log, generations) moves: its new node has another replication id,
    so every value written before is unreachable (never stale) and the first write of a value
    after it is sent as an invalidation; then values are shared again."""
    fleet = cluster_fleet
    topology = fleet.topology
    assert isinstance(topology, ClusterTopology)
    a, b = fleet.make(), fleet.make()
    fleet.prime(a, b)
    key = _key_elsewhere(fleet)
    fleet.run(a.write(key, lambda: "v1"))
    fleet.run(a.flush())
    assert fleet.in_l2(key) is not None
    slot = key_slot(fleet.wire)
    old = topology.owner(slot)
    topology.move_slot(slot)
    assert topology.owner(slot) is not old
    for cache in (a, b):  # both resubscribe on the new owner
        wait_until(
            lambda cache=cache: (
                cache._backplane.placement is not None
                and cache._backplane.placement.endpoint.port != topology.address(old)[1]
            ),
            timeout=10,
        )
    calls: list[str] = []
    assert fleet.run(b.get_or_set(key, lambda: calls.append("db") or "db")) == "db"
    assert calls == ["db"]  # the value from before the move is no value now
    fleet.prime(a, b)
    fleet.run(a.write(key, lambda: "v2"))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get(key, MISSING)) in ("v2", MISSING))
    fleet.prime(a, b)
    fleet.run(a.write(key, lambda: "v3"))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get(key)) == "v3")
    c = fleet.make()
    assert fleet.run(c.get_or_set(key, lambda: "db")) == "v3"


# -- Sentinel ------------------------------------------------------------------------------


def test_sentinel_failover_with_l2(
    driver: Driver, channel: str, sentinel_set: SentinelTopology
) -> None:
    """A failover: values written before it are unreachable on the new primary (a failover
    may lose what was not replicated), the L2 and the updates work there, and no read after
    the write's flush returns the value it replaced."""
    fleet = TopologyFleet(driver, sentinel_set, channel)
    try:
        a, b = fleet.make(), fleet.make()
        fleet.prime(a, b)
        fleet.run(a.write("k", lambda: "v1"))
        fleet.run(a.flush())
        assert fleet.in_l2("k") is not None
        old = sentinel_set.primary()
        new = sentinel_set.failover()
        assert new is not old
        for cache in (a, b):
            wait_until(
                lambda cache=cache: (
                    cache._backplane.placement is not None
                    and cache._backplane.placement.endpoint.port == sentinel_set.address(new)[1]
                ),
                timeout=20,
            )
        calls: list[str] = []
        assert fleet.run(b.get_or_set("k", lambda: calls.append("db") or "db")) == "db"
        assert calls == ["db"]
        fleet.prime(a, b)
        fleet.run(a.write("k", lambda: "v2"))
        fleet.run(a.flush())
        wait_until(lambda: fleet.run(b.get("k", MISSING)) in ("v2", MISSING))
        fleet.prime(a, b)
        fleet.run(a.write("k", lambda: "v3"))
        fleet.run(a.flush())
        wait_until(lambda: fleet.run(b.get("k")) == "v3")
        c = fleet.make()
        assert fleet.run(c.get_or_set("k", lambda: "db")) == "v3"
        assert c.stats().l2_hits == 1
    finally:
        fleet.close()


def test_an_l2_value_on_a_primary_no_longer_in_charge_is_not_served_past_the_bound(
    channel: str, sentinel_set: SentinelTopology, tcp_proxy: Any
) -> None:
    """B hears the Sentinels through proxies that go silent; then the primary is cut off from
    the Sentinels and replaced. The old primary stays a writable master holding v1 in L2, and
    B stays subscribed to it (it cannot learn of the switch). A writer on the new primary
    replaces v1 and flushes. A read on B that starts more than ``max_staleness`` later must
    not return v1: B's confirmations stopped counting when it lost the Sentinels, and an L2
    value from a Sentinel primary is current only as of them."""
    proxies: list[TcpProxy] = [tcp_proxy(s.port, SENTINEL_HOST) for s in sentinel_set.sentinels]
    through_proxies = sentinel_set.connection_string().split(",")
    through_proxies = [f"127.0.0.1:{p.port}" for p in proxies] + [
        part for part in through_proxies if "=" in part
    ]
    opts = {"l2": True, "max_staleness": STALENESS}
    writer = NearCache(sentinel_set.connection_string(), channel=channel, **opts)
    # B's heartbeat timeout (S / 2) is long enough that a loaded machine does not end its
    # subscription (it could not subscribe again without the Sentinels).
    bound = 2.0
    b = NearCache(",".join(through_proxies), channel=channel, l2=True, max_staleness=bound)
    late: NearCache | None = None
    try:
        writer.remove("prime")
        writer.flush()
        # The writer's own echo gives it a log position: a write() without one is published
        # as an invalidation (nothing to check racing writers from) and leaves no v1 in L2.
        wait_until(lambda: writer._backplane.log_position() is not None)
        writer.write("k", lambda: "v1")
        writer.flush()
        wait_until(lambda: b._backplane.log_position() is not None)
        old_primary = sentinel_set.primary()
        for proxy in proxies:
            proxy.stall()
        sentinel_set.cut_primary_from_sentinels()
        new_primary = sentinel_set.wait_switched(old_primary)
        writer.close()
        late = NearCache(sentinel_set.connection_string(), channel=channel, **opts)
        late.remove("prime")
        late.flush()
        wait_until(lambda: late is not None and late._backplane.log_position() is not None)
        late.write("k", lambda: "v2")
        late.flush()
        flushed = time.monotonic()
        assert sentinel_set.role(old_primary) == "master"  # still writable, still holds v1
        with sentinel_set.node_client(old_primary) as client:
            record = client.get(l2.value_keys(channel_name(channel), None, "k")[0])
        assert record is not None and b"v1" in record
        placement = b._backplane.placement  # B still reads the old primary
        assert placement is not None, b.stats().last_error
        assert placement.endpoint.port == sentinel_set.address(old_primary)[1]
        wait_until(lambda: time.monotonic() > flushed + bound, timeout=5)
        assert b.get_or_set("k", lambda: "db") != "v1"
        assert new_primary is not old_primary
    finally:
        for proxy in proxies:
            proxy.resume()
        b.close()
        if late is not None:
            late.close()


def test_a_write_lost_in_a_failover_leaves_no_stale_value_in_l2(
    channel: str, sentinel_set: SentinelTopology
) -> None:
    """The replica is kept from hearing a write (its link to the primary is cut and it may
    not reconnect); the write's flush returns; the primary is killed and the replica, which
    still holds v1 in L2 and lacks the write in its log, is promoted. No read then returns
    v1: a promoted replica has a new replication id, so every value written before is no
    value, and no position from before is trusted by the conflict check."""
    opts: dict[str, Any] = {"l2": True, "propagate": "update", "max_staleness": STALENESS}
    connection = sentinel_set.connection_string()
    writer = NearCache(connection, channel=channel, **opts)
    late: NearCache | None = None
    try:
        writer.remove("prime")
        writer.flush()
        wait_until(lambda: writer._backplane.log_position() is not None)  # see above
        writer.write("k", lambda: "v1")
        writer.flush()
        primary, replica = sentinel_set.primary(), sentinel_set.replica()
        value_key = l2.value_keys(channel_name(channel), None, "k")[0]
        with sentinel_set.node_client(replica) as client:
            wait_until(lambda: client.get(value_key) is not None)  # v1 replicated
        # Existing connections (the writer's, the Sentinels') keep working; the replica's
        # link is killed and it cannot come back.
        sentinel_set.proxy_of(primary).refuse()
        with sentinel_set.node_client(primary) as client:
            client.execute_command("CLIENT", "KILL", "TYPE", "replica")
        writer.write("k", lambda: "v2")
        writer.flush()
        sentinel_set.kill_primary()
        promoted = sentinel_set.wait_switched(primary, timeout=30)
        assert promoted is replica
        wire = channel_name(channel)
        with sentinel_set.node_client(replica) as client:
            record = client.get(value_key)
            log = client.xrange(wire + ":log")
        assert record is not None and b"v1" in record  # the write was lost here
        assert not any(b"v2" in fields[b"m"] for _, fields in log)
        late = NearCache(connection, channel=channel, **opts)
        assert late.get_or_set("k", lambda: "db") == "db"
        assert late.stats().l2_hits == 0
        wait_until(lambda: writer.backplane_state.value == "connected", timeout=20)
        assert writer.get_or_set("k", lambda: "db") in ("v2", "db")
    finally:
        writer.close()
        if late is not None:
            late.close()


@pytest.mark.parametrize("write", ["remove", "set", "clear_region", "clear"])
def test_a_load_held_open_across_a_write_is_cached_nowhere_on_a_cluster(
    redis_cluster: ClusterTopology, channel: str, tmp_path: Path, write: str
) -> None:
    """``tests/test_l2_processes.py``'s case on a cluster, with the value in another slot
    (and node) than the channel: B (asyncio, its own process) holds the lease and loads the
    old row; A (threaded, another process) writes the key, its region or everything and
    flushes; B's value is returned to its caller but cached nowhere, and a third process reads
    the new state."""
    loads = tmp_path / "loads"
    loads.touch()
    connection = redis_cluster.connection_string()
    wire = "{" + channel_name(channel) + "}"
    channel_owner = redis_cluster.owner(key_slot(wire))
    key = next(
        f"k{i}"
        for i in range(200)
        if redis_cluster.owner(key_slot(l2.value_keys(wire, "r", f"k{i}")[0])) is not channel_owner
    )
    processes = [Process(connection, channel, loads, driver) for driver in ("sync", "async")]
    try:
        a, b = processes
        a.call("remove", key="prime")
        a.call("flush")
        loading = b.start("get_or_set", key=key, region="r", value="old", hold=True)
        b.loading(key)
        if write == "set":
            a.call("set", key=key, region="r", value="new")
        elif write == "remove":
            a.call("remove", key=key, region="r")
        elif write == "clear_region":
            a.call("clear_region", region="r")
        else:
            a.call("clear")
        a.call("flush")
        wait_until(lambda: b.call("stats")["invalidations_received"] >= 2)
        b.call("release", key=key)
        assert loading.result(10) == "old"
        b.call("flush")  # its fill is answered
        assert b.call("get", key=key, region="r") == {"missing": True}
        if write in ("set", "remove"):  # the write deleted B's lease: its fill was refused
            assert b.call("stats")["l2_fills_refused"] == 1
        # (After a clear the fill may be stored, tagged with the generation it read: no value.)
        processes.append(c := Process(connection, channel, loads, "sync"))
        expected = "new" if write == "set" else "db"
        assert c.call("get_or_set", key=key, region="r", value="db") == expected
    finally:
        for process in processes:
            process.close()
