"""The shared L2 and value-carrying updates through the public API, both drivers, on a real
Redis (several instances in this process; the multi-process cases are in
``tests/test_l2_processes.py``)."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from nearcache import (
    MISSING,
    ConfigurationError,
    MemoryBackplane,
    MemoryBroker,
    NearCache,
    PickleSerializer,
    SerializationError,
)
from nearcache._core import l2
from nearcache._core.codec import channel_name
from tests.servers import RedisServer, TcpProxy, wait_until
from tests.test_conformance import Driver, Gate

LOADED: list[str] = []  # set if a planted pickle is ever loaded


class Planted:
    """Records that it was unpickled: the test fails if that ever happens."""

    def __reduce__(self) -> Any:
        return (LOADED.append, ("code ran",))


@pytest.fixture(params=["sync", "async"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    d = Driver(request.param)
    yield d
    d.stop()


class Fleet:
    """Caches of one channel, closed at the end."""

    def __init__(self, driver: Driver, server: RedisServer, channel: str) -> None:
        self.driver = driver
        self.server = server
        self.channel = channel
        self.wire = channel_name(channel)
        self.caches: list[Any] = []
        self.admin = redis.Redis(port=server.port)

    def make(self, url: str | None = None, **kwargs: Any) -> Any:
        kwargs = {"l2": True, "propagate": "update", **kwargs}
        cache = self.driver.make(connection=url or self.server.url, channel=self.channel, **kwargs)
        self.caches.append(cache)
        wait_until(lambda: cache.backplane_state.value == "connected")
        return cache

    def run(self, value: Any) -> Any:
        return self.driver.run(value)

    def prime(self, *caches: Any) -> None:
        """Put an entry in the log and wait until each cache applied it: a write then has a
        log position to be checked from (a brand-new channel has none)."""
        first = caches[0]
        # Wait for each cache's position to move, not merely to exist: after a failover a
        # position from the former reign is still there, and a write checked from it goes
        # as an invalidation (it cannot be trusted on the new primary).
        before = [cache._backplane.log_position() for cache in caches]
        self.run(first.remove("__prime__"))
        self.run(first.flush())
        for cache, old in zip(caches, before, strict=True):
            wait_until(lambda c=cache, o=old: c._backplane.log_position() not in (None, o))

    def in_l2(self, key: Any, region: str | None = None) -> bytes | None:
        return self.admin.get(l2.value_keys(self.wire, region, key)[0])  # type: ignore[return-value]

    def close(self) -> None:
        for cache in self.caches:
            self.driver.close(cache)
        self.admin.close()


@pytest.fixture
def fleet(driver: Driver, redis_server: RedisServer, channel: str) -> Iterator[Fleet]:
    f = Fleet(driver, redis_server, channel)
    yield f
    f.close()


def factory(value: Any, calls: list[Any]) -> Any:
    def load() -> Any:
        calls.append(value)
        return value

    return load


def test_a_miss_is_loaded_once_and_then_served_from_l2(fleet: Fleet) -> None:
    """A's load fills L2; B's miss finds it there: one factory call for the fleet."""
    a, b = fleet.make(), fleet.make()
    calls: list[Any] = []
    assert fleet.run(a.get_or_set("k", factory({"v": 1}, calls), region="r")) == {"v": 1}
    fleet.run(a.flush())  # its fill is answered: the value is in L2
    assert fleet.run(b.get_or_set("k", factory("other", calls), region="r")) == {"v": 1}
    assert calls == [{"v": 1}]
    assert (a.stats().l2_fills, b.stats().l2_hits, b.stats().loads) == (1, 1, 0)
    assert fleet.run(b.get("k", None, "r")) == {"v": 1}  # now in B's L1 too


def test_set_writes_l2_and_updates_other_copies(fleet: Fleet) -> None:
    """A's set reaches L2 and replaces B's copy (no reload); a third instance reads it from L2."""
    a, b = fleet.make(), fleet.make()
    fleet.prime(a, b)
    calls: list[Any] = []
    fleet.run(b.get_or_set("k", factory("old", calls)))
    fleet.run(a.set("k", "new"))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get("k")) == "new")
    assert b.stats().updates_received == 1 and a.stats().updates_fell_back == 0
    c = fleet.make()
    assert fleet.run(c.get_or_set("k", factory("db", calls))) == "new"
    assert calls == ["old"]


def test_remove_and_clears_reach_l2(fleet: Fleet) -> None:
    """remove deletes the value; clear_region and clear make values unreachable (misses)."""
    a, b = fleet.make(), fleet.make()
    fleet.prime(a, b)
    for key, region in (("x", "r"), ("y", "r"), ("z", "s")):
        fleet.run(a.set(key, key.upper(), region=region))
    fleet.run(a.flush())
    assert fleet.in_l2("x", "r") is not None
    fleet.run(a.remove("x", region="r"))
    fleet.run(a.flush())
    assert fleet.in_l2("x", "r") is None
    calls: list[Any] = []
    fleet.run(a.clear_region("r"))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get("y", MISSING, "r")) is MISSING)  # B had A's update
    assert fleet.run(b.get_or_set("y", factory("db-y", calls), region="r")) == "db-y"
    assert fleet.run(b.get_or_set("z", factory("db-z", calls), region="s")) == "Z"
    fleet.run(a.clear())
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get("z", MISSING, "s")) is MISSING)
    assert fleet.run(b.get_or_set("z", factory("db-z", calls), region="s")) == "db-z"
    assert calls == ["db-y", "db-z"]


def test_invalidate_mode_writes_l2_but_sends_no_values(fleet: Fleet) -> None:
    """l2=True alone: set fills L2 and others drop their copy, then refill from L2."""
    a, b = fleet.make(propagate="invalidate"), fleet.make(propagate="invalidate")
    fleet.prime(a, b)
    calls: list[Any] = []
    fleet.run(b.get_or_set("k", factory("old", calls)))
    fleet.run(a.set("k", "new"))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get("k", MISSING)) is MISSING)
    assert fleet.run(b.get_or_set("k", factory("db", calls))) == "new"
    assert calls == ["old"] and b.stats().updates_received == 0


def test_a_load_overlapping_a_write_reaches_neither_l1_nor_l2(fleet: Fleet) -> None:
    """B's load holds the lease while A writes the key: B returns its value, but it is
    cached nowhere (the write deleted the lease; the invalidation cancelled the reservation)."""
    a, b = fleet.make(), fleet.make()
    fleet.prime(a, b)
    gate = Gate(fleet.driver, value="stale")
    pending = fleet.driver.spawn(lambda: b.get_or_set("k", gate.factory))
    assert gate.started.wait(10)
    fleet.run(a.remove("k"))
    fleet.run(a.flush())
    wait_until(lambda: b.stats().invalidations_received >= 2)
    gate.release()
    assert pending.result(10) == "stale"
    fleet.run(b.flush())  # its fill is answered
    assert fleet.run(b.get("k", MISSING)) is MISSING
    assert fleet.in_l2("k") is None
    assert b.stats().l2_fills_refused == 1


def test_a_writer_overtaken_by_another_write_sends_an_invalidation(
    fleet: Fleet, tcp_proxy: Any
) -> None:
    """A's older value is published after B's newer one (A's link is slow): the publish
    script sees B's write since A's set and sends A's invalidation instead, so no instance
    and not L2 ends with the older value."""
    proxy: TcpProxy = tcp_proxy(fleet.server.port)
    # A's publish is held DELAY in the proxy: B's set and flush must land first, which a
    # loaded machine did not always manage in 0.3 s. A's heartbeat timeout (S / 2) stays
    # well above the delayed round trip, so A's subscription lives through it.
    delay = 1.0
    a = fleet.make(f"redis://127.0.0.1:{proxy.port}/0", max_staleness=10 * delay)
    b, c = fleet.make(), fleet.make()
    fleet.prime(a, b, c)
    fleet.run(c.get_or_set("k", lambda: "v0"))
    proxy.delay(delay)
    fleet.run(a.set("k", "older"))
    fleet.run(b.set("k", "newer"))
    fleet.run(b.flush())
    fleet.run(a.flush())
    proxy.delay(0)
    wait_until(lambda: a.stats().updates_fell_back == 1, 10, message="A's write fell back")
    for cache in (a, b, c):  # A's invalidation came last: every copy is dropped
        wait_until(lambda cache=cache: fleet.run(cache.get("k", MISSING)) is MISSING, 10)
    assert fleet.in_l2("k") is None
    assert fleet.run(c.get_or_set("k", lambda: "db")) == "db"


def test_unserializable_set_drops_the_key_everywhere(fleet: Fleet) -> None:
    """set of a value the serializer refuses raises, after removing the key everywhere."""
    a, b = fleet.make(), fleet.make()
    fleet.prime(a, b)
    fleet.run(b.get_or_set("k", lambda: "old"))
    with pytest.raises(SerializationError, match="'k'"):
        fleet.run(a.set("k", object()))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get("k", MISSING)) is MISSING)
    assert fleet.run(a.get("k", MISSING)) is MISSING


def test_oversized_values_stay_in_l1(fleet: Fleet) -> None:
    """Values above the caps are cached locally only (counted); others drop their copy."""
    a, b = fleet.make(l2_max_bytes=64, update_max_bytes=64), fleet.make()
    fleet.prime(a, b)
    fleet.run(b.get_or_set("k", lambda: "old"))
    fleet.run(a.set("k", "x" * 100))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get("k", MISSING)) is MISSING)
    assert fleet.run(a.get("k")) == "x" * 100
    assert fleet.in_l2("k") is None and a.stats().l2_oversized == 1
    assert fleet.run(a.get_or_set("big", lambda: "y" * 100)) == "y" * 100
    assert fleet.in_l2("big") is None and a.stats().l2_oversized == 2


@pytest.mark.parametrize("plant", ["garbage", "other key", "unsigned", "pickle"])
def test_foreign_or_corrupt_l2_values_are_counted_misses(fleet: Fleet, plant: str) -> None:
    """Whatever sits in L2 that this cache did not sign for this key is a miss: the factory
    runs, the value is never returned, and a planted pickle is never loaded."""
    secret = {"secret": "s3cret"} if plant in ("unsigned", "pickle") else {}
    serializer = {"serializer": PickleSerializer()} if plant == "pickle" else {}
    a = fleet.make(**secret, **serializer)
    region, key = None, "k"
    head = fleet.run(a.get_or_set("probe", lambda: 1))  # creates the generation tokens
    assert head == 1
    fleet.run(a.flush())  # its fill is answered
    tags = fleet.admin.get(l2.value_keys(fleet.wire, None, "probe")[0])
    assert tags is not None
    tags = tags[: 2 + tags[0] + tags[1 + tags[0]]]
    payload = {
        "garbage": b"\x00\x01\x02",
        "other key": l2.encode_payload(1, region, "k2", b"\x01s\x00\x00\x00\x01x"),
        "unsigned": l2.encode_payload(1, region, key, b"\x01s\x00\x00\x00\x01x"),
        "pickle": l2.encode_payload(2, region, key, pickle.dumps(Planted())),
    }[plant]
    fleet.admin.set(l2.value_keys(fleet.wire, region, key)[0], tags + payload)
    assert fleet.run(a.get_or_set(key, lambda: "db")) == "db"
    assert a.stats().l2_corrupt == 1
    assert LOADED == []


def test_signed_pickles_roundtrip_through_l2(fleet: Fleet) -> None:
    """PickleSerializer with secret=: any picklable value is shared, verified before loading."""
    a = fleet.make(secret="k", serializer=PickleSerializer())
    b = fleet.make(secret="k", serializer=PickleSerializer())
    value = {"when": time.gmtime(0), "set": frozenset({1})}
    assert fleet.run(a.get_or_set("k", lambda: value)) == value
    assert fleet.run(b.get_or_set("k", lambda: "db")) == value


def test_l2_lost_only_causes_misses(fleet: Fleet) -> None:
    """FLUSHALL (or a restart without data): values, leases and generations go; reads load
    from the factory again, nothing fails and no old value returns."""
    a, b = fleet.make(), fleet.make()
    fleet.run(a.get_or_set("k", lambda: "v1"))
    fleet.admin.flushall()
    calls: list[Any] = []
    assert fleet.run(b.get_or_set("k", factory("v2", calls))) == "v2"
    assert calls == ["v2"]
    assert fleet.run(b.get_or_set("j", factory("v3", calls))) == "v3"


def test_redis_down_reads_go_to_the_factory_without_waiting(fleet: Fleet, tcp_proxy: Any) -> None:
    """With Redis unreachable, a miss costs no L2 timeout: the factory answers at once and
    L1 keeps serving; writes queue for later."""
    proxy: TcpProxy = tcp_proxy(fleet.server.port)
    # The bound below is far under the L2 timeout: a miss that waited for it would fail, and a
    # loaded machine has room to run the factory.
    a = fleet.make(f"127.0.0.1:{proxy.port},abortConnect=False", l2_timeout=10.0)
    fleet.run(a.get_or_set("cached", lambda: "v"))
    proxy.refuse()
    proxy.cut()
    wait_until(lambda: a.backplane_state.value != "connected")
    started = time.monotonic()
    assert fleet.run(a.get_or_set("k", lambda: "db")) == "db"
    assert time.monotonic() - started < 3.0
    assert fleet.run(a.get("cached")) == "v"
    fleet.run(a.set("w", "x"))
    assert a.stats().pending == 1
    proxy.accept()
    fleet.run(a.flush(10))
    assert fleet.in_l2("w") is not None or a.stats().updates_fell_back >= 1


def test_l2_options_are_checked() -> None:
    """l2/update need a connection string and the log; pickle needs a secret."""
    with pytest.raises(ConfigurationError, match="connection"):
        NearCache(l2=True)
    with pytest.raises(ConfigurationError, match="connection string"):
        NearCache(backplane=MemoryBackplane(MemoryBroker(), "c"), propagate="update")
    with pytest.raises(ConfigurationError, match="replay_log"):
        NearCache("127.0.0.1:1,abortConnect=False", l2=True, replay_log=0)
    with pytest.raises(ConfigurationError, match="secret"):
        NearCache("redis://127.0.0.1:1/0", l2=True, serializer=PickleSerializer())


def test_write_shares_the_value_it_wrote(fleet: Fleet) -> None:
    """write() runs the change, caches and shares its result, and returns it."""
    a, b = fleet.make(), fleet.make()
    fleet.prime(a, b)
    fleet.run(b.get_or_set("k", lambda: 1))
    assert fleet.run(a.write("k", lambda: 2)) == 2
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get("k")) == 2)
    assert fleet.run(a.get("k")) == 2 and a.stats().updates_fell_back == 0


def test_a_write_racing_another_instance_never_leaves_the_older_value(fleet: Fleet) -> None:
    """B writes the key while A's change runs (so the source's order is unknown): A's value
    is sent as an invalidation and kept nowhere, and nobody ends with it."""
    a, b, c = fleet.make(), fleet.make(), fleet.make()
    fleet.prime(a, b, c)
    gate = Gate(fleet.driver, value="A's")
    pending = fleet.driver.spawn(lambda: a.write("k", gate.factory))
    assert gate.started.wait(10)
    fleet.run(b.write("k", lambda: "B's"))
    fleet.run(b.flush())
    wait_until(lambda: a.stats().invalidations_received >= 1)  # B's write reached A
    gate.release()
    assert pending.result(10) == "A's"
    fleet.run(a.flush())
    assert a.stats().updates_fell_back == 1
    for cache in (a, b, c):
        wait_until(lambda cache=cache: fleet.run(cache.get("k", MISSING)) != "A's")
    assert fleet.in_l2("k") is None
    assert fleet.run(c.get_or_set("k", lambda: "db")) in ("db", "B's")


def test_a_failed_write_drops_the_key_everywhere(fleet: Fleet) -> None:
    """If change() raises, the source may have changed: the key is dropped everywhere."""
    a, b = fleet.make(), fleet.make()
    fleet.prime(a, b)
    fleet.run(b.get_or_set("k", lambda: "old"))

    def change() -> Any:
        raise KeyError("db failed half-way")

    with pytest.raises(KeyError):
        fleet.run(a.write("k", change))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get("k", MISSING)) is MISSING)


def test_updates_without_l2_never_read_or_fill_l2(fleet: Fleet) -> None:
    """propagate="update" alone keeps nothing in Redis: misses go to the factory."""
    a = fleet.make(l2=False)
    assert fleet.run(a.get_or_set("k", lambda: "db")) == "db"
    assert fleet.in_l2("k") is None
    assert (a.stats().l2_hits, a.stats().l2_fills, a.stats().l2_misses) == (0, 0, 0)


def commands(admin: Any) -> dict[str, int]:
    """Calls so far of GET and EVALSHA on the server."""
    stats = admin.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("get", "evalsha")}


def confirmed_after(cache: Any, moment: float) -> None:
    """Wait for a heartbeat confirmation sent after ``moment``."""
    wait_until(lambda: cache._core.sharing.confirmed_at > moment)


def test_an_l2_hit_with_known_generations_is_a_plain_get(fleet: Fleet) -> None:
    """Once a script read taught B the region's generations and a confirmation followed, a
    hit is a plain GET (no script), current as of that confirmation: its L1 entry says so."""
    a, b = fleet.make(heartbeat_interval=0.05), fleet.make(heartbeat_interval=0.05)
    calls: list[Any] = []
    for key in ("j", "k"):
        fleet.run(a.get_or_set(key, factory(key.upper(), calls), region="r"))
    assert fleet.run(b.get_or_set("j", factory("db", calls), region="r")) == "J"  # learns
    confirmed_after(b, b._clock())
    before = commands(fleet.admin)
    started = b._clock()
    as_of = b._core.sharing.confirmed_at
    assert fleet.run(b.get_or_set("k", factory("db", calls), region="r")) == "K"
    after = commands(fleet.admin)
    assert (after["get"] - before["get"], after["evalsha"] - before["evalsha"]) == (1, 0)
    assert calls == ["J", "K"] and b.stats().l2_hits == 2
    entry = b._core.store._table.regions["r"]["k"]
    assert as_of <= entry.stored < started  # current as of the confirmation, not the read


@pytest.mark.parametrize("who", ["other", "self"])
def test_known_generations_never_hide_a_clear(fleet: Fleet, who: str) -> None:
    """After a clear of the region (by another instance, or by B itself) has been flushed and
    reached B, B's next miss never returns a record of the old generation, though that
    record is still in Redis and B had learned the old generation."""
    a, b = fleet.make(heartbeat_interval=0.05), fleet.make(heartbeat_interval=0.05)
    fleet.prime(a, b)
    calls: list[Any] = []
    for key in ("j", "k"):
        fleet.run(a.get_or_set(key, factory("old " + key, calls), region="r"))
    fleet.run(a.flush())  # its fills are answered
    fleet.run(b.get_or_set("j", factory("db", calls), region="r"))  # B learns
    confirmed_after(b, b._clock())
    assert fleet.in_l2("k", "r") is not None
    clearer = a if who == "other" else b
    fleet.run(clearer.clear_region("r"))
    fleet.run(clearer.flush())
    confirmed_after(b, b._clock())  # the clear's message reached B
    assert fleet.in_l2("k", "r") is not None  # unreachable, not deleted (O(1) clears)
    assert fleet.run(b.get_or_set("k", factory("new k", calls), region="r")) == "new k"


def test_a_load_that_joined_a_lookup_loads_for_real(
    redis_server: RedisServer, channel: str, tcp_proxy: Any
) -> None:
    """get_or_set(key, lookup) (the Django backend's get) finds nothing in L2: a caller with a
    factory that joined it meanwhile runs its own load instead of getting Absent."""
    from nearcache._core.sharing import Absent, lookup

    proxy: TcpProxy = tcp_proxy(redis_server.port)
    with NearCache(f"127.0.0.1:{proxy.port}", channel=channel, l2=True) as cache:
        wait_until(lambda: cache.backplane_state.value == "connected")
        proxy.delay(0.3)  # the lookup's L2 read takes that long
        outcome: list[Any] = []

        def look() -> None:
            try:
                outcome.append(cache.get_or_set("k", lookup))
            except Absent:
                outcome.append("absent")

        looking = threading.Thread(target=look)
        looking.start()
        wait_until(lambda: (None, "k") in cache._core.flights)
        assert cache.get_or_set("k", lambda: "db") == "db"
        looking.join()
        assert outcome == ["absent"]


def test_a_value_read_from_l2_as_it_expires_does_not_outlive_it(fleet: Fleet) -> None:
    """B reads values whose L2 expiry runs out while it reads: an L1 copy of a value found
    with under a millisecond left (PTTL 0), or expired between the GET and the PTTL (-2),
    expires with it. (Both counted as "no expiry": the copy lived in L1 for good.)"""
    a, b = fleet.make(propagate="invalidate"), fleet.make(propagate="invalidate")
    fleet.prime(a, b)
    keys = [f"k{i}" for i in range(200)]
    before = b.stats().invalidations_received
    for key in keys:
        fleet.run(a.set(key, "v", ttl=0.3))
    fleet.run(a.flush())
    expired = time.monotonic() + 0.3  # every value's L2 expiry has run out by then
    # A's invalidations are in before B reads: none of them evicts what B reads below.
    wait_until(lambda: b.stats().invalidations_received - before >= len(keys))
    while time.monotonic() < expired + 0.3:  # every key read again and again across its expiry
        for key in keys:
            fleet.run(b.get_or_set(key, lambda: "db", ttl=60))
    held = [key for key in keys if fleet.run(b.get(key, MISSING)) == "v"]
    assert not held, f"{len(held)} copies outlived their value in L2"


def _pttl_calls(fleet: Fleet) -> int:
    """PTTL commands the server ran: one per plain L2 read (GET + PTTL), none for a read
    script that finds no value."""
    stats = fleet.admin.info("commandstats").get("cmdstat_pttl", {})
    return int(stats.get("calls", 0))


@pytest.mark.parametrize("propagate", ["update", "invalidate"])
def test_a_miss_after_an_invalidation_asks_the_read_script_at_once(
    fleet: Fleet, propagate: str
) -> None:
    """B held k; A's write dropped it there (and replaced or deleted L2's copy in the same
    step): B's next miss goes straight to the read script, one round trip for the value or
    the lease, not a plain GET first. A key B never held is read with a plain GET first."""
    a, b = fleet.make(propagate=propagate), fleet.make(propagate=propagate)
    calls: list[Any] = []
    assert fleet.run(b.get_or_set("k", factory("v1", calls))) == "v1"
    assert fleet.run(b.get_or_set("j", factory("j1", calls))) == "j1"
    fleet.run(b.flush())
    fleet.prime(a, b)
    fleet.run(a.remove("k"))
    fleet.run(a.flush())
    wait_until(lambda: fleet.run(b.get("k", MISSING)) is MISSING)
    before, misses = _pttl_calls(fleet), b.stats().l2_misses
    assert fleet.run(b.get_or_set("k", factory("v2", calls))) == "v2"  # L2's copy went
    assert _pttl_calls(fleet) == before  # no plain GET: the script took the lease
    assert b.stats().l2_misses == misses + 1
    if propagate == "invalidate":  # A's set drops k here and puts its value in L2
        received = b.stats().invalidations_received
        fleet.run(a.set("k", "v3"))
        fleet.run(a.flush())
        wait_until(lambda: b.stats().invalidations_received > received)
        before = _pttl_calls(fleet)
        assert fleet.run(b.get_or_set("k", factory("unused", calls))) == "v3"
        assert _pttl_calls(fleet) == before + 1  # the script's own PTTL of the value it found
    fleet.run(a.get_or_set("n", factory("n1", calls)))  # a key B never held, in L2
    fleet.run(a.flush())
    before = _pttl_calls(fleet)
    assert fleet.run(b.get_or_set("n", factory("unused", calls))) == "n1"
    assert _pttl_calls(fleet) == before + 1  # a plain GET + PTTL found it
    assert calls == ["v1", "j1", "v2", "n1"]


def test_a_fill_is_not_waited_for_and_flush_waits_for_it(fleet: Fleet) -> None:
    """A load returns without waiting for its fill's reply (the threaded driver reads it with
    the connection's next reply; the asyncio driver fills in a task); flush() returns once
    every fill is answered; close() with a fill unanswered neither raises nor hangs."""
    a = fleet.make()
    calls: list[Any] = []
    assert fleet.run(a.get_or_set("k1", factory(1, calls))) == 1
    fleet.run(a.flush())
    assert a.stats().l2_fills == 1
    assert fleet.in_l2("k1") is not None
    assert fleet.run(a.get_or_set("k2", factory(2, calls))) == 2
    if fleet.driver.kind == "sync":  # the reply waits on the connection: nothing read it yet
        assert a.stats().l2_fills == 1
    fleet.run(a.flush())
    assert (a.stats().l2_fills, a.stats().l2_errors) == (2, 0)
    assert fleet.in_l2("k2") is not None
    assert fleet.run(a.get_or_set("k3", factory(3, calls))) == 3
    fleet.driver.close(a)  # with k3's fill unanswered (or still running)
    fleet.caches.remove(a)
    assert a.state.value == "closed"
    assert calls == [1, 2, 3]


def test_a_fill_answered_with_an_error_is_counted_and_the_next_one_works(fleet: Fleet) -> None:
    """The server lost its scripts (SCRIPT FLUSH) between two fills: the threaded driver's
    fill, sent with EVALSHA and not waited for, is answered NOSCRIPT: counted as an L2 error,
    nothing stored, the caller unaffected; the next fill loads the script again. (The asyncio
    driver waits for its fill in a task, through redis-py, which loads the script at once.)"""
    a = fleet.make()
    calls: list[Any] = []
    fleet.run(a.get_or_set("k1", factory(1, calls)))
    fleet.run(a.get_or_set("k2", factory(2, calls)))
    fleet.run(a.flush())
    assert (a.stats().l2_fills, a.stats().l2_errors) == (2, 0)
    fleet.admin.script_flush()
    assert fleet.run(a.get_or_set("k3", factory(3, calls))) == 3
    fleet.run(a.flush())
    sync = fleet.driver.kind == "sync"
    assert (a.stats().l2_fills, a.stats().l2_errors) == ((2, 1) if sync else (3, 0))
    assert (fleet.in_l2("k3") is None) is sync
    assert fleet.run(a.get_or_set("k4", factory(4, calls))) == 4
    fleet.run(a.flush())
    assert a.stats().l2_fills == (3 if sync else 4)
    assert fleet.in_l2("k4") is not None
    assert calls == [1, 2, 3, 4]


def test_the_memory_of_dropped_keys_is_bounded(fleet: Fleet) -> None:
    """Every key a write drops here is remembered until its next miss, at most DROPPED_MAX of
    them (then the memory starts over)."""
    from nearcache._core.cache import DROPPED_MAX

    a = fleet.make()
    for i in range(DROPPED_MAX + 10):
        fleet.run(a.set(i, i))
        fleet.run(a.remove(i))
    assert 0 < len(a._core.dropped) <= DROPPED_MAX
    fleet.run(a.flush())
