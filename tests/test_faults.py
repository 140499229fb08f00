"""Faults injected for real: Redis killed and restarted, connections reset and stalled.

The guarantee under test (docs/guarantees.md): once a writer's ``flush()`` has returned, no
instance returns the pre-write value to a read that starts more than ``max_staleness`` later,
and an instance whose subscription was lost recovers by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from nearcache import NearCache
from tests.instances import Instance
from tests.servers import RedisServer, TcpProxy, wait_until

STALENESS = 1.0
# Scheduling slack for a read that starts right at the bound on a loaded 2-core machine.
SLACK = 0.25

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


def _stale_reads(runs: list[list[object]], old: str, flushed_at: float) -> list[list[object]]:
    """Runs of reads that returned ``old`` and started past the staleness bound."""
    return [r for r in runs if r[2] == old and float(r[1]) > flushed_at + STALENESS + SLACK]


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_redis_killed_and_restarted(
    redis_factory: Callable[..., RedisServer], spawn: Spawn, tmp_path: Path, driver: str
) -> None:
    """After kill -9 no L1 entry outlives the bound, reads keep working, and the instance
    resubscribes by itself when Redis is back."""
    server = redis_factory()
    source = tmp_path / "source"
    source.write_text("v1")
    a = spawn(server.url, driver, "A")
    b = spawn(server.url, driver, "B")
    a.wait_state("connected")
    b.wait_state("connected")
    assert b.call("load", key="k", source=str(source)) == "v1"
    before = b.call("stats")["resubscriptions"]

    server.kill()
    killed = time.monotonic()
    gone = b.call("wait_gone", key="k", timeout=STALENESS + 5)
    assert gone is not None, "an L1 entry survived the outage"
    assert gone - killed <= STALENESS + SLACK
    assert b.call("state") != "connected"
    source.write_text("v2")
    assert b.call("load", key="k", source=str(source)) == "v2"  # served from the source

    server.restart()
    b.wait_state("connected", timeout=15)
    a.wait_state("connected", timeout=15)
    assert b.call("stats")["resubscriptions"] > before
    assert b.call("load", key="k", source=str(source)) == "v2"
    a.call("remove", key="k")
    a.call("flush")
    assert b.call("wait_gone", key="k") is not None


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_stalled_subscriber_never_serves_past_the_bound(
    redis_server: RedisServer,
    tcp_proxy: Callable[[int], TcpProxy],
    spawn: Spawn,
    tmp_path: Path,
    driver: str,
) -> None:
    """A silent partition (socket open, nothing flows) hides an invalidation from B; B stops
    serving the old value within the bound, then recovers when the partition heals."""
    proxy = tcp_proxy(redis_server.port)
    source = tmp_path / "source"
    source.write_text("v1")
    a = spawn(redis_server.url, driver, "A")
    b = spawn(f"127.0.0.1:{proxy.port},connectTimeout=1000", driver, "B")
    a.wait_state("connected")
    b.wait_state("connected")
    assert b.call("load", key="k", source=str(source)) == "v1"

    proxy.stall()
    source.write_text("v2")
    a.call("remove", key="k")
    flushed_at = a.call("flush")
    runs = b.call("read_loop", key="k", source=str(source), duration=STALENESS + 1.0)
    assert not _stale_reads(runs, "v1", flushed_at), runs
    assert runs[-1][2] == "v2"
    wait_until(lambda: b.call("state") != "connected", 5)

    proxy.resume()
    b.wait_state("connected", timeout=15)
    assert b.call("load", key="k", source=str(source)) == "v2"
    a.call("remove", key="k")
    a.call("flush")
    assert b.call("wait_gone", key="k") is not None


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_connection_reset_is_detected_and_repaired(
    redis_server: RedisServer,
    tcp_proxy: Callable[[int], TcpProxy],
    spawn: Spawn,
    driver: str,
) -> None:
    """A reset subscriber connection is noticed at once and the instance resubscribes; with
    nothing in the log to replay from, L1 is dropped locally (messages may have been lost)."""
    proxy = tcp_proxy(redis_server.port)
    a = spawn(redis_server.url, driver, "A")
    b = spawn(f"127.0.0.1:{proxy.port}", driver, "B")
    a.wait_state("connected")
    b.wait_state("connected")
    b.call("get_or_set", key="k", value="cached")
    before = b.call("stats")
    proxy.cut()
    wait_until(lambda: b.call("stats")["resubscriptions"] > before["resubscriptions"], 10)
    b.wait_state("connected")
    after = b.call("stats")
    assert after["repairs"] > before["repairs"]
    assert b.call("get", key="k") == {"missing": True}
    assert a.call("stats")["repairs"] == before["repairs"]  # the repair was not broadcast
    b.call("get_or_set", key="k", value="again")
    a.call("remove", key="k")
    a.call("flush")
    assert b.call("wait_gone", key="k") is not None


def test_writer_queues_while_redis_is_down_and_delivers_after(
    redis_factory: Callable[..., RedisServer], channel: str
) -> None:
    """Invalidations accepted while Redis is down are kept and published, in order, once it is
    back; flush() says so by raising until then."""
    from nearcache import FlushTimeoutError

    server = redis_factory()
    conn = f"{server.host}:{server.port},connectTimeout=500"
    with NearCache(conn, channel=channel) as writer, NearCache(conn, channel=channel) as reader:
        wait_until(lambda: reader.backplane_state.value == "connected")
        server.kill()
        wait_until(lambda: writer.backplane_state.value != "connected")
        for i in range(100):
            writer.remove(f"k{i}")
        writer.clear_region("r")
        with pytest.raises(FlushTimeoutError) as info:
            writer.flush(timeout=0.3)
        assert info.value.pending == 101
        server.restart()
        wait_until(lambda: reader.backplane_state.value == "connected", 15)
        writer.flush(timeout=15)
        # The reader subscribed again before the writer's queue drained, or it repaired on
        # resubscription: either way it holds nothing stale. The queue must now be empty.
        assert writer.stats().pending == 0
        assert writer.stats().invalidations_sent == 101


def test_garbage_and_foreign_messages_are_counted_and_dropped(
    redis_server: RedisServer, channel: str
) -> None:
    """Random bytes, a future protocol version and a signed message without a secret are
    counted as malformed; the listener keeps working."""
    from nearcache._core.codec import HEADER, Invalidation, Kind, encode

    with (
        NearCache(redis_server.url, channel=channel) as a,
        NearCache(redis_server.url, channel=channel) as b,
    ):
        wait_until(lambda: b.backplane_state.value == "connected")
        raw = redis_server.client()
        valid = encode(b"x" * 16, 1, [Invalidation(Kind.KEY, None, "k")])
        future = valid[:2] + b"\x02" + valid[3:]
        signed = encode(b"y" * 16, 1, [Invalidation(Kind.CLEAR)], signing_key=("k1", b"s"))
        garbage = [b"", b"hello", b"NC", future, signed, valid[: HEADER.size + 2], b"\xff" * 999]
        for payload in garbage:
            raw.publish(b.channel, payload)
        raw.close()
        wait_until(lambda: b.stats().malformed_messages == len(garbage))
        b.set("after", 1)
        a.remove("after")
        a.flush()
        wait_until(lambda: b.get("after") is None)
        assert b.stats().invalidations_received == 1


def test_slow_subscriber_disconnected_by_redis_recovers(
    redis_factory: Callable[..., RedisServer], channel: str
) -> None:
    """When Redis drops a subscriber over its output-buffer limit, the instance notices,
    resubscribes and catches up (replaying the flood from the log, or dropping L1)."""
    server = redis_factory(extra_args=["--client-output-buffer-limit", "pubsub 1kb 1kb 0"])
    with NearCache(server.url, channel=channel) as a, NearCache(server.url, channel=channel) as b:
        wait_until(lambda: b.backplane_state.value == "connected")
        b.set("k", "v")
        before = b.stats().resubscriptions
        # Hold B's listener (it applies messages under the cache lock) while A floods.
        with b._lock:
            for i in range(2000):
                a.remove(f"flood-{i}")
            a.flush()
            client = server.client()
            wait_until(
                lambda: (
                    not any(
                        c.get("sub") == "1"
                        for c in client.client_list()  # B was dropped
                    )
                ),
                10,
            )
            client.close()
        wait_until(lambda: b.stats().resubscriptions > before, 10)
        a.remove("k")
        a.flush()
        wait_until(lambda: b.get("k") is None)
        stats = b.stats()
        assert stats.replays + stats.repairs >= 2  # the first subscription, then the repair


def test_publisher_connection_errors_are_retried(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy], channel: str
) -> None:
    """A publish that fails on a reset connection is retried on a new one."""
    proxy = tcp_proxy(redis_server.port)
    with (
        NearCache(f"127.0.0.1:{proxy.port}", channel=channel) as a,
        NearCache(redis_server.url, channel=channel) as b,
    ):
        wait_until(lambda: a.backplane_state.value == "connected")
        wait_until(lambda: b.backplane_state.value == "connected")
        a.remove("warm")
        a.flush()
        b.set("k", 1)
        proxy.refuse()
        proxy.cut()
        a.remove("k")
        wait_until(lambda: a.stats().publish_failures > 0, 10)
        proxy.accept()
        a.flush(timeout=10)
        wait_until(lambda: b.get("k") is None)


def test_redis_py_has_no_silent_retry() -> None:
    """The backplane's clients never retry on their own (a retry could hide a lost
    subscription)."""
    from nearcache._backplane.redis import make_client_kwargs
    from nearcache._config import parse_connection_string

    kwargs = make_client_kwargs(parse_connection_string("127.0.0.1:1"))
    client = redis.Redis(**kwargs)
    assert client.get_retry() is not None
    assert client.get_retry()._retries == 0  # type: ignore[union-attr]
    client.close()
