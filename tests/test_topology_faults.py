"""The staleness bound through Sentinel failovers and Redis Cluster slot moves, on real
topologies, with the instances in separate processes.

Each test: instance B caches ``v1``; a topology fault happens; the source changes to ``v2``
and writer A invalidates and flushes; no read on B that starts more than ``max_staleness``
after A's ``flush()`` returned may give ``v1``, and both recover by themselves afterwards
(see docs/guarantees.md and docs/topologies.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nearcache import NearCache
from nearcache._core.topology import key_slot
from nearcache._exceptions import ConfigurationError
from tests.instances import Instance
from tests.servers import HOST, free_port, wait_until
from tests.topologies import SENTINEL_HOST, ClusterTopology, SentinelTopology

STALENESS = 1.0
SLACK = 0.25  # scheduling slack for a read that starts right at the bound (2 loaded cores)

Spawn = Callable[..., Instance]


@pytest.fixture
def spawn(channel: str) -> Iterator[Spawn]:
    started: list[Instance] = []

    def factory(connection: str, driver: str = "sync", name: str = "instance") -> Instance:
        inst = Instance(connection, channel, driver=driver, name=name, max_staleness=STALENESS)
        started.append(inst)
        return inst

    yield factory
    for inst in started:
        inst.close()


def _pair(spawn: Spawn, connection: str, driver: str, source: Path) -> tuple[Instance, Instance]:
    source.write_text("v1")
    a = spawn(connection, driver, "A")
    b = spawn(connection, driver, "B")
    a.wait_state("connected")
    b.wait_state("connected")
    assert b.call("load", key="k", source=str(source)) == "v1"
    return a, b


def _write_and_check(a: Instance, b: Instance, source: Path, spawn: Spawn, conn: str) -> None:
    """A writer started after the fault (so it publishes only where the topology now says)
    changes the source and invalidates; no read on B past the bound returns v1; then A and B
    are back in touch (a later invalidation from A reaches B)."""
    writer = spawn(conn, "sync", "C")
    writer.wait_state("connected", timeout=20)
    source.write_text("v2")
    writer.call("remove", key="k")
    flushed_at = writer.call("flush", timeout=20.0)
    runs = b.call("read_loop", key="k", source=str(source), duration=STALENESS + 1.0)
    stale = [r for r in runs if r[2] == "v1" and float(r[1]) > flushed_at + STALENESS + SLACK]
    assert not stale, runs
    assert runs[-1][2] == "v2"
    b.wait_state("connected", timeout=20)
    a.call("remove", key="k")
    a.call("flush", timeout=20.0)
    assert b.call("wait_gone", key="k", timeout=10) is not None


# -- Sentinel --------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_sentinel_manual_failover(
    sentinel_set: SentinelTopology, spawn: Spawn, tmp_path: Path, driver: str
) -> None:
    """SENTINEL FAILOVER while B holds v1: the old primary stays a writable master for
    seconds, yet B neither misses the invalidation past the bound nor stays on it."""
    source = tmp_path / "source"
    connection = sentinel_set.connection_string()
    a, b = _pair(spawn, connection, driver, source)
    before = b.call("stats")["resubscriptions"]
    sentinel_set.failover()
    _write_and_check(a, b, source, spawn, connection)
    assert b.call("stats")["resubscriptions"] > before


def test_sentinel_kill_of_the_primary(
    sentinel_set: SentinelTopology, spawn: Spawn, tmp_path: Path
) -> None:
    """kill -9 of the primary: both follow the replica the Sentinels promote."""
    source = tmp_path / "source"
    connection = sentinel_set.connection_string()
    a, b = _pair(spawn, connection, "async", source)
    old = sentinel_set.kill_primary()
    sentinel_set.wait_switched(old)
    _write_and_check(a, b, source, spawn, connection)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_sentinel_primary_cut_off_from_the_sentinels(
    sentinel_set: SentinelTopology, spawn: Spawn, tmp_path: Path, driver: str
) -> None:
    """The primary cut off from the Sentinels only stays a writable master that answers
    every ping; once a majority names the replica, its pongs stop counting and both
    instances move."""
    source = tmp_path / "source"
    connection = sentinel_set.connection_string()
    a, b = _pair(spawn, connection, driver, source)
    old = sentinel_set.cut_primary_from_sentinels()
    sentinel_set.wait_switched(old)
    assert sentinel_set.role(old) == "master"
    _write_and_check(a, b, source, spawn, connection)


def test_a_dead_sentinel_listed_first(
    sentinel_set: SentinelTopology, spawn: Spawn, tmp_path: Path
) -> None:
    """With a Sentinel that is down listed first, instances start (abortConnect) and follow a
    failover through the others."""
    source = tmp_path / "source"
    connection = sentinel_set.connection_string(dead_first=free_port())
    a, b = _pair(spawn, connection, "sync", source)
    sentinel_set.failover()
    _write_and_check(a, b, source, spawn, connection)


# -- Cluster ---------------------------------------------------------------------------------


def _slot(channel: str) -> int:
    return key_slot("{nearcache:v1:" + channel + "}")


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_cluster_reshard_of_the_channel_slot(
    redis_cluster: ClusterTopology, spawn: Spawn, tmp_path: Path, channel: str, driver: str
) -> None:
    """The channel's slot moves to another primary: B's subscription ends (sunsubscribe) and
    is made on the new owner; A's publishes follow; no stale read past the bound."""
    source = tmp_path / "source"
    connection = redis_cluster.connection_string()
    a, b = _pair(spawn, connection, driver, source)
    before = b.call("stats")["resubscriptions"]
    redis_cluster.move_slot(_slot(channel))
    _write_and_check(a, b, source, spawn, connection)
    assert b.call("stats")["resubscriptions"] > before


def test_cluster_kill_of_the_slot_owner(
    redis_cluster: ClusterTopology, spawn: Spawn, tmp_path: Path, channel: str
) -> None:
    """kill -9 of the slot's primary: its replica takes over and both instances follow."""
    source = tmp_path / "source"
    connection = redis_cluster.connection_string()
    a, b = _pair(spawn, connection, "sync", source)
    slot = _slot(channel)
    owner = redis_cluster.owner(slot)
    redis_cluster.kill(owner)
    redis_cluster.wait_owner_changed(slot, owner)
    _write_and_check(a, b, source, spawn, connection)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_cluster_minority_owner_stops_confirming(
    redis_cluster: ClusterTopology, spawn: Spawn, tmp_path: Path, channel: str, driver: str
) -> None:
    """The slot's owner alone in a minority still answers PING, but its confirmations stop
    once it reports cluster_state:fail: B's entry is gone within the bound after that."""
    source = tmp_path / "source"
    _a, b = _pair(spawn, redis_cluster.connection_string(), driver, source)
    owner = redis_cluster.owner(_slot(channel))
    redis_cluster.isolate_minority(owner)
    wait_until(lambda: redis_cluster.cluster_state(owner) == "fail", 10)
    failed = time.monotonic()
    gone = b.call("wait_gone", key="k", timeout=STALENESS + 5)
    assert gone is not None, "an L1 entry survived the minority"
    assert gone - failed <= STALENESS + SLACK
    redis_cluster.heal()
    b.wait_state("connected", timeout=20)


def test_cluster_refusals_at_start(redis_cluster: ClusterTopology) -> None:
    """A channel with braces, or a database other than 0, is refused at start on a cluster
    with a ConfigurationError naming it (abortConnect), not retried for connectTimeout."""
    connection = redis_cluster.connection_string()
    with pytest.raises(ConfigurationError) as info:
        NearCache(connection, channel="bad{channel}")
    assert info.value.option == "channel"
    with pytest.raises(ConfigurationError) as info:
        NearCache(connection + ",defaultDatabase=1", channel="fine")
    assert info.value.option == "defaultDatabase"


def test_sentinel_named_without_service_is_refused(sentinel_set: SentinelTopology) -> None:
    """A Sentinel given as a plain endpoint is refused at start naming serviceName."""
    sentinel = sentinel_set.sentinels[0]
    connection = f"{SENTINEL_HOST}:{sentinel.port},password={sentinel_set.sentinel_password}"
    with pytest.raises(ConfigurationError) as info:
        NearCache(connection, channel="fine")
    assert info.value.option == "serviceName"


def test_connect_retry_ends_the_start_early() -> None:
    """abortConnect gives up after connectRetry failed attempts, well before connectTimeout."""
    from nearcache import BackplaneUnavailableError

    started = time.monotonic()
    with pytest.raises(BackplaneUnavailableError, match="2 connection attempts failed"):
        NearCache(f"{HOST}:{free_port()},connectRetry=2,connectTimeout=20000", channel="x")
    assert time.monotonic() - started < 10


# -- operator tools --------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_monitor_and_invalidate_on_each_topology(
    topology: str,
    sentinel_set: SentinelTopology,
    redis_cluster: ClusterTopology,
    channel: str,
) -> None:
    """nearcache invalidate reaches a cache through the Sentinels' primary or the cluster
    shard, and nearcache monitor, connected the same way, prints what was published."""
    import subprocess
    import sys

    from nearcache import MISSING

    connection = (
        sentinel_set.connection_string()
        if topology == "sentinel"
        else redis_cluster.connection_string()
    )
    command = [sys.executable, "-m", "nearcache"]
    with (
        NearCache(connection, channel=channel) as cache,
        subprocess.Popen(
            [*command, "monitor", connection, "--channel", channel, "--json", "--count", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as monitor,
    ):
        try:
            assert monitor.stderr is not None
            assert "listening" in monitor.stderr.readline()
            cache.set("k", "v")
            result = subprocess.run(
                [*command, "invalidate", connection, "--channel", channel, "--key", "k"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert "delivered to 2 subscribers" in result.stdout
            wait_until(lambda: cache.get("k", MISSING) is MISSING, 5.0, message="evicted")
            out, err = monitor.communicate(timeout=30)
        finally:
            if monitor.poll() is None:
                monitor.kill()
                monitor.communicate()
    assert monitor.returncode == 0, err
    assert out.count('"key": "k"') == 2  # the cache's own set, then the command's


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_demo_shows_a_failover(redis_binary: str, topology: str) -> None:
    """nearcache demo --topology starts a private Sentinel set or cluster, kills the node in
    charge in step 6, and every check passes: the instances follow, no entry past the bound."""
    import re
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "nearcache", "demo", "--quiet", "--duration", "1",
         "--topology", topology],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "NEARCACHE_REDIS_SERVER": redis_binary},
        check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"step 6/6: failover ({topology})" in out
    assert "every instance subscribed on the new node by itself" in out
    assert re.search(rf"failover \({topology}\): every instance followed in [\d.]+ s", out)
    assert re.search(r"D warmed from L2: (\d+) of its \1 first reads came from Redis", out)
    assert re.search(r"result: all \d+ checks passed", out)


def test_a_taken_cluster_bus_port_is_replaced_at_start(
    redis_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's cluster node picks its bus port again when the one it picked was taken
    before redis-server bound it (it kept it, and failed three times: "Failed listening on
    port ... (cluster), aborting")."""
    import socket

    from nearcache._cli.demo import server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([free_port(), taken.getsockname()[1]])
        original = server._free_port
        monkeypatch.setattr(server, "_free_port", lambda: next(picks, None) or original())
        node = server.PrivateRedis(
            redis_binary, tmp_path, extra_args=("--cluster-enabled", "yes"), cluster_bus=True
        )
        try:
            node.start()
            assert node.alive and node.bus_port not in (0, taken.getsockname()[1])
        finally:
            node.stop()
